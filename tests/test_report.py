"""The report's reading: the paper's numbers from one file, metric fallback, gaps as "not run"."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from eval import paper
from eval.report import ReportConfig, render

EVAL_DIR = Path(__file__).resolve().parent.parent / "eval"


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
           "attninf": {"mirror": {"used": True, "reason": "HF_HUB_OFFLINE=1", "benchmarks": {}}}}
    (run_dir / "eval" / "baseline" / "results.json").write_text(json.dumps(res))
    cfg = OmegaConf.create({"experiment_name": "partial", "arms": {"baseline": {}, "attention_influence": {}}})
    out = render(run_dir, cfg, ReportConfig(figures=True), run_dir / "report", ["baseline", "attention_influence"],
                 {"baseline": run_dir / "eval" / "baseline", "attention_influence": None}, None)
    md = (run_dir / "report" / "report.md").read_text()
    gsm = next(ln for ln in md.splitlines() if ln.startswith("| GSM8K |"))
    assert "| 21.00 | 23.73 | +2.73 | 25.00 ± 10.00 | not run | not run | 4 |" in gsm
    assert "Eval `attention_influence`: not run" in md
    assert "Masked-head evaluation: not run" in md
    assert "loss curves: no pretrain metrics" in md
    assert out["arms_with_results"] == ["baseline"] and out["figures"] == []
