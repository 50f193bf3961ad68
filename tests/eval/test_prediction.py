"""eval/prediction.py: the mirror gap per item, the written prediction, and its check against the arms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval import prediction, stats

GSM = "exact_match,flexible-extract"


def _masked_folder(root, name, bpb, em):
    d = root / name
    (d / "samples").mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "results": {"gsm8k_bpb": {"bpb,none": float(np.mean(bpb))}, "gsm8k": {GSM: float(np.mean(em))}},
        "attninf": {"tasks": ["gsm8k", "gsm8k_bpb"]}}))
    (d / "samples" / "gsm8k_bpb.jsonl").write_text(
        "".join(json.dumps({"doc_id": i, "filter": "none", "bpb": float(v)}) + "\n" for i, v in enumerate(bpb)))
    (d / "samples" / "gsm8k.jsonl").write_text(
        "".join(json.dumps({"doc_id": i, "filter": "flexible-extract", "exact_match": float(v)}) + "\n"
                for i, v in enumerate(em)))


@pytest.fixture
def masked(tmp_path):
    rng = np.random.default_rng(0)
    base = 2.0 + rng.normal(0, 0.3, 30)
    em = (rng.random(30) < 0.3).astype(float)
    _masked_folder(tmp_path, "none", base, em)
    _masked_folder(tmp_path, "retrieval", base + 0.5 + rng.normal(0, 0.05, 30), em)  # retrieval heads matter
    _masked_folder(tmp_path, "random", base + 0.05 + rng.normal(0, 0.05, 30), em)    # random heads barely
    return tmp_path


def test_mirror_gap_is_paired_per_item_and_decides_the_prediction(masked):
    pred = prediction.predict(masked, n_resamples=1000)
    rows = {r["task"]: r for r in pred["rows"]}
    assert set(rows) == {"gsm8k", "gsm8k_bpb"}
    ret = [json.loads(x)["bpb"] for x in (masked / "retrieval/samples/gsm8k_bpb.jsonl").read_text().splitlines()]
    rnd = [json.loads(x)["bpb"] for x in (masked / "random/samples/gsm8k_bpb.jsonl").read_text().splitlines()]
    b = rows["gsm8k_bpb"]
    assert b["gap"] == pytest.approx(np.mean(ret) - np.mean(rnd))  # bpb: higher = more harm
    assert b["drop_retrieval"] == pytest.approx(np.mean(ret) - json.loads(
        (masked / "none/results.json").read_text())["results"]["gsm8k_bpb"]["bpb,none"])
    assert b["p_value"] == pytest.approx(stats.paired(ret, rnd, n_resamples=1000).p_value)
    assert b["predicted_gain"] is True and b["ci_low"] > 0
    g = rows["gsm8k"]  # accuracy untouched by either mask: no gain predicted
    assert g["metric"] == GSM and g["gap"] == 0 and g["predicted_gain"] is False
    assert pred["gain_expected_on"] == ["gsm8k_bpb (bpb)"]
    md = prediction.markdown(pred)
    assert "before pretraining" in md and "should gain over the baseline on gsm8k_bpb (bpb)" in md


def test_the_report_holds_the_arms_deltas_against_the_prediction(masked):
    pred = prediction.predict(masked, n_resamples=500)
    recs = [{"arm": "ai", "baseline": "base", "task": "gsm8k_bpb", "metric": "bpb,none", "phase": "final",
             "unit": "bits/byte", "higher_is_better": False, "delta": -0.02, "ci_low": -0.03, "ci_high": -0.01,
             "p_value": 0.004},
            {"arm": "ai", "baseline": "base", "task": "gsm8k", "metric": GSM, "phase": "final", "delta": 0.0,
             "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}]
    text = prediction.against_outcome(pred, recs, "ai", "base", pretrain_started=pred["written"] + 12)
    assert "written 12 s before the first pretraining run started" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| gsm8k_bpb |"))
    assert "| yes |" in line and "-0.0200 [-0.0300, -0.0100]" in line and "gain, as predicted" in line
    assert "no change, as predicted" in next(ln for ln in text.splitlines() if ln.startswith("| gsm8k |"))
    late = prediction.against_outcome(pred, recs, "ai", "base", pretrain_started=pred["written"] - 5)
    assert "written after pretraining had started" in late
    recs[0].update(delta=0.02, ci_low=0.01, ci_high=0.03)  # bpb up = worse
    worse = prediction.against_outcome(pred, recs, "ai", "base", pretrain_started=None)
    assert "loss, against the prediction" in worse


def test_no_prediction_without_the_three_head_sets(tmp_path):
    _masked_folder(tmp_path, "none", [1.0, 2.0], [0.0, 1.0])
    pred = prediction.predict(tmp_path)
    assert pred["rows"] == [] and "retrieval/results.json missing" in pred["note"]
    assert prediction.against_outcome(None, [], "ai", "base", None).startswith("No prediction")
