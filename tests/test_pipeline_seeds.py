"""`attninf +experiment=smoke` with pretraining seeds: two arms x two seeds, evaluated after and
before the LR decay, through the real CLI; the report's deltas are seed-aware (crossed bootstrap)
and equal an independent read of the per-item samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import attninf

SEED_ARMS = ["baseline", "attention_influence"]


@pytest.fixture(scope="module")
def seeds_run(env, corpus, tmp_path_factory) -> Path:
    """Two arms x two pretraining seeds, each evaluated after and before the LR decay.

    A run of its own (not the smoke run's folders), so this module and
    tests/test_pipeline_smoke.py can run on two workers at once (`pytest -n 2`, the Makefile's
    default): detection, scoring and selection with the random selector take seconds; the
    mixture, 4 pretrainings and 8 evaluations are what this test is about.
    """
    sr = tmp_path_factory.mktemp("seeds") / "run"
    attninf(["+experiment=smoke", f"run_dir={sr}", corpus, "~arms.random", "pretrain.seeds=[0,1]",
             "pretrain.export_pre_decay=true", "eval.pre_decay=true",
             "stages=[detect,score,select,mix,pretrain,eval,report]"], env, sr.parent, timeout=1800)
    return sr


def _item_means(eval_dir: Path, task: str, key: str) -> tuple[float, int]:
    """Independent read of one task's score: mean over every leaf's per-item values."""
    name, filt = key.split(",", 1)
    vals = []
    files = (sorted(f for f in (eval_dir / "samples").glob("mmlu_*.jsonl") if not f.name.startswith("mmlu_bpb"))
             if task == "mmlu" else [eval_dir / "samples" / f"{task}.jsonl"])
    for f in files:
        vals += [json.loads(x)[name] for x in f.read_text().splitlines() if json.loads(x)["filter"] == filt]
    return sum(vals) / len(vals), len(vals)


def test_seeds_and_pre_decay_give_seed_aware_paired_deltas(seeds_run):
    run = seeds_run
    for a in SEED_ARMS:
        for s in (0, 1):
            name = f"{a}@seed{s}"
            frozen = OmegaConf.load(run / "pretrain" / name / "config.yaml")  # what training read
            assert frozen.pretrain.seed == s and frozen.pretrain.seeds is None  # init + data order
            assert (run / "pretrain" / name / "hf_pre_decay" / "config.json").exists()
            assert (run / "eval" / name / "pre_decay" / "results.json").exists()
    w0 = (run / "pretrain/baseline@seed0/metrics.jsonl").read_text().splitlines()[0]
    w1 = (run / "pretrain/baseline@seed1/metrics.jsonl").read_text().splitlines()[0]
    assert json.loads(w0)["loss"] != json.loads(w1)["loss"]  # another init / data order

    deltas = json.loads((run / "report/deltas.json").read_text())
    small = [r for r in deltas if r.get("unit")]
    assert {(r["task"], r["phase"]) for r in small} >= {("gsm8k_bpb", "final"), ("gsm8k_bpb", "pre_decay")}
    for r in small:  # bits per byte with seeds: crossed interval, seed-aware test
        assert r["seeds"] == [0, 1] and "crossed" in r["ci_method"] and r["ci_low"] - 1e-9 <= r["delta"] <= r["ci_high"] + 1e-9
        assert r["test"].startswith(("crossed t", "no test"))
    deltas = [r for r in deltas if not r.get("unit")]
    assert {(r["task"], r["phase"]) for r in deltas} == {(t, p) for t in ("mmlu", "gsm8k", "humaneval")
                                                         for p in ("final", "pre_decay")}
    for r in deltas:
        assert r["arm"] == "attention_influence" and r["seeds"] == [0, 1]
        assert "crossed" in r["ci_method"] and r["ci_low"] <= r["delta"] <= r["ci_high"]
        sub = "" if r["phase"] == "final" else "pre_decay"
        per = {a: [_item_means(run / "eval" / f"{a}@seed{s}" / sub, r["task"], r["metric"]) for s in (0, 1)]
               for a in SEED_ARMS}
        assert r["n_items"] == per["baseline"][0][1]
        assert r["arm_per_seed"] == pytest.approx([100 * m for m, _ in per["attention_influence"]])
        assert r["baseline_per_seed"] == pytest.approx([100 * m for m, _ in per["baseline"]])
        want = sum(100 * (per["attention_influence"][s][0] - per["baseline"][s][0]) for s in (0, 1)) / 2
        assert r["delta"] == pytest.approx(want)
    pre = {r["task"]: r for r in deltas if r["phase"] == "pre_decay"}
    assert pre["mmlu"]["paper_delta"] == pytest.approx(45.10 - 41.76) and pre["humaneval"]["paper_delta"] is None
    md = (run / "report/report.md").read_text()
    assert "2 pretraining seeds per arm" in md and "crossed bootstrap" in md
    before = md[md.index("## Before decay"):md.index("## Power")]
    assert "| MMLU | 41.76 | 45.10 | +3.34 |" in before and "(2 seeds)" in before
