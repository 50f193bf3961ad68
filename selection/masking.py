"""Head masking as a registered transformers attention function (no fork of any model file).

The paper disables a retrieval head by giving it equal attention weights over the positions it
may see (PAPER.md section 2). Under a causal mask query i sees i+1 positions, so the masked
head's output at i is the running mean of its value vectors v_0..v_i. With GQA those are the
values of the KV group the query head belongs to.

How it hooks in: `attninf_<base>` wraps a base implementation (causal_blocks, sdpa, eager,
flash_attention_2).
It runs the base kernel for all heads (fused, fast), then overwrites the output of the masked
heads of that layer with the uniform (or zero) output. Which heads are masked is plain state on
each attention module, so toggling costs nothing: the scorer flips it between its base and
masked passes on one model in memory.

The uniform output is computed from the attention mask the layer receives, so padding, packed
sequences (block-diagonal masks) and KV-cache decoding are all respected:
- mask None (pure causal, no padding): cumulative sum of values, O(T) per head;
- 2D key-padding mask (flash-attention): padding-weighted cumulative sum;
- 4D bool / additive mask (sdpa, eager): explicit allowed-matrix @ values, O(T^2) but only for
  the few masked heads (5% of heads by default).

A transformers 5 pitfall (OFFLINE.md): a custom attention name gets `attention_mask=None` unless
a mask builder is registered under the same name; we register the base's builder, otherwise
eager would silently attend to future tokens.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from selection import attention
from selection.heads import MASK_MODES, check_heads  # the one list of modes, the one head validator

PREFIX = "attninf_"

Observer = Callable[..., None]


def wrapper_name(base: str) -> str:
    base = base.removeprefix(PREFIX)
    return PREFIX + base


def _base_fn(base: str, module: torch.nn.Module) -> Callable:
    if base == "eager":
        # eager is model-specific: each modeling file defines its own eager_attention_forward.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def register(base: str) -> str:
    """Register `attninf_<base>` (idempotent) and return its name."""
    name = wrapper_name(base)
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    attention.register()  # causal_blocks is a base like sdpa (idempotent)
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation '{base}' is not available here "
                         f"(known: eager, {', '.join(ALL_ATTENTION_FUNCTIONS.keys())})")

    def wrapped(module, query, key, value, attention_mask, **kwargs):
        observer = getattr(module, "_attninf_observer", None)
        if observer is not None:
            observer(module, query, key, value, attention_mask, kwargs.get("scaling"))
        out, weights = _base_fn(base, module)(module, query, key, value, attention_mask, **kwargs)
        heads = getattr(module, "_attninf_heads", None)
        if heads is not None:
            if kwargs.get("cu_seq_lens_q") is not None:
                raise NotImplementedError("head masking with varlen flash-attention packing is not "
                                          "supported: pass an explicit 4D block-diagonal mask instead")
            out = masked_output(out, value, attention_mask, heads, module._attninf_mode)
        return out, weights

    AttentionInterface.register(name, wrapped)
    mask_base = base if base in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_base])
    return name


def uniform_values(value: torch.Tensor, attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor:
    """Mean of the visible value vectors for each query row, in fp32.

    value: [B, m, Tk, D] (already gathered per masked head); returns [B, m, q_len, D].
    Queries are the last q_len of the Tk key positions (true for prefill and KV-cache decoding).
    """
    v = value.float()
    b, m, tk, d = v.shape
    if attention_mask is None or attention_mask.dim() == 2:
        if attention_mask is None:
            valid = torch.ones(b, tk, device=v.device)
        else:
            valid = attention_mask[:, -tk:].to(v.device).float()
        num = (v * valid[:, None, :, None]).cumsum(dim=2)[:, :, tk - q_len:]
        cnt = valid.cumsum(dim=1)[:, tk - q_len:]
        return num / cnt.clamp(min=1)[:, None, :, None]
    mask = attention_mask
    if mask.dtype == torch.bool:
        allowed = mask
    else:  # additive: 0 where allowed, a very negative number (or -inf) where not
        allowed = mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed[..., -q_len:, -tk:].float()  # [B|1, 1, q, Tk]
    num = torch.matmul(allowed, v)  # broadcasts over the head dim
    cnt = allowed.sum(-1, keepdim=True).clamp(min=1)
    return num / cnt


def masked_output(out: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                  heads: torch.Tensor, mode: str) -> torch.Tensor:
    """Replace the masked heads' columns of `out` [B, Tq, H, D] (attention output before o_proj)."""
    b, q_len, n_heads, d = out.shape
    if mode == "zero":
        repl = torch.zeros(b, q_len, heads.numel(), d, dtype=out.dtype, device=out.device)
    else:
        n_rep = n_heads // value.shape[1]
        v = value.index_select(1, heads // n_rep)  # each query head's own KV group
        repl = uniform_values(v, attention_mask, q_len).transpose(1, 2).to(out.dtype)
    return out.index_copy(2, heads, repl)


# --- model-level state -------------------------------------------------------------------------

def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """layer index -> self-attention module, for any HF decoder whose attention has layer_idx."""
    found = {}
    for mod in model.modules():
        idx = getattr(mod, "layer_idx", None)
        if idx is not None and hasattr(mod, "o_proj") and mod.__class__.__name__.endswith("Attention"):
            found[int(idx)] = mod
    return dict(sorted(found.items()))


def base_implementation(model: torch.nn.Module) -> str:
    """The attention implementation under the masking wrapper (what `auto` resolved to)."""
    return (model.config._attn_implementation or "sdpa").removeprefix(PREFIX)


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Switch `model` to the masking-capable wrapper of its current attention implementation."""
    current = model.config._attn_implementation or "sdpa"
    if not current.startswith(PREFIX):
        model.set_attn_implementation(register(current))
    return model


def _geometry(model) -> tuple[int, int]:
    cfg = model.config
    return cfg.num_hidden_layers, cfg.num_attention_heads


def validate_heads(model, heads: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """`heads` as (layer, head) ints, each inside the model (heads.check_heads' ConfigError)."""
    out = [(int(layer), int(head)) for layer, head in heads]
    check_heads(out, *_geometry(model), "masked heads")
    return out


def set_masked_heads(model: torch.nn.Module, heads: Iterable[tuple[int, int]], mode: str = "uniform") -> None:
    """Mask `heads` in every following forward until clear(); replaces any previous head set."""
    if mode not in MASK_MODES:
        raise ValueError(f"masking mode '{mode}' unknown; use one of {MASK_MODES}")
    if not model.config._attn_implementation.startswith(PREFIX):
        install(model)
    heads = validate_heads(model, heads)
    modules = attention_modules(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    for layer, mod in modules.items():
        hs = by_layer.get(layer)
        mod._attninf_heads = (torch.tensor(sorted(set(hs)), dtype=torch.long, device=mod.o_proj.weight.device)
                              if hs else None)
        mod._attninf_mode = mode


def clear(model: torch.nn.Module) -> None:
    for mod in attention_modules(model).values():
        mod._attninf_heads = None


def set_observer(model: torch.nn.Module, fn: Observer | None) -> None:
    """Call fn(module, query, key, value, attention_mask, scaling) inside every attention call."""
    if fn is not None and not model.config._attn_implementation.startswith(PREFIX):
        install(model)
    for mod in attention_modules(model).values():
        mod._attninf_observer = fn


@contextmanager
def mask_heads(model: torch.nn.Module, heads: Iterable[tuple[int, int]], mode: str = "uniform"):
    set_masked_heads(model, heads, mode)
    try:
        yield model
    finally:
        clear(model)


def first_masked_layer(heads: Iterable[tuple[int, int]]) -> int | None:
    """Layers below this one are identical with and without masking (the scorer shares them)."""
    layers = [int(layer) for layer, _ in heads]
    return min(layers) if layers else None
