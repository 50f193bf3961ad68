"""eval.backend: lm-eval's vLLM model for the generation tasks, HF for the rest and on CPU.

No GPU and no vllm package here: what is tested is what lm-eval would be given (the model name
and its arguments, checked against lm-eval's own VLLM signature read from its source), that
`auto` resolves to hf on this machine, that an explicit `vllm` is refused in one line before
anything loads (at run time and in a Slurm dry run), and that `auto` runs the eval on HF.
"""

from __future__ import annotations

import ast
import importlib.util
import json

import pytest
from omegaconf import OmegaConf

from attninf.config import ConfigError, build
from attninf.runner import run_pipeline
from eval import harness
from eval.config import EvalConfig
from tests.eval.test_run import composed

HERE_CUDA, HERE_VLLM = harness.cuda_available(), harness.vllm_installed()


def _lm_eval_vllm_init() -> tuple[str, set[str]]:
    """(registered name, __init__ parameter names) of lm-eval's VLLM class, from its source:
    importing it needs the vllm package, reading it does not."""
    spec = importlib.util.find_spec("lm_eval.models.vllm_causallms")
    tree = ast.parse(open(spec.origin).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VLLM")
    (deco,) = [d for d in cls.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "register_model"]
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return deco.args[0].value, {a.arg for a in init.args.args + init.args.kwonlyargs}


def test_a_bad_backend_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^eval\.backend: 'vlm' is not one of hf \| vllm \| auto$"):
        build(EvalConfig, {"backend": "vlm"}, "eval")
    with pytest.raises(ConfigError, match=r"^eval\.vllm\.gpu_memory_utilization: must be in \(0, 1\]$"):
        build(EvalConfig, {"vllm": {"gpu_memory_utilization": 1.5}}, "eval")


def test_backend_resolution():
    assert harness.resolve_backend("hf", True, True) == "hf"
    assert harness.resolve_backend("auto", True, True) == "vllm"
    assert harness.resolve_backend("auto", False, True) == harness.resolve_backend("auto", True, False) == "hf"
    assert harness.resolve_backend("vllm", True, True) == "vllm"
    # this machine: no CUDA and no vllm, so auto is HF
    if not (HERE_CUDA and HERE_VLLM):
        assert harness.resolve_backend("auto", HERE_CUDA, HERE_VLLM) == "hf"
    with pytest.raises(ConfigError) as e:
        harness.resolve_backend("vllm", False, False)
    assert str(e.value) == ("eval.backend=vllm: the vllm package is not installed (pip install vllm) and no CUDA "
                            "device is visible; use eval.backend=hf or auto (auto falls back to hf)")


def test_generation_tasks_go_to_vllm_and_the_rest_stay_on_hf():
    e = build(EvalConfig, composed("eval=paper", "eval.backend=vllm").eval, "eval")
    hf, gen = harness.split_tasks(e.tasks, e, "vllm")
    assert gen == ["gsm8k", "minerva_math", "humaneval", "bbh_fewshot", "drop", "triviaqa"]
    assert "mmlu" in hf and "gsm8k_bpb" in hf and "humaneval_bpb" in hf and not set(hf) & set(gen)
    assert harness.split_tasks(e.tasks, e, "hf") == (e.tasks, [])


def test_vllm_model_args_are_what_lm_eval_s_vllm_model_takes():
    e = build(EvalConfig, composed("eval=paper", "eval.backend=vllm", "eval.vllm.tensor_parallel_size=2",
                                   "eval.vllm.gpu_memory_utilization=0.85").eval, "eval")
    args = harness.vllm_model_args(e, "/models/arm/hf", window=4096)
    assert args == {"pretrained": "/models/arm/hf", "dtype": "bfloat16", "tensor_parallel_size": 2,
                    "max_model_len": 4096,  # eval.max_length 8192 capped at the model's 4096 positions
                    "gpu_memory_utilization": 0.85, "max_num_seqs": 256, "enforce_eager": False,
                    "batch_size": "auto", "seed": 1234}
    assert harness.vllm_model_args(e, "m", window=16384)["max_model_len"] == 8192
    name, params = _lm_eval_vllm_init()
    assert name == "vllm"
    # lm-eval's own arguments by name; the rest reach vllm.LLM through its **kwargs
    own = {"pretrained", "dtype", "tensor_parallel_size", "max_model_len", "batch_size", "seed"}
    assert own <= params and "kwargs" not in params
    assert set(args) - own == {"gpu_memory_utilization", "max_num_seqs", "enforce_eager"}
    assert not (set(args) - own) & params  # engine arguments, passed through untouched


@pytest.mark.skipif(HERE_CUDA and HERE_VLLM, reason="vLLM can run here")
def test_an_explicit_vllm_is_refused_before_any_model_loads(tmp_path, tiny_model_dir, offline_dir):
    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"), "stages": ["eval"], "arms": {},
                            "wandb": {"mode": "disabled"}, "experiment_name": "vllm",
                            "eval": OmegaConf.to_container(composed(
                                f"eval.offline_data={offline_dir}", f"eval.model={tiny_model_dir}",
                                "eval.tasks=[gsm8k]", "eval.backend=vllm").eval)})
    with pytest.raises(ConfigError, match=r"^eval\.backend=vllm: .*use eval\.backend=hf or auto"):
        run_pipeline(cfg)
    assert not (tmp_path / "run/eval/results.json").exists() and not (tmp_path / "run/eval/tasks").exists()


