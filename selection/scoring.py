"""The scoring core: reference loss with and without retrieval heads, fast and exact enough.

Pure tensors in, tensors out (no Hydra, no files). Four ideas make it fast:

1. Shared prefix. Masking only changes layers at or above the first layer that holds a masked
   head (k). The scorer embeds once, runs decoder layers 0..k-1 once, then runs layers k..L-1
   twice (heads off, heads on), then the final norm and the loss for each branch. With the
   paper's 5% of heads the first masked layer is often low, so the saving is a few layers; it
   is free, so we take it.
2. Length-bucketed batches, not packing. Documents of a shard are sorted by length and cut into
   batches under a padded-token budget, so padding waste is small (neighbours in the sorted
   order have nearly equal lengths). Packing several documents into one row would need a 4D
   block-diagonal mask on every layer, which takes SDPA off its mask-free kernels and turns the
   masked heads' running mean into an O(T^2) matmul over the whole packed row, for a saving
   that sorting already captures; so buckets. Right padding is exact: a real token never
   attends to a later (padding) position, and masking reads the padding mask it is given.
3. Chunked loss in fp32. The lm_head (49k vocabulary for SmolLM) is applied to at most
   max(ce_chunk, LM_HEAD_MIN_ROWS) positions at a time, and only to positions that predict a
   real next token; each `ce_chunk` rows of its logits are cast to fp32 before log-softmax, so
   bf16 matmuls keep an fp32 loss and the [tokens x vocab] logits never exist in full.
4. On CPU, attention by blocks (`model.attn_impl: auto` = selection.attention's causal_blocks):
   SDPA's CPU flash kernel spent about a third of a layer's time on ~6% of its FLOPs.

Where a CPU forward's time goes (torch.profiler, SmolLM2-135M, 2 cores): GEMMs a little under
half, SDPA's CPU flash kernel a sixth before idea 4, elementwise work most of the rest
(RMSNorm's fp32 round trip, rotary's cat/neg, SwiGLU, dtype copies), the loss a few percent.
A hand-fused decoder layer (concatenated q/k/v and gate/up GEMMs, fused RMSNorm, in-place
rotary and SwiGLU) was measured on top of idea 4 and bought nothing, and torch.compile of the
layer saved CPU time but cost more cold compile time than the demo's scoring, so neither is
here. The figures are in the README's Measured table, with the machine of each.

What bounds the fast/naive ratio on CPU is the ratio of the machine's GEMM peaks in the dtype
the fast path runs in and in fp32 (the naive reference's), and that ratio differs between
machines of one kind: where bf16 is native it is 2-10x, where bf16 is emulated `dtype: auto`
runs the fast path in fp32 (selection.precision) and the ratio comes from the shared prefix,
batching and the chunked loss alone. `python -m bench.score` measures the ratio and the
fraction of the chosen dtype's peak in one run; the README's Measured table has them per machine.

The naive reference (`naive_losses`) is the obviously-correct version: one document at a time,
two full forward passes through `model(...)`, `torch.nn.functional.cross_entropy` on the
logits. Tests and the benchmark hold the fast path against it.

Tolerance (what "agrees with the reference" means; bench.score measures it, the README's
Measured table has the figures):
- fp32 fast path: |score difference| <= 1e-5 (summation order only).
- bf16 fast path (fp32 loss): |score difference| <= 2e-2 absolute, the bf16 rounding of the
  hidden states through 30 layers. causal_blocks rounds attention scores to bf16 before the fp32
  softmax (SDPA's kernel keeps them fp32), which stays inside it. Rankings then agree except on
  near-ties (reference scores closer than twice the tolerance), so the top 20% of a domain can
  only differ by such pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selection import masking

# --- tokenisation -----------------------------------------------------------------------------

BOS_POLICIES = ("auto", "always", "never")


def encode(tokenizer, texts: Sequence[str], max_tokens: int, bos: str = "auto") -> list[tuple[list[int], int]]:
    """Token ids (truncated to max_tokens) and the untruncated count for each text.

    bos="auto": whatever the tokenizer adds with add_special_tokens=True (the model's own
    convention); "always": prepend bos_token_id (eos when there is none) unless already there;
    "never": raw text tokens only. The untruncated count is kept for token budgets.
    """
    if bos not in BOS_POLICIES:
        raise ValueError(f"bos policy '{bos}' unknown; use one of {BOS_POLICIES}")
    enc = tokenizer(list(texts), add_special_tokens=(bos == "auto"), return_attention_mask=False)["input_ids"]
    out = []
    first = None
    if bos == "always":
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for ids in enc:
        ids = list(ids)
        if first is not None and (not ids or ids[0] != first):
            ids = [first] + ids
        out.append((ids[:max_tokens], len(ids)))
    return out


# --- batching ---------------------------------------------------------------------------------

def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int,
                 max_padding: float = 0.1) -> list[list[int]]:
    """Group indices into batches of similar length under a padded-token budget.

    Sorted longest first (ties by index, so the plan is deterministic); a batch grows while
    `len(batch) * longest <= max_batch_tokens` and padding stays under `max_padding` of its
    positions. Padding is pure waste on a CPU, which gains little from wide batches: on the demo
    corpus (lengths 100-1,024) a budget-only plan padded ~40% of the positions. On a large
    corpus the lengths are dense, so batches still fill. A document longer than the budget gets
    a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = real = 0
    for i in order:
        n = lengths[i]
        if cur:
            padded = (len(cur) + 1) * max(longest, n)
            if (padded > max_batch_tokens or len(cur) >= max_batch_size
                    or 1 - (real + n) / padded > max_padding):
                batches.append(cur)
                cur, longest, real = [], 0, 0
        cur.append(i)
        longest = max(longest, n)
        real += n
    if cur:
        batches.append(cur)
    return batches


