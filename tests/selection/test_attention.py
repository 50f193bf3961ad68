"""causal_blocks against a written-out softmax, and through a real model against SDPA."""

from __future__ import annotations

import pytest
import torch

from selection import attention, masking, scoring
from tests.conftest import make_tiny_llama


def _softmax_attention(q, k, v, scale):
    """Written-out causal attention: repeat each KV group to its query heads, mask the future."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    t = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [B, T, H, D]


@pytest.mark.parametrize("t,chunk", [(1, 64), (37, 64), (64, 64), (150, 64), (150, 16), (33, 7)])
def test_causal_attention_matches_masked_softmax_fp64(t, chunk):
    g = torch.Generator().manual_seed(t * 100 + chunk)
    q = torch.randn(2, 6, t, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64)
    got = attention.causal_attention(q, k, v, 0.35, chunk=chunk)
    assert got.shape == (2, t, 6, 8)
    assert torch.allclose(got, _softmax_attention(q, k, v, 0.35), atol=1e-12, rtol=0)


def _pair(impl: str, seed: int = 0):
    a = make_tiny_llama(300, layers=3, seed=seed)
    a.set_attn_implementation(masking.register(impl))
    return a


@pytest.mark.parametrize("mode", [None, "uniform", "zero"])
def test_model_logits_match_sdpa_fp32(mode):
    """The whole model under causal_blocks == under SDPA (fp32), with and without masked heads."""
    blocks, sdpa = _pair("causal_blocks"), _pair("sdpa")
    ids = torch.randint(2, 300, (2, 150))  # three blocks of 64 queries
    heads = [(1, 0), (2, 3)]
    with torch.inference_mode():
        if mode:
            masking.set_masked_heads(blocks, heads, mode)
            masking.set_masked_heads(sdpa, heads, mode)
        got, want = blocks(input_ids=ids).logits, sdpa(input_ids=ids).logits
        masking.clear(blocks)
        plain = blocks(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-5
    if mode:  # the masked heads really changed the output (else the comparison is vacuous)
        assert (got - plain).abs().max().item() > 1e-4


def test_padding_masks_and_decoding_go_to_sdpa():
    """A padding mask or a KV-cache step is not the mask-free prefill: SDPA's path, same numbers."""
    blocks, sdpa = _pair("causal_blocks"), _pair("sdpa")
    ids = torch.randint(2, 300, (2, 40))
    pad = torch.ones(2, 40, dtype=torch.long)
    pad[1, :7] = 0  # left padding: a real 4D mask reaches the attention function
    with torch.inference_mode():
        got = blocks(input_ids=ids, attention_mask=pad).logits
        want = sdpa(input_ids=ids, attention_mask=pad).logits
        assert (got - want).abs().max().item() < 1e-5
        gen_b = blocks.generate(ids[:1], max_new_tokens=5, do_sample=False)
        gen_s = sdpa.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(gen_b, gen_s)


def test_scorer_under_causal_blocks_matches_naive_reference():
    m = _pair("causal_blocks")
    ref = _pair("eager")
    docs = [[(7 * i + j) % 290 + 2 for j in range(n)] for i, n in enumerate((90, 70, 70, 12, 5))]
    sc = scoring.BranchScorer(m, [(1, 1), (2, 0)])
    fb, fm = scoring.score_tokens(sc, docs, max_batch_tokens=200, max_batch_size=4, pad_id=0, max_padding=1.0)
    nb, nm = scoring.naive_losses(ref, docs, [(1, 1), (2, 0)])
    assert max(abs(a - b) for a, b in zip(fb + fm, nb + nm)) < 1e-5
    assert max(abs(a - b) for a, b in zip(fb, fm)) > 1e-5


def test_auto_picks_causal_blocks_on_cpu_only():
    from selection.models import resolve_attn_impl

    assert resolve_attn_impl("auto", torch.device("cpu")) == "causal_blocks"
    assert resolve_attn_impl("auto", torch.device("cuda")) == "sdpa"
    assert resolve_attn_impl("eager", torch.device("cpu")) == "eager"
