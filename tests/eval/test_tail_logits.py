"""The loglikelihood path that runs the lm_head on the batch's tail (eval.harness._scored_tail)
against lm-eval's own HFLM, which computes logits at every position, on the same requests."""

from __future__ import annotations

import random

import pytest
import torch

from attninf.config import build
from eval import harness
from eval.config import EvalConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _requests(vocab: int) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """Shapes that break a wrong tail: mixed lengths in one batch, contexts shared by 1-token
    continuations (lm-eval's one-token logits cache), multi-token continuations, a context cut
    from the left, a context ending in token 0 (lm-eval's padding id) and a continuation of 0s."""
    rng = random.Random(0)
    toks = lambda n: [rng.randrange(1, vocab) for _ in range(n)]  # noqa: E731
    reqs = []
    shared = toks(40)
    for opt in range(4):  # MMLU-like: one context, four one-token options
        reqs.append(((f"shared", f"opt{opt}"), shared, [1 + opt]))
    for i, (n_ctx, n_cont) in enumerate([(5, 1), (30, 7), (90, 2), (17, 17), (200, 3), (63, 1)]):
        reqs.append(((f"r{i}", ""), toks(n_ctx), toks(n_cont)))
    reqs.append((("zero-ctx", ""), toks(12) + [0, 0], toks(3)))
    reqs.append((("zero-cont", ""), toks(9), [0, 0]))
    return reqs


def test_tail_logits_match_lm_evals_full_logits(tiny_model_dir):
    from lm_eval.models.huggingface import HFLM

    e = build(EvalConfig, {"dtype": "float32", "device": "cpu", "max_length": 128, "batch_size": 4}, "eval")
    model, tok = harness.load_model(str(tiny_model_dir), "float32", "cpu")
    ours = harness.make_lm(model, tok, e)
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=128)
    reqs = _requests(model.config.vocab_size)

    got = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    want = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert len(got) == len(want) == len(reqs)
    for (key, _, _), (ll, greedy), (ll_ref, greedy_ref) in zip(reqs, got, want):
        assert ll == pytest.approx(ll_ref, abs=1e-4, rel=1e-5), key
        assert greedy == greedy_ref, key


def test_the_lm_head_sees_a_fraction_of_the_positions(tiny_model_dir):
    """MMLU-like requests (100-120 token prompts, one-token answers, some 12-token ones): lm-eval
    batches similar lengths together, so the tail is a few positions per row."""
    e = build(EvalConfig, {"dtype": "float32", "device": "cpu", "max_length": 128, "batch_size": 8}, "eval")
    model, tok = harness.load_model(str(tiny_model_dir), "float32", "cpu")
    ours = harness.make_lm(model, tok, e)
    rng = random.Random(1)
    reqs = [((f"q{i}", ""), [rng.randrange(1, 200) for _ in range(rng.randrange(100, 121))],
             [rng.randrange(1, 200) for _ in range(1 if i % 4 else 12)]) for i in range(32)]
    positions = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, a, out: positions.append(a[0].shape[0] * a[0].shape[1]))
    try:
        ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    finally:
        hook.remove()
    full = sum(len(c) + len(x) - 1 for _, c, x in reqs)
    assert 0 < sum(positions) < full / 3


def test_tail_positions_bounds_every_rows_continuation():
    inps = torch.tensor([[5, 6, 7, 8, 9, 0, 0],     # ends at 5
                         [1, 2, 3, 0, 0, 0, 0],     # ends at 3
                         [4, 4, 4, 4, 4, 4, 4]])    # ends at 7
    assert harness.tail_positions(inps, 2) == 7 - (3 - 2)   # the shortest row's continuation
    assert harness.tail_positions(inps, 3) is None          # reaches position 0: keep everything
    assert harness.tail_positions(inps, None) is None
    assert harness.tail_positions(torch.zeros(2, 6, dtype=torch.long), 1) is None  # no real token
