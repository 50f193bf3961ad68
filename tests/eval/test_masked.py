"""eval_masked (paper Table 6 through lm-eval) on a tiny model, and its table in the report."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attninf.config import build
from attninf.runner import run_pipeline
from eval import harness
from eval.config import EvalConfig
from eval.report import Inputs, ReportConfig, render
from tests.helpers import CONF

N_LAYERS, N_HEADS = 4, 4  # tests/conftest.py make_tiny_llama


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory, tiny_model_dir, offline_dir):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("masked")
    rng = random.Random(3)
    scores = [[rng.random() for _ in range(N_HEADS)] for _ in range(N_LAYERS)]
    flat = sorted(((scores[l][h], l, h) for l in range(N_LAYERS) for h in range(N_HEADS)), reverse=True)
    heads_file = run_dir / "heads.json"
    heads_file.write_text(json.dumps({"model": "tiny", "n_layers": N_LAYERS, "n_heads": N_HEADS,
                                      "scores": scores, "selected": [[l, h] for _, l, h in flat[:3]]}))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        c = compose(overrides=["+eval=smoke", "+heads=retrieval",
                               f"eval.offline_data={offline_dir}", "eval.tasks=[mmlu]", "eval.limit=1",
                               "eval.max_length=256", "eval.default_fewshot=1", "eval.dtype=float32",
                               f"heads.file={heads_file}", "heads.count=3"])
    cfg = OmegaConf.create({
        "run_dir": str(run_dir / "run"), "stages": ["eval_masked"], "arms": {},
        "wandb": {"mode": "disabled"}, "experiment_name": "masked",
        "model": {"path": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "attn_impl": "sdpa"},
        "heads": c.heads, "eval": c.eval})
    run_pipeline(cfg)
    return run_dir / "run", [(l, h) for _, l, h in flat[:3]], cfg


def test_head_sets_are_retrieval_and_equal_count_random_non_retrieval(masked_run):
    run_dir, top3, _ = masked_run
    res = json.loads((run_dir / "eval_masked/results.json").read_text())
    sets = res["head_sets"]
    assert list(sets) == ["none", "random", "retrieval"]
    assert sets["none"]["heads"] == []
    assert [tuple(h) for h in sets["retrieval"]["heads"]] == top3
    assert sets["retrieval"]["label"] == "3 retrieval heads (top retrieval score)"
    assert sets["random"]["label"].startswith("3 random heads (outside the masked and the retrieval")
    rnd = [tuple(h) for h in sets["random"]["heads"]]
    assert len(rnd) == 3 and not set(rnd) & set(top3)
    assert res["attninf"]["heads"]["mode"] == "uniform" and res["attninf"]["offline_data"]["used"]
    for name in sets:
        r = json.loads((run_dir / "eval_masked" / name / "results.json").read_text())
        assert r["results"]["mmlu"]["sample_len"] == 57 and r["attninf"]["head_set"] == name


def _loglik(path):
    return np.array([float(json.loads(ln)["resps"][i][0][0]) for ln in path.read_text().splitlines()
                     for i in range(4)])


def test_no_heads_masked_equals_the_plain_model_and_masking_changes_scores(masked_run, tiny_model_dir, tmp_path):
    run_dir, _, cfg = masked_run
    e = build(EvalConfig, cfg.eval, "eval")
    tp, _ = harness.plan(e, tmp_path)
    model, tok = harness.load_model(str(tiny_model_dir), "float32", "cpu")
    res = harness.run_suite(harness.make_lm(model, tok, e), e, tp, tmp_path)
    harness.save_results(res, tmp_path, {})
    plain = _loglik(tmp_path / "samples/mmlu_anatomy.jsonl")
    none = _loglik(run_dir / "eval_masked/none/samples/mmlu_anatomy.jsonl")
    retrieval = _loglik(run_dir / "eval_masked/retrieval/samples/mmlu_anatomy.jsonl")
    # Random tiny weights make each head's contribution small: compare against float noise.
    assert np.abs(none - plain).max() < 1e-5
    assert np.abs(retrieval - plain).max() > 1e-4


def test_report_shows_the_mirror_effect_table(masked_run, tmp_path):
    run_dir, _, cfg = masked_run
    out = render(cfg, ReportConfig(n_resamples=500), tmp_path / "report",
                 Inputs(arms=[], runs={}, masked=run_dir / "eval_masked"), run_dir)
    md = (tmp_path / "report/report.md").read_text()
    assert out["mirror_effect"]
    table6 = md[md.index("## Table 6"):]
    line = next(ln for ln in table6.splitlines() if ln.startswith("| MMLU |"))
    r = {k: json.loads((run_dir / "eval_masked" / k / "results.json").read_text())["results"]["mmlu"]["acc,none"]
         for k in ("none", "random", "retrieval")}
    assert line.startswith("| MMLU | 0.426 | 0.417 | 0.309 |")
    for k in ("none", "random", "retrieval"):
        assert f"{r[k]:.3f}" in line
    assert "not run" in next(ln for ln in table6.splitlines() if ln.startswith("| GSM8K |"))
    assert (tmp_path / "report/mirror_effect.png").exists()
    # Table 6 paired per item: masked head set vs unmasked on the same MMLU items
    sel = {r["arm"]: r for r in json.loads((tmp_path / "report/selector_deltas.json").read_text())}
    for k in ("random", "retrieval"):
        rec = sel[f"masked:{k}"]
        assert rec["baseline"] == "masked:none" and rec["task"] == "mmlu"
        assert rec["delta"] == pytest.approx((r[k] - r["none"]) * 100)
        assert rec["ci_low"] <= rec["delta"] <= rec["ci_high"] and 0 < rec["p_value"] <= 1
