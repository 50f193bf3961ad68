"""The eval stage: lm-eval on tiny models through the runner, task overrides, HumanEval path."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attninf import manifest
from attninf.config import ConfigError, build
from attninf.runner import run_pipeline
from eval import harness
from eval.config import EvalConfig
from tools.replay_humaneval import BROKEN, ReplayLM, humaneval_table

CONF = Path(__file__).resolve().parents[2] / "conf"
ARMS = {"baseline": {"selection": None}, "attention_influence": {"selection": "attention_influence"}}


def composed(*overrides: str):
    """The real eval/report config groups, composed by Hydra."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=["+eval=smoke", "+report=default", *overrides])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def allow_code(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


def ecfg(offline_dir, **kw) -> EvalConfig:
    base = {"offline_data": str(offline_dir), "dtype": "float32", "device": "cpu", "limit": 2, "max_length": 512,
            "allow_code_eval": True, "humaneval": {"n": 2, "max_gen_toks": 16}, "batch_size": 4}
    base.update(kw)
    return build(EvalConfig, base, "eval")


# ---------------------------------------------------------------- config and planning

def test_hydra_groups_compose_with_the_papers_settings():
    c = composed("eval=paper")
    e = build(EvalConfig, c.eval, "eval")
    assert e.num_fewshot == {"humaneval": 0, "minerva_math": 4, "drop": 3, "bbh_fewshot": 3}
    assert e.default_fewshot == 5 and e.max_length == 8192
    assert (e.humaneval.n, e.humaneval.temperature, e.humaneval.top_p, e.humaneval.max_gen_toks) == (20, 0.2, 0.95, 1024)
    assert "hellaswag" in e.tasks and e.suite == "paper"
    s = build(EvalConfig, composed("eval=smoke").eval, "eval")
    assert s.tasks == ["mmlu", "gsm8k", "humaneval", "mmlu_bpb", "gsm8k_bpb", "humaneval_bpb"] and s.limit == 4 and s.humaneval.n == 1


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="eval.batchsize"):
        build(EvalConfig, {"batchsize": 3}, "eval")


def test_plan_writes_overrides_and_skips_tasks_without_offline_data(tmp_path, offline_dir, allow_code):
    e = ecfg(offline_dir, tasks=["mmlu", "gsm8k", "humaneval", "hellaswag"], humaneval={})
    tp, data = harness.plan(e, tmp_path)
    assert tp.tasks == ["mmlu", "gsm8k", "humaneval"] and "hellaswag" in tp.skipped
    assert data.used and len([k for k in tp.leaves if k.startswith("mmlu_")]) == 57
    text = (tmp_path / "tasks/mmlu_anatomy.yaml").read_text()
    assert re.search(r"custom_dataset: !function '?eval\.benchmarks\.load_splits", text)
    anatomy = yaml.safe_load(text.replace("!function ", ""))
    assert anatomy["include"].endswith("mmlu/default/mmlu_anatomy.yaml")
    assert anatomy["num_fewshot"] == 5 and anatomy["dataset_path"] == "parquet"
    assert anatomy["dataset_name"] is None
    assert anatomy["dataset_kwargs"]["data_files"] == {"test": str(offline_dir / "mmlu/anatomy/test.parquet"),
                                                       "dev": str(offline_dir / "mmlu/anatomy/dev.parquet")}
    text = (tmp_path / "tasks/humaneval.yaml").read_text()
    assert re.search(r"!function '?eval\.code_exec\.pass_at_k", text)
    he = yaml.load(text.replace("!function ", ""), Loader=yaml.SafeLoader)
    assert he["repeats"] == 20 and he["generation_kwargs"]["temperature"] == 0.2
    assert he["generation_kwargs"]["top_p"] == 0.95 and he["generation_kwargs"]["max_gen_toks"] == 1024
    assert he["dataset_kwargs"]["data_files"]["test"].startswith(str(offline_dir / "humaneval"))
    assert he["num_fewshot"] == 0


