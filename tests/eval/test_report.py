"""The report's reading: the paper's numbers from one file, metric fallback, gaps as "not run",
paired deltas recomputed independently from sample files, and a two-point sweep."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from attninf import manifest

from eval import paper
from eval.report import Inputs, ReportConfig, render

ROOT = Path(__file__).resolve().parents[2]
EVAL_DIR = ROOT / "eval"


def test_paper_numbers_live_only_in_the_data_file():
    nums = paper.load()
    rows = {r["name"]: r for r in nums["table1"]["rows"]}
    assert (rows["MMLU"]["baseline"], rows["MMLU"]["attention_influence"]) == (50.05, 51.48)
    assert (rows["HumanEval"]["baseline"], rows["HumanEval"]["attention_influence"]) == (23.02, 26.55)
    assert len(rows) == 20  # average + 19 benchmarks
    t6 = {r["name"]: r for r in nums["table6"]["rows"]}
    assert (t6["GSM8K"]["none"], t6["GSM8K"]["random"], t6["GSM8K"]["retrieval"]) == (0.182, 0.127, 0.007)
    for py in EVAL_DIR.rglob("*.py"):  # no paper figure hard-coded in code
        text = py.read_text()
        for needle in ("50.05", "51.48", "23.02", "0.182", "44.51"):
            assert needle not in text, f"{py.name} contains paper number {needle}"


def test_pick_metric_falls_back_to_another_filter():
    metrics = {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01,
               "exact_match,flexible-extract": 0.2, "exact_match_stderr,flexible-extract": 0.02}
    assert paper.pick_metric(metrics, "exact_match,flexible-extract") == ("exact_match,flexible-extract", 0.2, 0.02)
    assert paper.pick_metric(metrics, "exact_match,other") == ("exact_match,strict-match", 0.1, 0.01)
    assert paper.pick_metric({"acc,none": 0.3, "acc_stderr,none": "N/A"}, "acc,none") == ("acc,none", 0.3, None)
    assert paper.pick_metric(metrics, "acc,none") is None


def test_report_of_an_unfinished_experiment_says_not_run(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "eval" / "baseline").mkdir(parents=True)
    res = {"results": {"gsm8k": {"exact_match,flexible-extract": 0.25, "exact_match_stderr,flexible-extract": 0.1}},
           "n-samples": {"gsm8k": {"original": 4, "effective": 4}},
           "attninf": {"offline_data": {"used": True, "reason": "HF_HUB_OFFLINE=1", "benchmarks": {}}}}
    (run_dir / "eval" / "baseline" / "results.json").write_text(json.dumps(res))
    cfg = OmegaConf.create({"experiment_name": "partial", "arms": {"baseline": {}, "attention_influence": {}}})
    inp = Inputs(arms=["baseline", "attention_influence"],
                 runs={"baseline": [(None, run_dir / "eval" / "baseline")], "attention_influence": [(None, None)]})
    out = render(cfg, ReportConfig(figures=True), run_dir / "report", inp, run_dir)
    md = (run_dir / "report" / "report.md").read_text()
    gsm = next(ln for ln in md.splitlines() if ln.startswith("| GSM8K |"))
    assert "| 21.00 | 23.73 | +2.73 | 25.00 ± 10.00 | not run | not run | 4 |" in gsm
    assert "Eval `attention_influence`: not run" in md
    assert "Masked-head evaluation: not run" in md
    assert "loss curves: no pretrain metrics" in md
    assert out["arms_with_results"] == ["baseline"] and out["figures"] == []
    assert json.loads((run_dir / "report" / "deltas.json").read_text()) == []


# ---------------------------------------------------------------- paired deltas from sample logs

def _samples(d: Path, leaf: str, rows: list[dict]) -> None:
    (d / "samples").mkdir(parents=True, exist_ok=True)
    (d / "samples" / f"{leaf}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_eval(d: Path, mmlu: dict[str, list[int]], gsm: list[int], he: list[float]) -> None:
    """An eval folder in lm-eval's layout: results.json + samples/<leaf>.jsonl (doc_id, filter, metric)."""
    for leaf, vals in mmlu.items():
        _samples(d, leaf, [{"doc_id": i, "filter": "none", "metrics": ["acc"], "acc": float(v)}
                           for i, v in enumerate(vals)])
    rows = []
    for i, v in enumerate(gsm):  # two filters per item: only flexible-extract is the paper's metric
        rows += [{"doc_id": i, "filter": "strict-match", "exact_match": 0.0},
                 {"doc_id": i, "filter": "flexible-extract", "exact_match": float(v)}]
    _samples(d, "gsm8k", rows)
    _samples(d, "humaneval", [{"doc_id": i, "filter": "create_test", "pass_at_k": v} for i, v in enumerate(he)])
    allm = [v for vals in mmlu.values() for v in vals]
    res = {"results": {"mmlu": {"acc,none": sum(allm) / len(allm), "acc_stderr,none": 0.01},
                       "gsm8k": {"exact_match,flexible-extract": sum(gsm) / len(gsm),
                                 "exact_match_stderr,flexible-extract": 0.02},
                       "humaneval": {"pass_at_k,create_test": sum(he) / len(he)}},
           "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": list(mmlu)},
           "n-samples": {**{k: {"effective": len(v)} for k, v in mmlu.items()},
                         "gsm8k": {"effective": len(gsm)}, "humaneval": {"effective": len(he)}}}
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(res))


