"""Pipeline progress (stage i of n, ETA) and the end-of-run summary, on constructed stage folders."""

from __future__ import annotations

import json
import logging

import pytest

from attninf import manifest
from attninf.progress import STAGE_PRIOR_S, PipelineProgress, fmt_s
from attninf.runner import run_pipeline
from attninf.summary import summary_lines
from tests import toy_stages


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_eta_is_remaining_prior_times_measured_speed():
    clock = Clock()
    units = [("detect", None), ("score", None), ("report", None)]
    p = PipelineProgress(units, clock=clock)
    pd, ps, pr = STAGE_PRIOR_S["detect"], STAGE_PRIOR_S["score"], STAGE_PRIOR_S["report"]
    assert p.eta_s() is None  # nothing measured yet
    p.start(0)
    clock.t = 10.0
    p.stage_fraction(0.5)
    # spent 10 s for half of detect's prior: speed 10 / (pd/2); left = total - pd/2
    assert p.eta_s() == pytest.approx((pd / 2 + ps + pr) * 10 / (pd / 2))
    clock.t = 20.0
    p.end(0, 20.0)
    assert p.eta_s() == pytest.approx((ps + pr) * 20 / pd)
    p.end(1, 30.0, skipped=True)  # done earlier: costs nothing now, its wall time calibrates
    assert p.eta_s() == pytest.approx(pr * (20 + 30) / (pd + ps))
    p.start(2)
    clock.t = 30.0
    p.end(2, 5.0)
    assert p.eta_s() == 0.0


def test_fmt_s():
    assert [fmt_s(x) for x in (None, float("nan"), 4.4, 65, 3725)] == ["?", "?", "4s", "1m05s", "1h02m"]




def test_runner_prints_stage_lines_and_the_summary(tmp_path, toy, caplog, capsys):
    cfg = toy_stages.pipeline_cfg(tmp_path)
    with caplog.at_level(logging.INFO, logger="attninf"):
        run_pipeline(cfg)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("stage 1 of 2: detect started") for m in msgs)
    assert any(m.startswith("stage 2 of 2: score done in") and "pipeline ETA 0s" in m for m in msgs)
    out = capsys.readouterr().out
    assert "attninf summary" in out and "stage wall times:" in out
    assert [ln.split()[-1] for ln in out.splitlines() if ln.strip().startswith(("detect ", "score "))] == ["ran"] * 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="attninf"):
        run_pipeline(cfg)
    msgs = [r.getMessage() for r in caplog.records]
    assert "stage 1 of 2: detect skipped (already done); pipeline ETA 0s" in msgs
    assert not any("started" in m for m in msgs)
    assert out.count("skipped") == 0 and capsys.readouterr().out.count("skipped (done earlier)") == 2


def _done(d, outputs=None, wall=1.0):
    d.mkdir(parents=True, exist_ok=True)
    manifest.write(d, stage=d.name, arm=None, key="k", status="done", config={}, inputs={},
                   outputs=outputs, wall_s=wall)
    return d