@pytest.mark.parametrize("section, message", [
    ({"humaneval": {"n": 0}}, r"^eval.humaneval.n: must be >= 1"),
    ({"humaneval": {"k": [1, 5], "n": 2}}, r"^eval.humaneval.k: each k must be in \[1, n=2\]"),
    ({"humaneval": {"samples": 3}}, r"^unknown config key\(s\) eval.humaneval.samples;"),
    ({"masked": {"head_sets": ["bottom"]}}, r"^eval.masked.head_sets: unknown \['bottom'\]"),
    ({"offline_fewshot": {"gsm8k_fewshot_pool": 0}}, r"^eval.offline_fewshot.gsm8k_fewshot_pool: must be >= 1"),
    ({"offline_fewshot": {"mmlu_dev": 5}}, r"^unknown config key\(s\) eval.offline_fewshot.mmlu_dev;"),
    ({"offline_data": ""}, r"^eval.offline_data: auto \| off \| always \| a directory"),
])
def test_nested_eval_settings_are_validated_by_build(section, message):
    """Nested sections go through the same build path as the top level; the message names the key."""
    with pytest.raises(ConfigError, match=message):
        build(EvalConfig, section, "eval")


def test_hub_mode_keeps_hub_datasets_but_sets_shots(tmp_path, allow_code):
    e = build(EvalConfig, {"offline_data": "off", "tasks": ["mmlu", "gsm8k"]}, "eval")
    tp, data = harness.plan(e, tmp_path)
    assert not data.used
    text = (tmp_path / "tasks/mmlu_anatomy.yaml").read_text()
    assert "custom_dataset" not in text  # the hub copy goes through load_dataset
    anatomy = yaml.safe_load(text.replace("!function ", ""))
    assert "dataset_path" not in anatomy and anatomy["num_fewshot"] == 5


def test_strict_offline_and_unknown_tasks_are_config_errors(tmp_path, offline_dir):
    with pytest.raises(ConfigError, match="hellaswag.*no offline data"):
        harness.plan(ecfg(offline_dir, tasks=["hellaswag"], strict_offline=True), tmp_path)
    with pytest.raises(ConfigError, match="no task or group named 'not_a_task'"):
        harness.plan(ecfg(offline_dir, tasks=["not_a_task"]), tmp_path)


