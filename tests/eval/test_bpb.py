"""BPB tasks (eval/tasks/bpb.py): lm-eval's numbers against a plain-transformers computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attninf.config import build
from eval import harness
from eval.config import EvalConfig
from eval.tasks import bpb

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_scored_text_moves_the_contexts_trailing_whitespace():
    assert bpb.scored_text("Question: q\nAnswer:", " 42") == " 42"
    assert bpb.scored_text('def f():\n    """doc"""\n', "    return 1\n") == '\n    return 1\n'
    assert bpb.scored_text("Answer:", "Paris", " ") == " Paris"
    assert bpb.bits_per_byte(-math.log(2) * 6, "é!x") == pytest.approx(1.5)  # 6 bits over 4 bytes


def test_mmlu_p_correct_is_the_softmax_over_the_options():
    doc = {"question": "q", "choices": ["a", "bb", "c", "d"], "answer": 1}
    got = bpb.process_mmlu(doc, [(-1.0, False), (-2.0, False), (-3.0, False), (-4.0, False)])
    z = sum(math.exp(-k) for k in (1, 2, 3, 4))
    assert got["p_correct"] == pytest.approx(math.exp(-2) / z)
    assert got["bpb"] == pytest.approx(2.0 / math.log(2) / 3)  # " bb" = 3 bytes


def _reference_bpb(model, tok, context: str, target: str) -> float:
    """Sum of the target's token NLLs / ln 2 / UTF-8 bytes, with plain transformers.

    Written from scratch: context and context+target tokenised whole, the target's tokens are
    those past the context's (after moving the context's trailing whitespace onto the target).
    """
    ws = context[len(context.rstrip()):]
    ctx, tgt = context[:len(context) - len(ws)], ws + target
    ids_ctx = tok(ctx, add_special_tokens=False)["input_ids"]
    ids = tok(ctx + tgt, add_special_tokens=False)["input_ids"]
    assert ids[:len(ids_ctx)] == ids_ctx
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    nll = -sum(float(logp[i - 1, ids[i]]) for i in range(len(ids_ctx), len(ids)))
    return nll / math.log(2) / len(tgt.encode("utf-8"))


def test_bpb_tasks_match_an_independent_computation(tiny_model_dir, offline_dir, tmp_path):
    e = build(EvalConfig, {"offline_data": str(offline_dir), "dtype": "float32", "device": "cpu", "limit": 2,
                           "max_length": 4096, "batch_size": 4, "default_fewshot": 0,
                           "tasks": ["gsm8k_bpb", "humaneval_bpb", "mmlu_bpb"], "task_limit": {"mmlu_bpb": 1}},
              "eval")
    tp, data = harness.plan(e, tmp_path)
    assert tp.tasks == ["gsm8k_bpb", "humaneval_bpb", "mmlu_bpb"]
    assert len([k for k in tp.leaves if k.startswith("mmlu_bpb_")]) == 57
    model, tok = harness.load_model(str(tiny_model_dir), "float32", "cpu")
    res = harness.run_suite(harness.make_lm(model, tok, e), e, tp, tmp_path / "out")
    harness.save_results(res, tmp_path / "out", {})
    r = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert set(r["mmlu_bpb"]) >= {"bpb,none", "p_correct,none"}
    checked = 0
    for leaf, target_of in (("gsm8k_bpb", lambda d: " " + d["answer"]),
                            ("humaneval_bpb", lambda d: d["canonical_solution"]),
                            ("mmlu_bpb_anatomy", lambda d: " " + d["choices"][d["answer"]])):
        rows = [json.loads(x) for x in (tmp_path / "out" / "samples" / f"{leaf}.jsonl").read_text().splitlines()]
        assert len(rows) == (1 if leaf.startswith("mmlu") else 2)
        for row in rows:
            doc = row["doc"]
            pairs = row["arguments"]  # [[context, continuation], ...]: one per request
            gold = doc["answer"] if leaf.startswith("mmlu") else 0
            context, scored = pairs[gold]
            assert len(pairs) == (4 if leaf.startswith("mmlu") else 1)
            assert scored == target_of(doc)  # exactly one space between "Answer:" and the answer
            assert context.endswith("Answer:") or leaf == "humaneval_bpb"
            ref = _reference_bpb(model, tok, context, target_of(doc))
            assert row["bpb"] == pytest.approx(ref, rel=1e-4), leaf
            checked += 1
        # the task's value is the mean of the items'
        assert r[leaf]["bpb,none"] == pytest.approx(np.mean([x["bpb"] for x in rows]), rel=1e-9)
    assert checked == 5
    # a random model spreads its mass: the gold option's probability is about 1/4
    assert 0.1 < r["mmlu_bpb"]["p_correct,none"] < 0.5


def test_a_continuation_longer_than_the_window_is_scored_in_windows(tiny_model_dir, offline_dir, tmp_path):
    """The tiny BPE splits a HumanEval solution into more tokens than a 128-token window: scored in
    chunks of 64, each conditioned on the 128 tokens before its end, against a direct computation."""
    e = build(EvalConfig, {"offline_data": str(offline_dir), "dtype": "float32", "device": "cpu", "limit": 1,
                           "max_length": 128, "batch_size": 4, "tasks": ["humaneval_bpb", "gsm8k_bpb"],
                           "task_limit": {"humaneval_bpb": 2}}, "eval")
    tp, _ = harness.plan(e, tmp_path)
    model, tok = harness.load_model(str(tiny_model_dir), "float32", "cpu")
    lm = harness.make_lm(model, tok, e)
    res = harness.run_suite(lm, e, tp, tmp_path / "out")
    assert res["attninf_truncated"]["humaneval_bpb"] == {"cut": 2, "requests": 2}
    # eval.task_limit: two HumanEval items, one GSM8K item (two lm-eval calls, one result dict)
    assert len(res["samples"]["humaneval_bpb"]) == 2 and len(res["samples"]["gsm8k_bpb"]) == 1
    assert set(res["results"]) == {"humaneval_bpb", "gsm8k_bpb"} and set(res["n-samples"]) == set(res["results"])
    for row in res["samples"]["humaneval_bpb"]:
        context, target = row["arguments"][0]
        ws = context[len(context.rstrip()):]
        ctx_ids = tok(context[:len(context) - len(ws)], add_special_tokens=False)["input_ids"]
        whole = tok(context + target, add_special_tokens=False)["input_ids"]
        assert len(whole) - len(ctx_ids) > 128
        nll = 0.0
        for start in range(len(ctx_ids), len(whole), 64):
            end = min(start + 64, len(whole))
            win = whole[max(0, end - 129):end]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([win[:-1]])).logits[0].double(), -1)
            off = end - len(win)  # whole index of win[0]; win[j] is predicted by logits row j - 1
            nll -= sum(float(logp[t - off - 1, whole[t]]) for t in range(start, end))
        ref = nll / math.log(2) / len((ws + target).encode("utf-8"))
        assert row["bpb"] == pytest.approx(ref, rel=1e-4)