def test_auto_runs_generation_on_hf_here_and_records_it(tmp_path, tiny_model_dir, offline_dir):
    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"), "stages": ["eval"], "arms": {},
                            "wandb": {"mode": "disabled"}, "experiment_name": "auto",
                            "eval": OmegaConf.to_container(composed(
                                f"eval.offline_data={offline_dir}", f"eval.model={tiny_model_dir}",
                                "eval.tasks=[gsm8k]", "eval.limit=2", "eval.dtype=float32",
                                "eval.max_length=256", "eval.backend=auto").eval)})
    run_pipeline(cfg)
    res = json.loads((tmp_path / "run/eval/results.json").read_text())
    expected = "vllm" if HERE_CUDA and HERE_VLLM else "hf"
    assert res["attninf"]["backend"]["requested"] == "auto" and res["attninf"]["backend"]["used"] == expected
    assert res["results"]["gsm8k"]["sample_len"] == 2


def _plan_problems(tmp_path, *extra):
    from tests.attninf.test_preflight import _plan

    return _plan(tmp_path, "paper_7b", "pretrain.allow_local_spec=true", "eval.allow_code_eval=true", *extra)


def test_a_slurm_dry_run_refuses_vllm_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    jobs, problems = _plan_problems(tmp_path)  # the preset: auto, no refusal, the choice shown
    assert problems == []
    (ev,) = [j for j in jobs.values() if j.stage == "eval" and j.arm == "baseline"]
    assert ev.facts["eval_backend"] == ("vllm" if HERE_VLLM else "hf")
    if not HERE_VLLM:
        _, problems = _plan_problems(tmp_path, "eval.backend=vllm")
        assert problems == ["eval.backend=vllm: the vllm package is not installed (pip install vllm); use "
                            "eval.backend=hf or auto (auto falls back to hf)"]
    # an eval job that asks for no GPU cannot run vLLM whatever is installed
    _, problems = _plan_problems(tmp_path, "eval.backend=vllm", "+cluster.stages.eval.gpus_per_node=0")
    assert problems and problems[0].startswith("eval.backend=vllm: ") and \
        problems[0].endswith("the eval job asks for no GPU (cluster.stages.eval.gpus_per_node); use "
                             "eval.backend=hf or auto (auto falls back to hf)")
