"""The scoring core against obviously-correct references (full logits, one doc at a time)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from selection import masking, scoring
from tests.conftest import make_tiny_llama

HEADS = [(1, 0), (2, 3), (3, 1)]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    m = make_tiny_llama(len(tiny_tokenizer), layers=4)
    masking.install(m)
    return m


def _docs(n=9, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(2, 70))] for _ in range(n)]


def test_chunked_ce_matches_full_logits():
    torch.manual_seed(0)
    h = torch.randn(37, 16)
    w = torch.randn(50, 16)
    y = torch.randint(0, 50, (37,))
    ref = F.cross_entropy(h @ w.T, y, reduction="none")
    for chunk in (1, 5, 37, 100):
        for gemm_rows in (1, 8, 256):  # GEMM blocks larger than, equal to, not a multiple of chunk
            assert torch.allclose(scoring.chunked_token_ce(h, w, y, chunk, gemm_rows=gemm_rows), ref, atol=1e-5)


def test_plan_batches_covers_once_under_budget():
    lengths = [5, 50, 7, 50, 3, 200, 9, 9]
    batches = scoring.plan_batches(lengths, max_batch_tokens=100, max_batch_size=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
    # longest first, ties by index; [0] and [4] stay apart (padding 0.2 > max_padding 0.1)
    assert batches == [[5], [1, 3], [6, 7, 2], [0], [4]]


def test_plan_batches_bounds_padding():
    lengths = [100, 98, 97, 60, 59, 20, 19, 18]
    for b in scoring.plan_batches(lengths, max_batch_tokens=10_000, max_batch_size=64, max_padding=0.1):
        real = sum(lengths[i] for i in b)
        assert len(b) == 1 or 1 - real / (len(b) * max(lengths[i] for i in b)) <= 0.1
    assert len(scoring.plan_batches(lengths, 10_000, 64, max_padding=1.0)) == 1


@pytest.mark.parametrize("share_prefix", [True, False])
def test_fast_path_matches_naive_reference_fp32(model, share_prefix):
    docs = _docs()
    sc = scoring.BranchScorer(model, HEADS, share_prefix=share_prefix, ce_chunk=16)
    # max_padding=1: wide, heavily right-padded batches (the scorer passes no padding mask)
    fb, fm = scoring.score_tokens(sc, docs, max_batch_tokens=150, max_batch_size=4, pad_id=0, max_padding=1.0)
    assert max(len(b) for b in scoring.plan_batches([len(d) for d in docs], 150, 4, 1.0)) > 1
    nb, nm = scoring.naive_losses(model, docs, HEADS)
    assert max(abs(a - b) for a, b in zip(fb, nb)) < 1e-5
    assert max(abs(a - b) for a, b in zip(fm, nm)) < 1e-5
    # the masked heads really change the loss (else the test could not fail)
    assert max(abs(a - b) for a, b in zip(fb, fm)) > 1e-5


def test_naive_reference_is_two_plain_forwards(model):
    """The reference itself against a hand-written loss (log-softmax + gather)."""
    doc = _docs(1, seed=3)[0]
    ids = torch.tensor([doc])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    want = -lp.gather(1, ids[0, 1:, None]).mean().item()
    nb, _ = scoring.naive_losses(model, [doc], HEADS)
    assert abs(nb[0] - want) < 1e-5


def test_no_heads_means_zero_score(model):
    docs = _docs(3)
    sc = scoring.BranchScorer(model, [])
    fb, fm = scoring.score_tokens(sc, docs, max_batch_tokens=200, max_batch_size=8, pad_id=0)
    assert fb == fm and sc.split is None


def test_onednn_routed_fp32_matches_naive_reference(tiny_tokenizer):
    """dtype auto's `linear: onednn` (selection.onednn_linear), lm_head included, at fp32 tolerance."""
    from selection import onednn_linear

    if not onednn_linear.available():
        pytest.skip("torch built without oneDNN")
    ref = make_tiny_llama(len(tiny_tokenizer), layers=4)
    fast = make_tiny_llama(len(tiny_tokenizer), layers=4)
    onednn_linear.route(fast)
    docs = _docs()
    fb, fm = scoring.score_tokens(scoring.BranchScorer(fast, HEADS), docs, max_batch_tokens=200,
                                  max_batch_size=8, pad_id=0)
    nb, nm = scoring.naive_losses(ref, docs, HEADS)
    assert max(abs(a - b) for a, b in zip(fb, nb)) < 1e-5
    assert max(abs(a - b) for a, b in zip(fm, nm)) < 1e-5


def test_bf16_path_close_to_fp32_reference(tiny_tokenizer):
    ref = make_tiny_llama(len(tiny_tokenizer), layers=4)
    fast = make_tiny_llama(len(tiny_tokenizer), layers=4).to(torch.bfloat16)
    docs = _docs()
    sc = scoring.BranchScorer(fast, HEADS)
    fb, fm = scoring.score_tokens(sc, docs, max_batch_tokens=150, max_batch_size=4, pad_id=0)
    nb, _ = scoring.naive_losses(ref, docs, HEADS)
    assert max(abs(a - b) for a, b in zip(fb, nb)) < 0.05  # bf16 weights, fp32 loss
    assert all(isinstance(x, float) for x in fb + fm)


def test_encode_truncates_and_bos_policies(tiny_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 10
    (ids, full), = scoring.encode(tiny_tokenizer, [text], 8, "always")
    assert len(ids) == 8 and full > 8 and ids[0] == tiny_tokenizer.bos_token_id
    (raw, full2), = scoring.encode(tiny_tokenizer, [text], 10_000, "never")
    assert raw[0] != tiny_tokenizer.bos_token_id and full2 == full - 1
    with pytest.raises(ValueError):
        scoring.encode(tiny_tokenizer, [text], 8, "sometimes")


def test_ai_score_formula():
    assert scoring.ai_score(2.0, 2.5) == pytest.approx(0.25)


@pytest.mark.parametrize("heads", [[(2, 1), (3, 0)], []])
def test_branch_flops_match_a_flop_counter_on_the_real_forward(tiny_tokenizer, heads):
    """Counted from the shape == what torch's FlopCounterMode sees the fast path execute.

    Eager attention computes the full T x T score matrix (the counter sees 4*H*hd*T^2 per
    layer pass); branch_flops counts only the causal half actually needed, T(T+1)/2. With
    eager's explicit 4D mask each masked head's running mean is a [T, T] @ [T, hd] matmul
    (2*T^2*hd, left out of branch_flops: under SDPA's mask-free path it is a cumsum).
    """
    from torch.utils.flop_counter import FlopCounterMode

    m = make_tiny_llama(len(tiny_tokenizer), layers=4)
    m.set_attn_implementation("eager")
    sc = scoring.BranchScorer(m, heads)
    t = 37
    ids = torch.randint(2, 300, (1, t))
    with FlopCounterMode(display=False) as fc:
        sc.losses(ids, torch.tensor([t]))
    got = scoring.branch_flops(m.config, [t], sc.split)
    cfg = m.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    passes = 4 if not heads else 2 + 2 * 2  # layers 0-1 once, 2-3 twice
    full_attn = 4 * cfg.num_attention_heads * hd * t * t * passes
    assert got["attention"] == 4 * cfg.num_attention_heads * hd * t * (t + 1) // 2 * passes
    running_mean = 2 * t * t * hd * len(heads)
    assert fc.get_total_flops() == got["linear"] + got["lm_head"] + full_attn + running_mean