def test_humaneval_needs_config_confirmation_and_env(tmp_path, offline_dir, monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    with pytest.raises(ConfigError, match="eval.allow_code_eval=true"):
        harness.plan(ecfg(offline_dir, tasks=["humaneval"], allow_code_eval=False), tmp_path)
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL")
    with pytest.raises(ConfigError, match="HF_ALLOW_CODE_EVAL=1"):
        harness.plan(ecfg(offline_dir, tasks=["humaneval"]), tmp_path)


# ---------------------------------------------------------------- HumanEval: the full scoring path

def _replay_humaneval(tmp_path, offline_dir, limit):
    e = ecfg(offline_dir, tasks=["humaneval"], limit=limit, use_cache=False, log_samples=False,
             humaneval={"n": 1, "temperature": 0.0, "timeout_s": 1.0, "num_workers": 2})
    tp, data = harness.plan(e, tmp_path)
    res = harness.run_suite(ReplayLM(humaneval_table(Path(data.path)).__getitem__), e, tp, tmp_path / "ok")
    return e, tp, data, res


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail(tmp_path, offline_dir, allow_code):
    """Canonical solutions through lm-eval's task, filter, our metric and sandbox: pass@1 = 1."""
    e, tp, data, res = _replay_humaneval(tmp_path, offline_dir, 40)
    assert res["n-samples"]["humaneval"]["effective"] == 40
    assert harness.headline(res)["humaneval"]["value"] == 1.0
    e.limit = 3
    for name, fn in BROKEN.items():  # wrong, crashing, infinite loop, memory hog
        table = humaneval_table(Path(data.path), fn)
        res = harness.run_suite(ReplayLM(table.__getitem__), e, tp, tmp_path / name)
        assert harness.headline(res)["humaneval"]["value"] == 0.0, name


@pytest.mark.slow
def test_all_164_humaneval_canonical_solutions_pass(tmp_path, offline_dir, allow_code):
    _, _, _, res = _replay_humaneval(tmp_path, offline_dir, None)
    assert res["n-samples"]["humaneval"]["effective"] == 164
    assert harness.headline(res)["humaneval"]["value"] == 1.0


# ---------------------------------------------------------------- tiny models through the runner

def _fake_pretrain(run_dir: Path, arm: str, tokenizer, seed: int) -> None:
    """A finished pretrain[arm] folder holding an exported HF model (what eval consumes)."""
    from tests.conftest import make_tiny_llama

    out = run_dir / "pretrain" / arm
    make_tiny_llama(len(tokenizer), seed=seed).save_pretrained(out / "hf")
    tokenizer.save_pretrained(out / "hf")
    manifest.write(out, stage="pretrain", arm=arm, key=f"pretrain-{arm}", status="done", config={},
                   inputs={})


@pytest.fixture(scope="module")
def two_arm_run(tmp_path_factory, tiny_tokenizer, offline_dir):
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    run_dir = tmp_path_factory.mktemp("two_arms")
    for seed, arm in enumerate(ARMS):
        _fake_pretrain(run_dir, arm, tiny_tokenizer, seed)
    c = composed(f"eval.offline_data={offline_dir}", "eval.limit=2", "eval.dtype=float32",
                 "eval.allow_code_eval=true", "eval.humaneval.max_gen_toks=16", "eval.batch_size=4",
                 "eval.max_length=384")  # tiny BPE: 5-shot MMLU prompts are ~5k tokens
    cfg = OmegaConf.create({"run_dir": str(run_dir), "stages": ["eval", "report"], "arms": ARMS,
                            "wandb": {"mode": "disabled"}, "experiment_name": "tiny",
                            "eval": c.eval, "report": c.report})
    run_pipeline(cfg)
    return run_dir


def test_eval_writes_lm_eval_results_and_samples_per_arm(two_arm_run, offline_dir):
    for arm in ARMS:
        d = two_arm_run / "eval" / arm
        res = json.loads((d / "results.json").read_text())
        assert {"mmlu", "gsm8k", "humaneval"} <= set(res["results"])
        assert res["n-shot"]["mmlu_anatomy"] == 5 and res["n-shot"]["gsm8k"] == 5
        assert res["n-shot"]["humaneval"] == 0
        assert res["n-samples"]["gsm8k"]["effective"] == 2
        meta = res["attninf"]
        assert meta["offline_data"]["used"] and meta["offline_data"]["path"] == str(offline_dir)
        assert "removed from test" in meta["offline_data"]["benchmarks"]["gsm8k"]["fewshot_pool"]
        assert meta["model"]["source"] == f"pretrain/{arm}/hf"
        assert set(meta["headline"]) == {"mmlu", "gsm8k", "humaneval"}
        assert (d / "samples" / "gsm8k.jsonl").exists() and (d / "tasks" / "humaneval.yaml").exists()
        m = json.loads((d / "manifest.json").read_text())
        assert m["status"] == "done" and m["inputs"]["pretrain/" + arm]["key"] == f"pretrain-{arm}"
    a = json.loads((two_arm_run / "eval/baseline/samples/mmlu_anatomy.jsonl").read_text().splitlines()[0])
    b = json.loads((two_arm_run / "eval/attention_influence/samples/mmlu_anatomy.jsonl").read_text().splitlines()[0])
    assert a["doc"] == b["doc"] and a["resps"] != b["resps"]  # same items, different models


def test_report_renders_table1_from_two_arms(two_arm_run):
    md = (two_arm_run / "report" / "report.md").read_text()
    rep = json.loads((two_arm_run / "report" / "report.json").read_text())
    res = {a: json.loads((two_arm_run / "eval" / a / "results.json").read_text()) for a in ARMS}
    mm = {a: res[a]["results"]["mmlu"] for a in ARMS}
    # Independent arithmetic: delta and its standard error from the two result files.
    d = mm["attention_influence"]["acc,none"] - mm["baseline"]["acc,none"]
    se = (mm["attention_influence"]["acc_stderr,none"] ** 2 + mm["baseline"]["acc_stderr,none"] ** 2) ** 0.5
    row = next(r for r in rep["table1"]["rows"] if r["name"] == "MMLU")
    assert row["delta"]["attention_influence"]["value"] == pytest.approx(d)
    assert row["delta"]["attention_influence"]["stderr"] == pytest.approx(se)
    line = next(ln for ln in md.splitlines() if ln.startswith("| MMLU |"))
    paired = next(r for r in json.loads((two_arm_run / "report" / "deltas.json").read_text())
                  if r["task"] == "mmlu" and r["arm"] == "attention_influence")
    assert paired["delta"] == pytest.approx(d * 100) and paired["n_items"] == mm["baseline"]["sample_count"]["acc,none"]
    assert f"{mm['baseline']['acc,none'] * 100:.2f}" in line and f"{d * 100:+.2f} [{paired['ci_low']:+.2f}, " in line
    assert "| 50.05 | 51.48 | +1.43 |" in line  # the paper's numbers, from paper_numbers.yaml
    assert next(ln for ln in md.splitlines() if ln.startswith("| HellaSwag |")).count("not run") == 3
    assert "Masked-head evaluation: not run" in md
    assert "offline benchmark data" in md and "Config digest" in md
    assert (two_arm_run / "report" / "deltas.png").stat().st_size > 1000
    assert rep["table1"]["average"]["n_benchmarks"] == 3
    # the small-scale metrics: paired bits per byte, checked against the sample logs' own numbers
    bpb = {a: [json.loads(x)["bpb"] for x in (two_arm_run / "eval" / a / "samples" / "gsm8k_bpb.jsonl")
               .read_text().splitlines()] for a in ARMS}
    rec = next(r for r in json.loads((two_arm_run / "report" / "deltas.json").read_text())
               if r["task"] == "gsm8k_bpb" and r["arm"] == "attention_influence")
    assert rec["unit"] == "bits/byte" and rec["higher_is_better"] is False and rec["n_items"] == 2
    assert rec["delta"] == pytest.approx(sum(bpb["attention_influence"]) / 2 - sum(bpb["baseline"]) / 2)
    assert rec["ci_low"] <= rec["delta"] <= rec["ci_high"] and rec["test"] == "sign-flip (exact)"
    mm_p = next(r for r in rep["deltas"] if r["task"] == "mmlu_bpb" and r["metric"] == "p_correct,none")
    assert mm_p["unit"] == "points" and mm_p["n_items"] == 114
    small = md[md.index("### Metrics that move at small scale"):md.index("## Before decay")]
    assert "| GSM8K (reference solution) | bpb,none | attention_influence |" in small
    assert "Context: prompts cut from the left" in small  # tiny BPE, 384 tokens: 5-shot MMLU is cut
    assert "## A prediction written before training" in md and "No prediction" in md


def test_single_model_eval_and_request_cache_resume(tmp_path, tiny_model_dir, offline_dir, allow_code):
    """eval.model=DIR runs once into run_dir/eval; a re-run is answered from lm-eval's cache."""
    import torch

    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"), "stages": ["eval"], "arms": {},
                            "wandb": {"mode": "disabled"}, "experiment_name": "single",
                            "eval": OmegaConf.to_container(composed(
                                f"eval.offline_data={offline_dir}", f"eval.model={tiny_model_dir}",
                                "eval.tasks=[mmlu_anatomy]", "eval.limit=3", "eval.dtype=float32",
                                "eval.max_length=512").eval)})
    run_pipeline(cfg)
    res = json.loads((tmp_path / "run/eval/results.json").read_text())
    assert res["results"]["mmlu_anatomy"]["sample_len"] == 3
    assert list((tmp_path / "run/eval/cache").glob("requests_rank0.db"))
    # A different model answered from the same cache gives the cached (first model's) answers.
    e = build(EvalConfig, cfg.eval, "eval")
    model, tok = harness.load_model(str(tiny_model_dir), "float32", "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    tp, _ = harness.plan(e, tmp_path / "again")
    cached = harness.run_suite(harness.make_lm(model, tok, e), e, tp, tmp_path / "run/eval")
    fresh = harness.run_suite(harness.make_lm(model, tok, e), e, tp, tmp_path / "fresh")
    first = [json.loads(ln)["resps"] for ln in
             (tmp_path / "run/eval/samples/mmlu_anatomy.jsonl").read_text().splitlines()]
    as_json = lambda res: json.loads(json.dumps([s["resps"] for s in res["samples"]["mmlu_anatomy"]]))
    assert as_json(cached) == first
    assert as_json(fresh) != first
