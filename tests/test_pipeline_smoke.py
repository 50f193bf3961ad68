"""`attninf +experiment=smoke` end to end through the real CLI: every stage, resume, a sweep.

The smoke preset is the demo with a seeded random 4-layer selector (model.path=random:tiny) and
a tiny Megatron model per arm, on the demo corpus capped at 25 documents per domain. The numbers
are noise; what is checked is that the stages hand each other real artifacts, that a re-run
recomputes nothing, that a killed run resumes at shard granularity, and that a sweep over the
selection ratio shares one scoring.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import attninf

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["detect", "mirror", "score", "select", "eval_masked", "mix", "pretrain", "eval", "report"]
ARMS = ["baseline", "attention_influence", "random"]


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, env, corpus) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("smoke")
    run = work / "run"
    p = attninf(["+experiment=smoke", f"run_dir={run}", corpus], env, work)
    return run, p


def corpus_sizes(corpus_override: str, cap: int = 25) -> dict[str, int]:
    """Documents per domain after the smoke preset's cap (the builder's fallbacks vary by machine)."""
    folder = Path(corpus_override.split("[", 1)[1].rsplit("/", 1)[0])
    sizes = {f.stem: min(cap, sum(1 for _ in f.open())) for f in folder.glob("*.jsonl")}
    assert len(sizes) == 4
    return sizes


def test_every_stage_hands_real_artifacts_to_the_next(smoke_run, corpus):
    run, _ = smoke_run
    for s in ["detect", "mirror", "score", "select", "mix", "eval_masked", "report"]:
        assert manifest(run / s)["status"] == "done", s
    for s in ["pretrain", "eval"]:
        for a in ARMS:
            assert manifest(run / s / a)["status"] == "done", (s, a)

    heads = json.loads((run / "detect/heads.json").read_text())
    assert (heads["n_layers"], heads["n_heads"], heads["n_kv_heads"]) == (4, 4, 2)
    assert len(heads["selected"]) == 2 and heads["num_probes"] == 8

    scored = pq.read_table(sorted((run / "score").glob("shard-*.parquet"))).to_pylist()
    per_domain = corpus_sizes(corpus)
    assert len({r["doc_id"] for r in scored}) == len(scored) == sum(per_domain.values())  # none lost
    assert all(r["score"] == pytest.approx((r["loss_masked"] - r["loss_base"]) / r["loss_base"])
               for r in scored)
    selected = pq.read_table(run / "select/selected.parquet").to_pylist()
    ai = {r["doc_id"] for r in selected if r["method"] == "attention_influence"}
    assert len(ai) == sum(math.ceil(0.2 * n) for n in per_domain.values())  # top 20% per domain
    top = {d: max((r for r in scored if r["domain"] == d), key=lambda r: r["score"])["doc_id"]
           for d in {r["domain"] for r in scored}}
    assert set(top.values()) <= ai

    blends = json.loads((run / "mix/blend.json").read_text())
    assert set(blends["arms"]) == set(ARMS)
    for a in ARMS:
        assert (run / "pretrain" / a / "hf" / "config.json").exists()
        res = json.loads((run / "eval" / a / "results.json").read_text())
        assert {"mmlu", "gsm8k", "humaneval"} <= set(res["results"])
        assert res["attninf"]["offline_data"]["used"] is True

    masked = json.loads((run / "eval_masked/results.json").read_text())["head_sets"]
    assert set(masked) == {"none", "random", "retrieval"}
    assert all(set(v["headline"]) == {"mmlu"} for v in masked.values())  # eval.masked.tasks
    pred = json.loads((run / "eval_masked/prediction.json").read_text())
    assert {(r["task"], r["metric"]) for r in pred["rows"]} == {("mmlu", "acc,none"), ("gsm8k_bpb", "bpb,none")}
    first_pretrain = min(manifest(run / "pretrain" / a)["started"] for a in ARMS)
    assert pred["written"] < manifest(run / "eval_masked")["finished"] <= first_pretrain  # before training

    report = (run / "report/report.md").read_text()
    assert "Ours: attention_influence" in report and "Ours: random" in report
    deltas = json.loads((run / "report/deltas.json").read_text())
    table1 = [r for r in deltas if not r.get("unit")]
    assert {(r["arm"], r["task"]) for r in table1} == {(a, t) for a in ARMS[1:] for t in ("mmlu", "gsm8k", "humaneval")}
    small = {(r["arm"], r["task"], r["metric"]) for r in deltas if r.get("unit")}
    assert small == {(a, t, f"{m},none") for a in ARMS[1:] for t, m in
                     (("gsm8k_bpb", "bpb"), ("humaneval_bpb", "bpb"))}
    # one item per subtask: every replicate is the delta itself, up to float summation order
    assert all(r["phase"] == "final" and r["ci_low"] - 1e-9 <= r["delta"] <= r["ci_high"] + 1e-9 for r in deltas)
    assert (run / "report/deltas_ci.png").stat().st_size > 1000
    assert "[95% CI]" in report and "## Power" in report
    assert "Ours: 2 retrieval heads (top retrieval score)" in report  # the set actually masked
    assert "## The selector" in report and "Mirror effect" in report and "| python_edu |" in report
    assert "### Metrics that move at small scale" in report and "| HumanEval (canonical solution) | bpb,none |" in report
    assert "## A prediction written before training" in report and "before the first pretraining run started" in report


def test_terminal_shows_stage_lines_and_the_summary(smoke_run):
    run, p = smoke_run
    log = p.stdout + p.stderr
    n = len(STAGES) + 2 * (len(ARMS) - 1)
    for i in range(1, n + 1):
        assert f"stage {i} of {n}: " in log
    assert f"stage {n} of {n}: report done in" in log and "pipeline ETA 0s" in log
    summary = p.stdout[p.stdout.index("== attninf summary"):]
    for part in ("retrieval heads: 2 of 16", "probe mirror check (8 held-out probes)", "selection (ratio",
                 "held-out loss", "selector with heads masked", f"report: {run / 'report'}",
                 "small-scale metrics, paired vs baseline", "prediction written before training",
                 "stage wall times:", "eval[random]"):
        assert part in summary, (part, summary)
    assert "a summary section failed" not in summary


def test_rerun_recomputes_nothing(smoke_run, env, corpus):
    run, _ = smoke_run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")}
    p = attninf(["+experiment=smoke", f"run_dir={run}", corpus], env, run.parent)
    log = p.stdout + p.stderr
    assert "run  " not in log, log[-3000:]
    assert log.count("skip ") == len(STAGES) + 2 * (len(ARMS) - 1)  # pretrain and eval per arm
    assert {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")} == before


def test_killed_scoring_resumes_without_recomputing_shards(smoke_run, env, corpus, tmp_path):
    """SIGKILL the pipeline while it scores, re-run: detection is skipped, finished shards are
    kept byte for byte, and the rows equal the uninterrupted run's."""
    run, _ = smoke_run
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "attninf.cli", "+experiment=smoke", f"run_dir={killed}", corpus,
            "stages=[detect,score]", "score.shard_size=2"]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    shards = killed / "score"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(shards.glob("shard-*.parquet"))) < 5:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.parquet")}
    assert 0 < len(kept) < sum(corpus_sizes(corpus).values()) // 2, "the kill must land mid-scoring for this test to mean anything"
    assert not (shards / "manifest.json").exists() or manifest(shards)["status"] != "done"

    p = attninf(args[3:], env, tmp_path)
    log = p.stdout + p.stderr
    assert "skip detect" in log and "run  score" in log
    assert {n: (shards / n).stat().st_mtime_ns for n in kept} == kept
    resumed = pq.read_table(sorted(shards.glob("shard-*.parquet"))).to_pylist()
    straight = pq.read_table(sorted((run / "score").glob("shard-*.parquet"))).to_pylist()
    key = lambda r: r["doc_id"]  # noqa: E731
    assert len(resumed) == len({r["doc_id"] for r in resumed}) == len(straight)
    for a, b in zip(sorted(resumed, key=key), sorted(straight, key=key)):
        assert a["doc_id"] == b["doc_id"] and a["n_tokens"] == b["n_tokens"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)  # other batch shapes, same fp32 math


def test_ratio_sweep_with_the_local_launcher_shares_one_scoring(smoke_run, env, corpus):
    """Hydra multirun as separate submitit jobs: each ratio gets its own select folder."""
    run, _ = smoke_run
    score_manifest = (run / "score/manifest.json").stat().st_mtime_ns
    attninf(["-m", "hydra/launcher=local", "+experiment=smoke", f"run_dir={run}", corpus,
             "stages=[detect,score,select]", "select.ratio=0.1,0.4"], env, run.parent)
    assert (run / "score/manifest.json").stat().st_mtime_ns == score_manifest
    counts = {}
    for ratio in ("0.1", "0.4"):
        d = run / f"select-select.ratio={ratio}"
        assert manifest(d)["status"] == "done"
        rows = pq.read_table(d / "selected.parquet").to_pylist()
        counts[ratio] = sum(r["method"] == "attention_influence" for r in rows)
    sizes = corpus_sizes(corpus).values()
    assert counts == {r: sum(math.ceil(float(r) * n - 1e-9) for n in sizes) for r in ("0.1", "0.4")}


    assert (run / "report/deltas_ci.png").stat().st_size > 1000