def pad_batch(token_lists: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and lengths [B]."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    t = int(lengths.max())
    ids = torch.full((len(token_lists), t), pad_id, dtype=torch.long)
    for b, toks in enumerate(token_lists):
        ids[b, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
    return ids.to(device), lengths.to(device)


# --- loss -------------------------------------------------------------------------------------

# Rows of logits per lm_head + cross-entropy chunk. On CPU a small chunk keeps the fp32 logits
# in cache (64 x 49,152 x 4 B = 12.6 MB) and was over twice as fast as 4,096 rows, with the
# same numbers to the last bit (README, Measured). On a GPU large chunks amortise kernel
# launches; memory is the only limit.
CE_CHUNK_CPU = 64
CE_CHUNK_GPU = 4096

# Padded tokens per length-bucketed batch. On CPU small batches win (`python -m bench.score
# --batch-tokens N --skip-naive`; README, Measured): the activations of a 2,048-token batch
# stay in L2/L3 between the layer's GEMMs and elementwise ops, and 1,024 is already too thin
# for the GEMMs. On a GPU big batches amortise launches; memory is the limit.
BATCH_TOKENS_CPU = 2048
BATCH_TOKENS_GPU = 16384


def default_batch_tokens(device_type: str, max_tokens: int) -> int:
    """The padded-token budget for `batch_tokens: null`: the device's measured best, >= max_tokens."""
    return max(BATCH_TOKENS_CPU if device_type == "cpu" else BATCH_TOKENS_GPU, max_tokens)


# Rows per lm_head GEMM, at least: the cross entropy still runs on `ce_chunk`-row slices of it.
# A 64-row GEMM against a 49k vocabulary runs well below the GEMM peak; 256 rows keep the bf16
# logits (25 MB for SmolLM2) in L3 while the fp32 slices stay cache-sized (faster than 64 and
# 512 rows in the scorer, README, Measured); the losses are the same to the last bit (each
# row's logits do not depend on the GEMM's other rows).
LM_HEAD_MIN_ROWS = 256


def chunked_token_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     chunk: int = 4096, bias: torch.Tensor | None = None,
                     gemm_rows: int = LM_HEAD_MIN_ROWS, project=None) -> torch.Tensor:
    """Per-token cross entropy [N] in fp32 for hidden [N, H] under lm_head `weight` [V, H].

    The matmul runs in the weight's dtype (bf16 fast path) on max(chunk, gemm_rows) rows at a
    time; log-softmax runs in fp32 on at most `chunk` rows, so peak memory is about
    max(chunk, gemm_rows) x V x 2 + chunk x V x 4 bytes instead of N x V x 4. `project`, when
    given, computes the logits instead of F.linear(h, weight, bias): the model's lm_head module,
    so a head routed through oneDNN (selection.onednn_linear) runs its routed forward.
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    rows = max(chunk, gemm_rows)
    for g in range(0, hidden.shape[0], rows):
        h = hidden[g:g + rows].to(weight.dtype)
        logits = F.linear(h, weight, bias) if project is None else project(h)
        for s in range(0, logits.shape[0], chunk):
            e = min(s + chunk, logits.shape[0])
            out[g + s:g + e] = F.cross_entropy(logits[s:e].float(), targets[g + s:g + e], reduction="none")
    return out


def mean_loss_per_doc(token_loss: torch.Tensor, doc_index: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Mean of token losses per document, accumulated in float64."""
    sums = torch.zeros(n_docs, dtype=torch.float64, device=token_loss.device)
    sums.index_add_(0, doc_index, token_loss.double())
    cnt = torch.bincount(doc_index, minlength=n_docs).double()
    return sums / cnt


def ai_score(loss_base: torch.Tensor | float, loss_masked: torch.Tensor | float):
    """AttentionInfluence score (PAPER.md section 3): (L_masked - L_base) / L_base."""
    return (loss_masked - loss_base) / loss_base


# --- fast scorer ------------------------------------------------------------------------------

@dataclass
class BranchScorer:
    """Base and masked reference losses from one model, sharing the layers below the first masked one.

    model: an HF Llama-family causal LM (`model.model` with embed_tokens, layers, norm,
    rotary_emb), masking-capable (selection.masking.install or selection.models.load_selector).
    heads: [(layer, head)] to mask; empty = no masked pass (loss_masked = loss_base).
    share_prefix=False runs all layers twice (the measured ablation of idea 1).
    """

    model: torch.nn.Module
    heads: list[tuple[int, int]]
    mode: str = "uniform"
    ce_chunk: int | None = None  # None = CE_CHUNK_CPU on CPU, CE_CHUNK_GPU elsewhere
    share_prefix: bool = True

    def __post_init__(self):
        self.heads = masking.validate_heads(self.model, self.heads)
        inner = getattr(self.model, "model", None)
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(inner, attr):
                raise TypeError(f"{type(self.model).__name__}: the fast scorer needs a decoder with "
                                f"model.{attr} (Llama-family); use naive_losses for other models")
        self.inner = inner
        if self.ce_chunk is None:
            cpu = next(self.model.parameters()).device.type == "cpu"
            self.ce_chunk = CE_CHUNK_CPU if cpu else CE_CHUNK_GPU
        k = masking.first_masked_layer(self.heads)
        self.split = (k if self.share_prefix else 0) if k is not None else None
        masking.install(self.model)
        masking.clear(self.model)

    def _layers(self, h, lo, hi, mask, pos_emb, position_ids):
        for layer in self.inner.layers[lo:hi]:
            h = layer(h, attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids)
        return h

    @torch.inference_mode()
    def losses(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean token CE (float64) per row of right-padded ids [B, T] with `lengths` [B]."""
        from transformers.masking_utils import create_causal_mask

        b, t = ids.shape
        if int(lengths.min()) < 2:
            raise ValueError("every document needs at least 2 tokens to have a loss")
        inner, cfg = self.inner, self.model.config
        n_layers = len(inner.layers)
        emb = inner.embed_tokens(ids)
        position_ids = torch.arange(t, device=ids.device)[None, :]
        # No padding mask, on purpose: batches are right-padded, so under the causal mask a real
        # position only ever sees real positions (and the running mean of a masked head, too).
        # Pad positions compute garbage that no loss reads. Skipping the mask keeps SDPA on its
        # fused causal kernel: ~25% faster at 1,024 tokens on CPU than with an explicit mask.
        mask = create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None,
                                  past_key_values=None, position_ids=position_ids)
        pos_emb = inner.rotary_emb(emb, position_ids=position_ids)
        # positions that predict a real next token, and the document each belongs to
        valid = (torch.arange(t - 1, device=ids.device)[None, :] < (lengths - 1)[:, None])
        targets = ids[:, 1:][valid]
        doc_index = torch.arange(b, device=ids.device)[:, None].expand(b, t - 1)[valid]
        head = self.model.get_output_embeddings()

        def loss_from(h):
            h = inner.norm(h)[:, :-1][valid]
            tok = chunked_token_ce(h, head.weight, targets, self.ce_chunk, project=head)
            return mean_loss_per_doc(tok, doc_index, b)

        split = n_layers if self.split is None else self.split
        try:
            masking.clear(self.model)
            shared = self._layers(emb, 0, split, mask, pos_emb, position_ids)
            base = loss_from(self._layers(shared, split, n_layers, mask, pos_emb, position_ids))
            if self.split is None:
                return base, base.clone()
            masking.set_masked_heads(self.model, self.heads, self.mode)
            masked = loss_from(self._layers(shared, split, n_layers, mask, pos_emb, position_ids))
        finally:
            masking.clear(self.model)
        return base, masked


# --- work done -------------------------------------------------------------------------------

def branch_flops(config, lengths: Sequence[int], split: int | None) -> dict[str, float]:
    """FLOPs the fast path needs for documents of `lengths`, counted from the model's shape.

    Per token and layer: the q/k/v/o projections and the SwiGLU MLP (2 FLOPs per weight), plus
    causal attention (QK^T and AV over the i+1 positions token i sees, 4*heads*head_dim each).
    Layers below `split` run once, the rest twice (None: no masked pass, every layer once); the
    lm_head runs on the len-1 positions that predict a token, once per branch. Norms, rotary,
    softmax and the masked heads' running mean are left out (elementwise, < 1%). This is the
    useful work only: padding and the causal mask's skipped half are not counted, so achieved
    GFLOP/s is honest about waste.
    """
    h = config.hidden_size
    n_heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or n_heads
    hd = getattr(config, "head_dim", None) or h // n_heads
    ffn, vocab, n_layers = config.intermediate_size, config.vocab_size, config.num_hidden_layers
    per_tok_layer = 2 * (h * n_heads * hd * 2 + h * kv * hd * 2) + 2 * 3 * h * ffn
    passes = n_layers if split is None else split + 2 * (n_layers - split)
    branches = 1 if split is None else 2
    tokens = sum(lengths)
    visible = sum(n * (n + 1) // 2 for n in lengths)  # sum over positions of keys seen
    out = {"linear": float(per_tok_layer) * tokens * passes,
           "attention": 4.0 * n_heads * hd * visible * passes,
           "lm_head": 2.0 * h * vocab * sum(max(n - 1, 0) for n in lengths) * branches}
    out["total"] = out["linear"] + out["attention"] + out["lm_head"]
    return out


# --- naive reference --------------------------------------------------------------------------

@torch.inference_mode()
def naive_losses(model: torch.nn.Module, token_lists: Iterable[Sequence[int]], heads: list[tuple[int, int]],
                 mode: str = "uniform") -> tuple[list[float], list[float]]:
    """Obviously-correct reference: per document, two full forwards and F.cross_entropy."""
    device = next(model.parameters()).device
    base, masked = [], []
    for toks in token_lists:
        ids = torch.as_tensor(list(toks), dtype=torch.long, device=device)[None]
        logits = model(input_ids=ids).logits[0, :-1].float()
        base.append(F.cross_entropy(logits, ids[0, 1:]).item())
        if heads:
            with masking.mask_heads(model, heads, mode):
                logits = model(input_ids=ids).logits[0, :-1].float()
            masked.append(F.cross_entropy(logits, ids[0, 1:]).item())
        else:
            masked.append(base[-1])
    return base, masked


def score_tokens(scorer: BranchScorer, token_lists: Sequence[Sequence[int]], *, max_batch_tokens: int,
                 max_batch_size: int, pad_id: int, on_batch=None,
                 max_padding: float = 0.1) -> tuple[list[float], list[float]]:
    """Losses for many documents through length-bucketed batches, returned in input order.

    on_batch(n_docs, n_tokens) is called after each batch (progress reporting).
    """
    device = next(scorer.model.parameters()).device
    n = len(token_lists)
    base = [math.nan] * n
    masked = [math.nan] * n
    for idx in plan_batches([len(t) for t in token_lists], max_batch_tokens, max_batch_size, max_padding):
        ids, lengths = pad_batch([token_lists[i] for i in idx], pad_id, device)
        lb, lm = scorer.losses(ids, lengths)
        for j, i in enumerate(idx):
            base[i] = float(lb[j])
            masked[i] = float(lm[j])
        if on_batch is not None:
            on_batch(len(idx), int(lengths.sum()))
    return base, masked
