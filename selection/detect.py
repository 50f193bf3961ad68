"""Retrieval-head detection (PAPER.md section 1, after Wu et al. 2024).

For every probe (selection/probes.py) the selector produces the answer, and at each answer step
every head's attention argmax is taken from the query row that produces the token. A head
"copies" at that step when
  (1) the produced token occurs in the target value, and
  (2) the head's argmax position holds that same token and lies in the copy region:
      `copy_region=value` (default) = the query value's tokens inside the JSON, as in Wu et al.'s
      definition (j in the needle span); `copy_region=context` = any prompt position (the looser
      wording "a context position holding that same token").
A head's score on a probe = copies / target length (token-level recall, capped at 1); the head's
retrieval score = mean over probes. The top `heads.fraction` of heads (paper: 5%) is kept.

"Holds that same token" (`detect.match`):
- offsets (default): by characters. The answer is " " + value, and inside the JSON the value
  follows a quote, so a byte-level BPE spells the two differently: the first answer token is
  " The" while the JSON holds "The", and the value's last "." may merge with the closing quote
  into '."'. Comparing token ids then misses those steps for every head, and recall tops out
  near (n-2)/n. Instead each answer token is mapped to the value characters it spells (its
  leading space is not part of the value), and a context position holds it when the position's
  characters overlap that text at one of its occurrences in the value (an occurrence = a place
  where the answer's own tokenisation has the same token id, so repeats count as in Wu et al.).
  With copy_region=context a position outside the value also holds the token when its text,
  stripped of whitespace, equals the produced token's.
- token_id: the literal id comparison (Wu et al.'s code), kept to measure what offsets changes.
Both are computed from the same argmax in one pass (heads.json `scores_other_match`), and the
achievable recall (the share of target tokens some region position holds: what an oracle copy
head scores) is recorded for both as `recall_ceiling`.

Two ways to produce the answer (`detect.mode`):
- generate (paper, default): greedy decoding with a KV cache; the row is the newest query of each
  step; the produced token is the generated one; decoding stops at EOS, a newline, or
  max_new_tokens.
- teacher_forced: prompt + gold answer in one forward; for answer token a_j (at position S+j,
  S = prompt length) the row is position S+j-1 (the row whose next-token prediction is a_j), the
  produced token is a_j, and the argmax runs over that row's visible positions 0..S+j-1. Each
  probe then contributes its full target, which is what gives signal on a weak selector that
  rarely answers exactly (SmolLM2-135M-Instruct: ~1 in 20, see docs). Exact match under teacher
  forcing (every a_j is the row's argmax prediction) equals greedy decoding reproducing the value.

Correctness filter (Wu et al.: ROUGE-1 recall > 0.5), off by default because the paper does not
say: both the unfiltered and the filtered scores are reported either way; `correctness_filter`
picks which one ranks the heads.

Cost: weights are never formed for the full T x T attention. The prefill runs the model's own
fused attention (SDPA); an observer (selection.masking.set_observer) recomputes q.k only for the
few query rows that matter (1 per decode step, or ~30 rows in teacher-forced mode) x all heads x
all keys. Detection runs one probe at a time (batch 1, no padding), which keeps the row bookkeeping
exact; probes are short enough that batching would not pay on CPU.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from attninf.config import check
from selection.probes import DEFAULT_INSTRUCTION, LAYOUTS, Probe

log = logging.getLogger(__name__)

MODES = ("generate", "teacher_forced")
REGIONS = ("value", "context")
MATCHES = ("offsets", "token_id")


@dataclass
class DetectConfig:
    """The `detect` config group (conf/detect/*.yaml). Paper values are the defaults."""

    num_probes: int = 800  # paper: 800 samples
    max_tokens: int = 4096  # prompt + answer stay just under this (paper: 4,096)
    seed: int = 0  # probe generation
    mode: str = "generate"  # generate (paper) | teacher_forced (weak selectors)
    shots: int = 3  # solved question/answer pairs before the query (paper: 3)
    key_length: int = 32  # paper: 32-character alphanumeric keys
    max_value_tokens: int = 30  # paper: values of at most 30 tokens
    min_value_tokens: int = 5  # unstated; keeps values sentence-like
    text_source: str | None = None  # .jsonl (text_field), .txt, or corpus:<domain>; null = built-in sentences
    text_field: str = "text"
    text_docs: int = 2000  # corpus:<domain>: documents read for sentences
    instruction: str = DEFAULT_INSTRUCTION
    copy_region: str = "value"  # value (Wu et al.: argmax inside the needle) | context
    match: str = "offsets"  # offsets (same characters, robust to BPE spelling) | token_id
    json_layout: str = "inline"  # inline (one line) | lines (one pair per line, indented)
    correctness_filter: bool = False  # rank with only probes of ROUGE-1 recall > threshold (Wu et al.)
    rouge_threshold: float = 0.5
    max_new_tokens: int = 40  # generate mode: cap on decoded tokens (values are <= 30)
    heatmap: bool = True

    def validate(self) -> None:
        check(self.num_probes >= 1, "num_probes", f"{self.num_probes} must be >= 1")
        check(self.max_tokens >= 64, "max_tokens", f"{self.max_tokens} is too small for a probe (>= 64)")
        check(self.mode in MODES, "mode", f"'{self.mode}' is not one of {list(MODES)}")
        check(self.shots >= 0, "shots", "must be >= 0")
        check(self.key_length >= 4, "key_length", "must be >= 4")
        check(1 <= self.min_value_tokens <= self.max_value_tokens, "max_value_tokens",
              f"need 1 <= min_value_tokens ({self.min_value_tokens}) <= max_value_tokens")
        check(self.copy_region in REGIONS, "copy_region", f"'{self.copy_region}' is not one of {list(REGIONS)}")
        check(self.match in MATCHES, "match", f"'{self.match}' is not one of {list(MATCHES)}")
        check(self.json_layout in LAYOUTS, "json_layout", f"'{self.json_layout}' is not one of {list(LAYOUTS)}")
        check(0.0 <= self.rouge_threshold <= 1.0, "rouge_threshold", "must be in [0, 1]")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.text_docs >= 1, "text_docs", "must be >= 1")
        if self.text_source and self.text_source.startswith("corpus:"):
            check(bool(self.text_source[len("corpus:"):].strip()), "text_source",
                  "corpus:<domain> needs a domain, e.g. corpus:fineweb_edu")


# --------------------------------------------------------------------------------------------
# Pure scoring (tensors in, tensors out)
# --------------------------------------------------------------------------------------------

def copy_hits(argmax_pos: torch.Tensor, produced: torch.Tensor, sequence: torch.Tensor,
              target: Sequence[int], region: torch.Tensor) -> torch.Tensor:
    """Which head copies at which step under the token-id match: bool [L, H, N].

    argmax_pos [L, H, N]: per step, the position each head attends to most;
    produced [N]: the token produced at each step; sequence [T]: token ids by position;
    target: the target value's token ids; region [T] bool: positions a copy may come from.
    """
    return hits_from_holds(argmax_pos, token_id_holds(produced, sequence, target, region))


def hits_from_holds(argmax_pos: torch.Tensor, holds: torch.Tensor) -> torch.Tensor:
    """hits[l, h, j] = holds[j, argmax_pos[l, h, j]]: bool [L, H, N] from holds [N, T]."""
    steps = torch.arange(holds.shape[0])[None, None, :]
    return holds[steps, argmax_pos.to(torch.long)]


def token_id_holds(produced: torch.Tensor, sequence: torch.Tensor, target: Sequence[int],
                   region: torch.Tensor) -> torch.Tensor:
    """holds [N, T]: position p holds step j's token when its id is the produced id (and the
    produced token is in the target, p in the region)."""
    produced = produced.to(torch.long)
    in_target = torch.isin(produced, torch.as_tensor(list(target), dtype=torch.long))  # [N]
    return (sequence[None, :].to(torch.long) == produced[:, None]) & region[None, :] & in_target[:, None]


def value_intervals(answer: str, value: str, answer_offsets: Sequence[tuple[int, int]],
                    span: tuple[int, int]) -> list[tuple[int, int]]:
    """Prompt character interval [a, b) of the value characters each answer token spells
    ((0, 0) when it spells none, e.g. a lone leading space). The answer is prefix + value."""
    if not answer.endswith(value):
        raise ValueError(f"answer {answer[:40]!r} does not end with its value")
    pre = len(answer) - len(value)
    out = []
    for s, e in answer_offsets:
        a, b = max(s - pre, 0), min(e - pre, len(value))
        out.append((span[0] + a, span[0] + b) if a < b else (0, 0))
    return out


def offset_holds(produced: Sequence[int], answer_ids: Sequence[int], intervals: Sequence[tuple[int, int]],
                 offsets: Sequence[tuple[int, int]], region: torch.Tensor, seq_len: int,
                 texts: Sequence[str] | None = None, produced_texts: Sequence[str] | None = None) -> torch.Tensor:
    """holds [N, seq_len] under the character match (module docs).

    produced: ids of the N produced tokens; answer_ids / intervals: the gold answer's tokens and
    the prompt interval of the value text each spells; offsets: the prompt tokens' character
    spans (positions past the prompt hold nothing); region [P]: the copy region over the prompt.
    texts / produced_texts (copy_region=context): the prompt tokens' and produced tokens' text;
    a prompt position whose stripped text equals the produced token's also holds it.
    """
    P = len(offsets)
    st = torch.tensor([o[0] for o in offsets], dtype=torch.long)
    en = torch.tensor([o[1] for o in offsets], dtype=torch.long)
    nonempty = st < en
    holds = torch.zeros(len(produced), seq_len, dtype=torch.bool)
    occ: dict[int, list[tuple[int, int]]] = {}
    for t, iv in zip(answer_ids, intervals):
        if iv[0] < iv[1]:
            occ.setdefault(int(t), []).append(iv)
    for j, t in enumerate(produced):
        row = torch.zeros(P, dtype=torch.bool)
        for a, b in occ.get(int(t), []):
            row |= nonempty & (st < b) & (en > a)
        if texts is not None and produced_texts is not None and int(t) in set(map(int, answer_ids)):
            want = produced_texts[j].strip()
            if want:
                row |= torch.tensor([x.strip() == want for x in texts], dtype=torch.bool)
        holds[j, :P] = row & region
    return holds


def retrieval_recall(hits: torch.Tensor, target_len: int) -> torch.Tensor:
    """Per-head token-level recall [L, H]: copies / target length, capped at 1 (a model that
    repeats the value could otherwise count a token twice)."""
    return (hits.sum(-1).to(torch.float64) / max(target_len, 1)).clamp(max=1.0)


def rouge1_recall(prediction: str, reference: str) -> float:
    """ROUGE-1 recall on lower-cased word tokens (clipped counts), as Wu et al.'s filter."""
    ref = re.findall(r"\w+", reference.lower())
    if not ref:
        return 0.0
    pred: dict[str, int] = {}
    for w in re.findall(r"\w+", prediction.lower()):
        pred[w] = pred.get(w, 0) + 1
    hit = 0
    for w in ref:
        if pred.get(w, 0) > 0:
            pred[w] -= 1
            hit += 1
    return hit / len(ref)


# --------------------------------------------------------------------------------------------
# Attention rows through the observer hook
# --------------------------------------------------------------------------------------------

class ArgmaxObserver:
    """Observer for selection.masking.set_observer: per layer, the argmax key position of every
    query head for the requested absolute query positions (batch 1, no padding).

    The attention function sees key/value with the cache already appended, so a call with Tq
    query rows and Tk keys holds absolute positions Tk-Tq .. Tk-1; row p may see keys 0..p.
    Only q.k for the wanted rows is formed: [H, R, Tk] per layer, never [H, T, T].
    Softmax and the positive scaling are monotone, so the logits' argmax is the weights' argmax.
    """

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.rows: list[int] = []
        self.out: dict[int, torch.Tensor] = {}

    def want(self, rows: Sequence[int]) -> None:
        self.rows = list(rows)
        self.out = {}

    def __call__(self, module, query, key, value, attention_mask, scaling) -> None:
        if not self.rows:
            return
        if query.shape[0] != 1:
            raise RuntimeError("detection observes batch-1 forwards only")
        tq, tk = query.shape[2], key.shape[2]
        offset = tk - tq
        local = [p - offset for p in self.rows if offset <= p < tk]
        if not local:
            return
        n_h, n_kv = query.shape[1], key.shape[1]
        rep = n_h // n_kv
        q = query[0, :, local, :].float()  # [H, R, D]
        k = key[0].float()  # [KV, Tk, D]
        # Grouped: query head h reads KV head h // rep (transformers' repeat_kv order).
        qg = q.reshape(n_kv, rep * len(local), q.shape[-1])
        logits = torch.bmm(qg, k.transpose(1, 2)).reshape(n_h, len(local), tk)  # [H, R, Tk]
        pos = torch.tensor([offset + i for i in local], device=logits.device)
        future = torch.arange(tk, device=logits.device)[None, :] > pos[:, None]  # [R, Tk]
        logits.masked_fill_(future[None], float("-inf"))
        self.out[int(module.layer_idx)] = logits.argmax(-1).cpu()  # [H, R]

    def collect(self) -> torch.Tensor:
        """[L, H, R] argmax positions of the last forward."""
        missing = [l for l in range(self.n_layers) if l not in self.out]
        if missing:
            raise RuntimeError(f"observer saw no attention call for layers {missing[:5]}; "
                               "is the masking-capable attention installed?")
        return torch.stack([self.out[l] for l in range(self.n_layers)])


# --------------------------------------------------------------------------------------------
# Per-probe runs
# --------------------------------------------------------------------------------------------

@dataclass
class ProbeResult:
    id: int
    n_tokens: int
    target_len: int
    generated: str
    exact_match: bool
    rouge1: float
    answer_loss: float | None  # teacher-forced mean NLL of the answer tokens (teacher_forced mode)
    recall: torch.Tensor = field(repr=False)  # [L, H] under the configured match
    ceiling: float = 1.0  # share of the gold answer's tokens some region position holds (this match)
    ceiling_other: float = 1.0  # the same under the other match
    recall_other: torch.Tensor = field(default_factory=lambda: torch.zeros(0), repr=False)

    def stats(self) -> dict:
        d = asdict(self)
        d.pop("recall")
        d.pop("recall_other")
        return d


@dataclass
class EncodedProbe:
    prompt_ids: list[int]
    answer_ids: list[int]
    region: torch.Tensor  # [P] bool: positions a copy may come from
    offsets: list[tuple[int, int]]  # prompt tokens' character spans
    intervals: list[tuple[int, int]]  # prompt interval of the value text each answer token spells
    texts: list[str] | None  # prompt tokens' text (copy_region=context only)


def encode_probe(tokenizer, probe: Probe, copy_region: str) -> EncodedProbe:
    enc = tokenizer(probe.prompt, return_offsets_mapping=True)
    prompt_ids = list(enc["input_ids"])
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    aenc = tokenizer(probe.answer, add_special_tokens=False, return_offsets_mapping=True)
    answer_ids = list(aenc["input_ids"])
    intervals = value_intervals(probe.answer, probe.value, aenc["offset_mapping"], probe.value_span)
    texts = None
    if copy_region == "context":
        region = torch.ones(len(prompt_ids), dtype=torch.bool)
        texts = [probe.prompt[a:b] for a, b in offsets]
    else:
        a, b = probe.value_span
        region = torch.tensor([(e > a and s < b) for s, e in offsets], dtype=torch.bool)
        if not region.any():
            raise ValueError(f"probe {probe.id}: value span not found among the prompt's tokens")
    return EncodedProbe(prompt_ids, answer_ids, region, offsets, intervals, texts)


def probe_holds(tokenizer, e: EncodedProbe, produced: Sequence[int], match: str) -> torch.Tensor:
    """holds [N, P + N] for the N produced tokens (positions past the prompt hold nothing)."""
    seq_len = len(e.prompt_ids) + len(produced)
    if match == "token_id":
        seq = torch.tensor(list(e.prompt_ids) + list(produced))
        full_region = torch.cat([e.region, torch.zeros(len(produced), dtype=torch.bool)])
        return token_id_holds(torch.tensor(list(produced)), seq, e.answer_ids, full_region)
    ptexts = [tokenizer.decode([t]) for t in produced] if e.texts is not None else None
    return offset_holds(produced, e.answer_ids, e.intervals, e.offsets, e.region, seq_len, e.texts, ptexts)


def _score_steps(tokenizer, e: EncodedProbe, argmax: torch.Tensor, produced: Sequence[int],
                 match: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(recall [L, H], recall under the other match, ceiling, other ceiling).

    The ceiling is the recall of an oracle head on the gold answer: the share of its tokens
    that some region position holds."""
    other = MATCHES[1 - MATCHES.index(match)]
    n = len(e.answer_ids)
    out = []
    for m in (match, other):
        gold = probe_holds(tokenizer, e, e.answer_ids, m)
        ceiling = float(gold.any(-1).sum()) / max(n, 1)
        if produced:
            recall = retrieval_recall(hits_from_holds(argmax, probe_holds(tokenizer, e, produced, m)), n)
        else:
            recall = torch.zeros(0)
        out.append((recall, ceiling))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def _stop_ids(tokenizer) -> set[int]:
    return {i for i in (tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)) if i is not None}


@torch.no_grad()
def run_teacher_forced(model, tokenizer, probe: Probe, observer: ArgmaxObserver | None,
                       copy_region: str = "value", match: str = "offsets") -> ProbeResult:
    """One forward over prompt + gold answer; rows S-1 .. S+n-2 produce the n answer tokens."""
    e = encode_probe(tokenizer, probe, copy_region)
    prompt_ids, answer_ids = e.prompt_ids, e.answer_ids
    s, n = len(prompt_ids), len(answer_ids)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    rows = list(range(s - 1, s + n - 1))
    if observer is not None:
        observer.want(rows)
    # Only the n rows that predict answer tokens need the vocabulary projection (~12% of a
    # 135M model's forward at 1k tokens): keep the last n+1 positions and drop the final one.
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :n].float()
    target = ids[0, s:]
    loss = torch.nn.functional.cross_entropy(logits, target).item()
    pred = logits.argmax(-1)
    em = bool((pred == target).all())
    generated = tokenizer.decode(pred.tolist(), skip_special_tokens=True)
    if observer is not None:
        argmax = observer.collect()
        observer.want([])
        recall, other, ceil, ceil_o = _score_steps(tokenizer, e, argmax, answer_ids, match)
        return ProbeResult(probe.id, s + n, n, generated, em, rouge1_recall(generated, probe.value),
                           loss, recall, ceil, ceil_o, other)
    return ProbeResult(probe.id, s + n, n, generated, em, rouge1_recall(generated, probe.value),
                       loss, torch.zeros(0))


@torch.no_grad()
def run_generate(model, tokenizer, probe: Probe, observer: ArgmaxObserver | None,
                 copy_region: str = "value", max_new_tokens: int = 40, match: str = "offsets") -> ProbeResult:
    """Greedy decoding with a KV cache, observing the newest query row of every step."""
    e = encode_probe(tokenizer, probe, copy_region)
    prompt_ids, answer_ids = e.prompt_ids, e.answer_ids
    s, n = len(prompt_ids), len(answer_ids)
    device = next(model.parameters()).device
    stop = _stop_ids(tokenizer)
    ids = torch.tensor([prompt_ids], device=device)
    past = None
    produced: list[int] = []
    steps: list[torch.Tensor] = []
    for j in range(max_new_tokens):
        if observer is not None:
            observer.want([s - 1 + j])
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        text = tokenizer.decode([tok])
        if tok in stop or "\n" in text:
            break
        produced.append(tok)
        if observer is not None:
            steps.append(observer.collect()[..., 0])
        ids = torch.tensor([[tok]], device=device)
    if observer is not None:
        observer.want([])
    generated = tokenizer.decode(produced, skip_special_tokens=True)
    em = generated.strip() == probe.value.strip()
    if observer is None:
        return ProbeResult(probe.id, s + n, n, generated, em, rouge1_recall(generated, probe.value),
                           None, torch.zeros(0))
    # nothing produced: empty recalls, which the caller counts as a zero score
    argmax = torch.stack(steps, dim=-1) if produced else None  # [L, H, N]
    recall, other, ceil, ceil_o = _score_steps(tokenizer, e, argmax, produced, match)
    return ProbeResult(probe.id, s + n, n, generated, em, rouge1_recall(generated, probe.value),
                       None, recall, ceil, ceil_o, other)


# --------------------------------------------------------------------------------------------
# Detection over a probe set
# --------------------------------------------------------------------------------------------

@dataclass
class Detection:
    scores_all: list[list[float]]  # mean over all probes
    scores_correct: list[list[float]] | None  # mean over probes passing the ROUGE filter
    n_correct: int  # probes passing the ROUGE filter
    probe_accuracy: float  # exact match rate
    mean_rouge1: float
    mean_answer_loss: float | None
    per_probe: list[dict]
    wall_s: float
    tokens: int
    match: str = "offsets"
    scores_other: list[list[float]] | None = None  # mean over all probes under the other match
    recall_ceiling: float = 1.0  # mean over probes of the oracle head's recall (this match)
    recall_ceiling_other: float = 1.0


def detect_retrieval_heads(model, tokenizer, probes: Sequence[Probe], n_layers: int, n_heads: int,
                           mode: str = "generate", copy_region: str = "value",
                           max_new_tokens: int = 40, rouge_threshold: float = 0.5,
                           progress=None, match: str = "offsets") -> Detection:
    """Mean per-head retrieval recall over `probes` (model from selection.models.load_selector)."""
    from selection.masking import set_observer

    if match not in MATCHES:
        raise ValueError(f"match '{match}' is not one of {list(MATCHES)}")
    observer = ArgmaxObserver(n_layers)
    total_all = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    total_ok = torch.zeros_like(total_all)
    total_other = torch.zeros_like(total_all)
    ceil, ceil_o = 0.0, 0.0
    n_ok, per_probe, tokens = 0, [], 0
    t0 = time.perf_counter()
    set_observer(model, observer)
    try:
        for p in probes:
            if mode == "teacher_forced":
                r = run_teacher_forced(model, tokenizer, p, observer, copy_region, match)
            else:
                r = run_generate(model, tokenizer, p, observer, copy_region, max_new_tokens, match)
            rec = r.recall if r.recall.numel() else torch.zeros(n_layers, n_heads, dtype=torch.float64)
            if tuple(rec.shape) != (n_layers, n_heads):
                raise RuntimeError(f"observer returned {tuple(rec.shape)} scores for a "
                                   f"{n_layers} x {n_heads} model")
            total_all += rec
            if r.recall_other.numel():
                total_other += r.recall_other
            ceil += r.ceiling
            ceil_o += r.ceiling_other
            ok = r.rouge1 > rouge_threshold
            if ok:
                total_ok += rec
                n_ok += 1
            st = r.stats()
            st["passes_filter"] = ok
            per_probe.append(st)
            tokens += r.n_tokens
            if progress is not None:
                progress.update(1, r.n_tokens)
    finally:
        set_observer(model, None)
    n = len(probes)
    losses = [s["answer_loss"] for s in per_probe if s["answer_loss"] is not None]
    return Detection(
        scores_all=(total_all / n).tolist(),
        scores_correct=(total_ok / n_ok).tolist() if n_ok else None,
        n_correct=n_ok,
        probe_accuracy=sum(s["exact_match"] for s in per_probe) / n,
        mean_rouge1=sum(s["rouge1"] for s in per_probe) / n,
        mean_answer_loss=(sum(losses) / len(losses)) if losses else None,
        per_probe=per_probe, wall_s=time.perf_counter() - t0, tokens=tokens, match=match,
        scores_other=(total_other / n).tolist(), recall_ceiling=ceil / n, recall_ceiling_other=ceil_o / n)


def value_repetition(probes: Sequence[Probe]) -> dict:
    """How often a value's words recur inside one probe's JSON: the generator's 20 phrases per
    slot recur several times in a ~1,000-token JSON, sentences of real text mostly do not. Mean over
    probes of (value slots / distinct values) and of the share of word 3-grams that repeat."""
    import json as _json

    from selection.repetition import repeated_ngram_fraction

    slots, distinct, rep = 0, 0, 0.0
    for p in probes:
        obj = _json.loads(p.prompt[p.prompt.index("{"):p.prompt.index("}\n\n") + 1])
        vals = list(obj.values())
        slots += len(vals)
        distinct += len(set(vals))
        rep += repeated_ngram_fraction(" ".join(vals))
    n = max(len(probes), 1)
    return {"value_slots": slots, "distinct_values_per_probe": distinct / n,
            "mean_value_3gram_repetition": rep / n}


def heads_document(det: Detection, cfg: DetectConfig, model_name: str, geometry: tuple[int, int, int],
                   fraction: float, count: int | None = None, seed: int = 0) -> dict:
    """The detect/heads.json payload (schema in the module docs of selection/heads.py).

    fraction / count: the `heads` group's size knob (one knob for what is marked and masked);
    seed: `heads.seed`, which orders tied scores (selection/heads.py)."""
    from selection.heads import n_selected, rank_heads, tie_at_cut, warn_tie

    n_layers, n_heads, n_kv = geometry
    if cfg.correctness_filter:
        if det.scores_correct is None:
            raise RuntimeError(
                f"detect.correctness_filter=true but none of {cfg.num_probes} probes has ROUGE-1 "
                f"recall > {cfg.rouge_threshold}; use detect.mode=teacher_forced or turn the filter off")
        scores = det.scores_correct
    else:
        scores = det.scores_all
    ranking = rank_heads(scores, seed=seed)
    k = n_selected(fraction, n_layers * n_heads, count)
    tie = tie_at_cut(scores, ranking, k)
    warn_tie("retrieval", tie, k, seed)
    probe_settings = {k2: v for k2, v in asdict(cfg).items() if k2 != "heatmap"}
    return {
        "model": model_name,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "scores": scores,
        "selected": [list(h) for h in ranking[:k]],
        "fraction": fraction,
        "count": count,
        "mode": cfg.mode,
        "match": det.match,
        "recall_ceiling": det.recall_ceiling,
        "recall_ceiling_definition": (
            "mean over probes of the share of the gold answer's tokens that some copy-region position "
            "holds under this match: the recall of an oracle copy head"),
        "other_match": {"match": MATCHES[1 - MATCHES.index(det.match)], "scores": det.scores_other,
                        "recall_ceiling": det.recall_ceiling_other},
        "probe_accuracy": det.probe_accuracy,
        "probe_accuracy_definition": (
            "greedy decoding returned exactly the value (stripped)" if cfg.mode == "generate" else
            "every answer token is the argmax prediction under teacher forcing (= greedy decoding "
            "reproduces the value's tokens)"),
        "num_probes": cfg.num_probes,
        "max_tokens": cfg.max_tokens,
        "ranking": [list(h) for h in ranking],
        "tie_seed": seed,
        "tie_at_cut": tie,
        "copy_region": cfg.copy_region,
        "correctness_filter": cfg.correctness_filter,
        "rouge_threshold": cfg.rouge_threshold,
        "n_passing_filter": det.n_correct,
        "scores_all": det.scores_all,
        "scores_correct": det.scores_correct,
        "mean_rouge1": det.mean_rouge1,
        "mean_answer_loss": det.mean_answer_loss,
        "probe_settings": probe_settings,
        "mean_probe_tokens": sum(p["n_tokens"] for p in det.per_probe) / max(len(det.per_probe), 1),
        "wall_s": det.wall_s,
        "tokens_per_s": det.tokens / det.wall_s if det.wall_s > 0 else None,
        "per_probe": det.per_probe,
    }


# --------------------------------------------------------------------------------------------
# Stage edge
# --------------------------------------------------------------------------------------------

def run(ctx) -> dict:
    """Stage `detect`: probes -> per-head retrieval scores -> detect/heads.json (+ heatmap)."""
    from attninf.config import build
    from attninf.manifest import write_json
    from attninf.progress import Progress
    from selection.heads import HeadsConfig
    from selection.heads import head_geometry
    from selection.models import ModelConfig, check_context, load_selector, precision_of
    from selection.probes import generate_probes, load_sentences, save_probes

    cfg = build(DetectConfig, ctx.cfg.get("detect"), "detect")
    mcfg = build(ModelConfig, ctx.cfg.get("model"), "model")
    hcfg = build(HeadsConfig, ctx.cfg.get("heads"), "heads")
    text_stats: dict = {}
    sentences = load_sentences(cfg.text_source, cfg.text_field, ctx.cfg.get("corpus"), cfg.text_docs,
                               text_stats)  # a bad source fails before the model loads
    model, tokenizer = load_selector(mcfg)
    check_context(cfg.max_tokens, model)
    geometry = head_geometry(model)
    n_layers, n_heads, _ = geometry

    t0 = time.perf_counter()
    probes = generate_probes(tokenizer, cfg.num_probes, cfg.max_tokens, cfg.seed, sentences,
                             cfg.shots, cfg.key_length, cfg.max_value_tokens, cfg.min_value_tokens,
                             cfg.instruction, cfg.json_layout)
    save_probes(ctx.out / "probes.jsonl", probes)
    log.info("detect: %d probes (%.0f tokens on average) in %.1fs; mode=%s", len(probes),
             sum(p.n_tokens for p in probes) / len(probes), time.perf_counter() - t0, cfg.mode)

    with Progress(len(probes), "detect", tracker=ctx.tracker, unit="probe", prefix="detect") as prog:
        det = detect_retrieval_heads(model, tokenizer, probes, n_layers, n_heads, cfg.mode,
                                     cfg.copy_region, cfg.max_new_tokens, cfg.rouge_threshold, prog,
                                     cfg.match)
    doc = heads_document(det, cfg, str(mcfg.path), geometry, hcfg.size_fraction, hcfg.count, hcfg.seed)
    doc["probe_text"] = {"source": cfg.text_source or "built-in generator", **text_stats,
                         **value_repetition(probes)}
    write_json(ctx.out / "heads.json", doc)
    figure = None
    if cfg.heatmap:
        from selection.figures_heads import plot_head_scores

        figure = plot_head_scores(doc["scores"], doc["selected"], ctx.out / "heatmap.png",
                                  title=f"retrieval scores ({cfg.mode}, {cfg.num_probes} probes)")
    summary = {
        "heads_json": "heads.json",
        "selected": doc["selected"],
        "probe_accuracy": det.probe_accuracy,
        "n_passing_filter": det.n_correct,
        "mean_rouge1": det.mean_rouge1,
        "mean_answer_loss": det.mean_answer_loss,
        "top_score": doc["scores"][doc["selected"][0][0]][doc["selected"][0][1]],
        "recall_ceiling": det.recall_ceiling,
        "detect_wall_s": det.wall_s,
        "heatmap": "heatmap.png" if figure else None,
        "precision": precision_of(model),
    }
    ctx.tracker.summary({f"detect/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    if figure:
        ctx.tracker.artifact(ctx.out / "heatmap.png", "figure", "detect-heatmap", reference=False)
    log.info("detect: selected %s; probe accuracy %.3f; recall ceiling %.3f (%s match); %.1fs",
             doc["selected"], det.probe_accuracy, det.recall_ceiling, det.match, det.wall_s)
    return summary