def test_summary_reads_every_section_from_the_stage_folders(tmp_path):
    run = tmp_path / "run"
    arms = ["baseline", "attention_influence"]
    units = [("detect", None), ("mirror", None), ("select", None)] + [("pretrain", a) for a in arms] \
        + [("eval", a) for a in arms] + [("eval_masked", None), ("report", None)]
    dirs = {(n, a): run / n / a if a else run / n for n, a in units}
    d = _done(dirs[("detect", None)], wall=56.0)
    (d / "heads.json").write_text(json.dumps({"selected": [[18, 6], [17, 3], [24, 1]], "n_layers": 30,
                                              "n_heads": 9, "mode": "teacher_forced"}))
    d = _done(dirs[("mirror", None)])
    (d / "mirror.json").write_text(json.dumps({"num_probes": 16, "rows": [
        {"condition": "none", "n_heads": 0, "exact_match": 0.44, "answer_loss": 0.5, "delta_loss": 0.0},
        {"condition": "retrieval", "n_heads": 3, "exact_match": 0.0, "answer_loss": 5.15, "delta_loss": 4.65}]}))
    d = _done(dirs[("select", None)])
    (d / "summary.json").write_text(json.dumps({"ratio": 0.2, "methods": {
        "attention_influence": {"web": {"documents": 100, "tokens": 1000, "selected": 20, "selected_tokens": 450}},
        "random": {"web": {"documents": 100, "tokens": 1000, "selected": 20, "selected_tokens": 210}}}}))
    for arm, loss, mmlu in (("baseline", 6.751, 0.202), ("attention_influence", 6.727, 0.193)):
        d = _done(dirs[("pretrain", arm)])
        (d / "summary.json").write_text(json.dumps({"val_last": {"val/mean": loss}}))
        _done(dirs[("eval", arm)], outputs={"headline": {"mmlu": {"metric": "acc", "value": mmlu, "stderr": 0.01}}})
    _done(dirs[("eval_masked", None)], outputs={"head_sets": {
        "none": {"n_heads": 0, "headline": {"mmlu": 0.237}},
        "retrieval": {"n_heads": 3, "headline": {"mmlu": 0.254}}}})
    (dirs[("eval_masked", None)] / "prediction.json").write_text(json.dumps({
        "rows": [{"task": "gsm8k_bpb"}], "gain_expected_on": ["gsm8k_bpb (bpb)"]}))
    d = _done(dirs[("report", None)], outputs={"report": str(run / "report/report.md")})
    (d / "deltas.json").write_text(json.dumps([
        {"arm": "attention_influence", "baseline": "baseline", "task": "mmlu", "metric": "acc,none",
         "phase": "final", "delta": -0.9},  # a Table 1 row: not a small-scale one
        {"arm": "attention_influence", "baseline": "baseline", "task": "gsm8k_bpb", "metric": "bpb,none",
         "phase": "final", "unit": "bits/byte", "delta": -0.01234, "ci_low": -0.02, "ci_high": -0.004,
         "p_value": 0.0042, "baseline_mean": 2.5, "arm_mean": 2.48766, "n_items": 20, "seeds": [None]}]))
    text = "\n".join(summary_lines(run, units, dirs, ran={("detect", None)}, total_s=75.0))
    small = next(ln for ln in text.splitlines() if "gsm8k_bpb" in ln and "bpb" in ln.split())
    assert "2.5000     2.4877  -0.0123 [-0.0200, -0.0040]" in small and "0.0042" in small and "n=20" in small
    assert not any(ln.split()[1:2] == ["mmlu"] for ln in text.splitlines() if "attention_influence" in ln)
    assert "prediction written before training (eval_masked mirror gap): gain expected on gsm8k_bpb (bpb)" in text
    assert "retrieval heads: 3 of 270 (1%), layers 17-24 of 30 (teacher_forced); top: (18,6) (17,3) (24,1)" in text
    assert "retrieval                 3       0.000       5.150   +4.650" in text
    assert "web" in text and "20/100 45%" in text and "20/100 21%" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("attention_influence") and "6.727" in ln)
    assert "6.727 (-0.024)" in line and "19.3 (-0.9)" in line
    base = next(ln for ln in text.splitlines() if ln.strip().startswith("baseline"))
    assert "6.751" in base and "(" not in base  # no difference on the baseline's own row
    assert "retrieval                 3         25.4" in text
    assert f"report: {run / 'report/report.md'}" in text
    assert "detect                              56s  ran" in text
    assert "eval[baseline]" in text and "skipped (done earlier)" in text


def test_summary_skips_missing_sections_and_survives_odd_files(tmp_path):
    run = tmp_path / "run"
    units = [("detect", None), ("select", None)]
    dirs = {(n, a): run / n for n, a in units}
    d = _done(dirs[("detect", None)])
    (d / "heads.json").write_text("{not json")
    d = _done(dirs[("select", None)])
    (d / "summary.json").write_text(json.dumps({"methods": {"attention_influence": {"web": "oops"}}}))
    lines = summary_lines(run, units, dirs, ran=set(), total_s=1.0)
    assert lines[0].startswith("== attninf summary")
    assert any("a summary section failed" in ln for ln in lines)
    assert "stage wall times:" in lines