def _binom_p(k: int, n: int) -> float:
    """Two-sided exact binomial(n, 1/2), written out independently of eval.stats."""
    if n == 0:
        return 1.0
    lo = min(k, n - k)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(lo + 1)) / 2 ** n)


def test_deltas_recomputed_independently_from_the_sample_files(tmp_path):
    rng = random.Random(0)
    mk = lambda n, p: [int(rng.random() < p) for _ in range(n)]  # noqa: E731
    base = {"mmlu_anatomy": mk(40, 0.3), "mmlu_astronomy": mk(25, 0.3)}
    treat = {k: [1 if rng.random() < 0.3 else x for x in v] for k, v in base.items()}
    gsm_b, gsm_a = mk(30, 0.2), mk(30, 0.4)
    he_b = [rng.choice([0, 0.25, 0.5, 1.0]) for _ in range(12)]  # pass@1 of n=4 samples per problem
    he_a = [min(1.0, x + rng.choice([0, 0, 0.25])) for x in he_b]
    _fake_eval(tmp_path / "eval/baseline", base, gsm_b, he_b)
    _fake_eval(tmp_path / "eval/attention_influence", treat, gsm_a, he_a)
    inp = Inputs(arms=["baseline", "attention_influence"],
                 runs={"baseline": [(None, tmp_path / "eval/baseline")],
                       "attention_influence": [(None, tmp_path / "eval/attention_influence")]})
    cfg = OmegaConf.create({"experiment_name": "paired"})
    render(cfg, ReportConfig(n_resamples=2000), tmp_path / "report", inp, tmp_path)
    recs = {r["task"]: r for r in json.loads((tmp_path / "report/deltas.json").read_text())}
    assert set(recs) == {"mmlu", "gsm8k", "humaneval"}

    # independent arithmetic from the same sample files
    def read(arm, leaf, metric, filt):
        rows = [json.loads(x) for x in (tmp_path / "eval" / arm / "samples" / f"{leaf}.jsonl").read_text().splitlines()]
        return {r["doc_id"]: r[metric] for r in rows if r["filter"] == filt}

    a = [v for leaf in base for v in read("attention_influence", leaf, "acc", "none").values()]
    b = [v for leaf in base for v in read("baseline", leaf, "acc", "none").values()]
    n10 = sum(x > y for x, y in zip(a, b))
    n01 = sum(x < y for x, y in zip(a, b))
    m = recs["mmlu"]
    assert m["n_items"] == 65 and m["seeds"] == [None] and m["phase"] == "final"
    assert m["delta"] == pytest.approx(100 * (sum(a) - sum(b)) / 65)
    assert m["test"] == "exact McNemar" and m["p_value"] == pytest.approx(_binom_p(n10, n10 + n01))
    z = 1.959964 + 0.841621
    assert m["mde"] == pytest.approx(100 * z * math.sqrt((n10 + n01) / 65) / math.sqrt(65), rel=1e-5)
    assert m["ci_low"] <= m["delta"] <= m["ci_high"]
    assert m["paper_delta"] == pytest.approx(51.48 - 50.05)
    g = recs["gsm8k"]
    ga, gb = read("attention_influence", "gsm8k", "exact_match", "flexible-extract"), \
        read("baseline", "gsm8k", "exact_match", "flexible-extract")
    assert g["metric"] == "exact_match,flexible-extract"
    assert g["delta"] == pytest.approx(100 * sum(ga[i] - gb[i] for i in ga) / 30)
    h = recs["humaneval"]  # fractional pass@1 per problem: paired per problem, sign-flip
    assert h["delta"] == pytest.approx(100 * sum(x - y for x, y in zip(he_a, he_b)) / 12)
    assert h["test"].startswith("sign-flip") and 0 < h["p_value"] <= 1
    d = [x - y for x, y in zip(he_a, he_b)]
    assert h["mde"] == pytest.approx(100 * z * math.sqrt(sum(x * x for x in d)) / 12, rel=1e-5)
    for r in recs.values():
        assert {"arm", "baseline", "task", "metric", "n_items", "seeds", "delta", "ci_low", "ci_high",
                "p_value", "mde", "paper_delta", "phase"} <= set(r)
    md = (tmp_path / "report/report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| MMLU |"))
    assert f"{m['delta']:+.2f} [{m['ci_low']:+.2f}, {m['ci_high']:+.2f}]" in line
    assert "## Power" in md and "| MMLU | 14,042 |" in md
    assert (tmp_path / "report/deltas_ci.png").stat().st_size > 1000


