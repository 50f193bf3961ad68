"""Head masking vs an independent reference: a hand-written Llama forward with explicit weights.

The reference builds every head's attention matrix explicitly (softmax for normal heads; equal
weights 1/(visible positions) for uniform-masked heads; zeros for zero-masked heads) and never
calls transformers' attention code, so it checks the registered attention wrapper, the mask
builder registration (the transformers-5 pitfall) and GQA grouping at once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selection import masking
from tests.conftest import make_tiny_llama

HEADS = [(0, 1), (1, 0), (1, 3), (3, 2)]


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(model, ids, pad, heads, mode):
    """Explicit-weights forward. pad: [B, T] bool, True = real token (key padding mask)."""
    c = model.config
    H, KV = c.num_attention_heads, c.num_key_value_heads
    D = c.hidden_size // H
    theta = c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta
    B, T = ids.shape
    pos = torch.arange(T)
    masked = {}
    for layer, h in heads:
        masked.setdefault(layer, set()).add(h)
    x = model.model.embed_tokens.weight[ids]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for li, blk in enumerate(model.model.layers):
        a = blk.self_attn
        hs = _rms(x, blk.input_layernorm.weight, c.rms_norm_eps)
        q = (hs @ a.q_proj.weight.T).view(B, T, H, D).transpose(1, 2)
        k = (hs @ a.k_proj.weight.T).view(B, T, KV, D).transpose(1, 2)
        v = (hs @ a.v_proj.weight.T).view(B, T, KV, D).transpose(1, 2)
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        outs = []
        for h in range(H):
            g = h // (H // KV)
            visible = causal[None] & pad[:, None, :]  # [B, T, T]
            if h in masked.get(li, ()):
                if mode == "zero":
                    w = torch.zeros(B, T, T)
                else:
                    w = visible.float() / visible.float().sum(-1, keepdim=True).clamp(min=1)
            else:
                s = (q[:, h] @ k[:, g].transpose(-1, -2)) / D**0.5
                s = s.masked_fill(~visible, float("-inf"))
                w = torch.nan_to_num(torch.softmax(s, -1))
            outs.append(w @ v[:, g])
        att = torch.stack(outs, 2).reshape(B, T, H * D) @ a.o_proj.weight.T
        x = x + att
        hs = _rms(x, blk.post_attention_layernorm.weight, c.rms_norm_eps)
        m = blk.mlp
        x = x + (F.silu(hs @ m.gate_proj.weight.T) * (hs @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    x = _rms(x, model.model.norm.weight, c.rms_norm_eps)
    return x @ model.lm_head.weight.T


def _batch(vocab, padding_side):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, vocab, (3, 12), generator=g)
    lengths = [12, 7, 9]
    pad = torch.zeros(3, 12, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if padding_side == "right":
            pad[i, :n] = True
        else:
            pad[i, 12 - n:] = True
    return ids, pad


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["uniform", "zero"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_masked_forward_matches_explicit_reference(impl, mode, padding_side):
    model = make_tiny_llama(vocab_size=97, layers=4, heads=4, kv_heads=2, hidden=32).float()
    model.set_attn_implementation(masking.register(impl))
    ids, pad = _batch(97, padding_side)
    with torch.no_grad():
        ref_plain = reference_logits(model, ids, pad, [], mode)
        ref_masked = reference_logits(model, ids, pad, HEADS, mode)
        plain = model(input_ids=ids, attention_mask=pad.long()).logits
        with masking.mask_heads(model, HEADS, mode=mode):
            got = model(input_ids=ids, attention_mask=pad.long()).logits
        after = model(input_ids=ids, attention_mask=pad.long()).logits
    real = pad  # compare only at real-token positions; pad rows are undefined
    assert (plain - ref_plain)[real].abs().max() <= 1e-5
    assert (got - ref_masked)[real].abs().max() <= 1e-5
    assert (after - plain).abs().max() == 0  # masking is fully undone on exit
    assert (got - plain)[real].abs().max() > 1e-3  # and it did change something


def test_unpadded_causal_path_and_kv_cache_decoding():
    """No mask (pure causal, cumsum path) and one-token decoding steps with a KV cache."""
    model = make_tiny_llama(vocab_size=97, layers=4, heads=4, kv_heads=2, hidden=32).float()
    masking.install(model)
    ids = torch.randint(2, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    pad = torch.ones(2, 10, dtype=torch.bool)
    with torch.no_grad(), masking.mask_heads(model, HEADS):
        full = model(input_ids=ids).logits
        ref = reference_logits(model, ids, pad, HEADS, "uniform")
        out = model(input_ids=ids[:, :6], use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for t in range(6, 10):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert (full - ref).abs().max() <= 1e-5
    assert (torch.stack(steps[:-1], 1) - full[:, 5:9]).abs().max() <= 1e-5


def test_bad_heads_and_mode_are_rejected():
    model = make_tiny_llama(vocab_size=97, layers=2, heads=4, kv_heads=2, hidden=32)
    with pytest.raises(ValueError, match=r"head \[2, 0\] is outside the model \(2 layers x 4 heads"):
        masking.set_masked_heads(model, [(2, 0)])
    with pytest.raises(ValueError, match="masking mode 'mean' unknown"):
        masking.set_masked_heads(model, [(0, 0)], mode="mean")


def test_observer_sees_every_layer():
    model = make_tiny_llama(vocab_size=97, layers=3, heads=4, kv_heads=2, hidden=32)
    seen = []
    masking.set_observer(model, lambda mod, q, k, v, m, s: seen.append((mod.layer_idx, tuple(q.shape), tuple(k.shape))))
    with torch.no_grad():
        model(input_ids=torch.randint(2, 97, (1, 5)))
    masking.set_observer(model, None)
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] == (1, 4, 5, 8) and seen[0][2] == (1, 2, 5, 8)


# --- CUDA (marker `gpu`: `pytest -m gpu` on a GPU machine; skipped elsewhere) ----------------------

def cuda(fn):
    """Mark a test as a CUDA check: selected by `-m gpu`, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn))


@cuda
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["uniform", "zero"])
def test_masking_on_cuda_fp32_matches_reference(impl, mode):
    model = make_tiny_llama(vocab_size=97, layers=4, heads=4, kv_heads=2, hidden=32).float()
    ids, pad = _batch(97, "left")
    with torch.no_grad():
        ref = reference_logits(model, ids, pad, HEADS, mode)
        model.cuda().set_attn_implementation(masking.register(impl))
        with masking.mask_heads(model, HEADS, mode=mode):
            got = model(input_ids=ids.cuda(), attention_mask=pad.long().cuda()).logits.cpu()
    # TF32 may be on for cuda matmuls; allow for it
    assert (got - ref)[pad].abs().max() <= 2e-3


@cuda
def test_masking_bf16_close_to_fp32():
    model = make_tiny_llama(vocab_size=97, layers=4, heads=4, kv_heads=2, hidden=64).float()
    ids, pad = _batch(97, "right")
    with torch.no_grad():
        ref = reference_logits(model, ids, pad, HEADS, "uniform")
        model = model.to("cuda", torch.bfloat16)
        model.set_attn_implementation(masking.register("sdpa"))
        with masking.mask_heads(model, HEADS):
            got = model(input_ids=ids.cuda(), attention_mask=pad.long().cuda()).logits.float().cpu()
    assert (got - ref)[pad].abs().max() <= 0.05