def test_two_point_sweep_reports_follow_their_own_point(tmp_path):
    """`-m select.ratio=0.1,0.4` through the real CLI: each point's report shows its own selection
    and lists only its own folders (the report reads the stage context's folders, not by name)."""
    run_dir = tmp_path / "run"
    score = run_dir / "score"
    score.mkdir(parents=True)
    rng = random.Random(1)
    rows = [{"doc_id": f"d{i:03d}", "domain": ["web", "code"][i % 2], "n_tokens": 10, "n_tokens_full": 10 + i,
             "loss_base": 1 + rng.random(), "loss_masked": 2.0, "score": rng.random()} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), score / "shard-00000.parquet")
    from selection.score import file_digest  # select reads exactly the shards the plan lists

    manifest.write_json(score / "plan.json", {"shards": 1, "key": "score-fixture", "files": [
        {"name": "shard-00000.parquet", "rows": 40, "scored": 40,
         "sha256": file_digest(score / "shard-00000.parquet")}]})
    manifest.write(score, stage="score", arm=None, key="score-fixture", status="done", config={}, inputs={})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    p = subprocess.run([sys.executable, "-m", "attninf.cli", "-m", f"run_dir={run_dir}", "stages=[select,report]",
                        "select.ratio=0.1,0.4", "report.figures=false"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    for ratio, other in (("0.1", "0.4"), ("0.4", "0.1")):
        rep = json.loads((run_dir / f"report-select.ratio={ratio}" / "report.json").read_text())
        own = json.loads((run_dir / f"select-select.ratio={ratio}" / "summary.json").read_text())
        want = sum(d["selected"] for d in own["methods"]["attention_influence"].values())
        assert rep["tokens"]["selection"]["attention_influence"]["selected"] == want
        assert want == {"0.1": 4, "0.4": 16}[ratio]  # ceil(ratio x 20) per domain, two domains
        folders = {m["folder"] for m in rep["manifests"]}
        assert f"select-select.ratio={ratio}" in folders and f"select-select.ratio={other}" not in folders
        md = (run_dir / f"report-select.ratio={ratio}" / "report.md").read_text()
        assert f"top {float(ratio):.0%} per domain" in md
