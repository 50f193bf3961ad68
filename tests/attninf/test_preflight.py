"""The preflight plan of `cluster=slurm`: presets submit what they say, each refusal is one line.

Composed with Hydra as the CLI composes them; `submit.preflight` is what runs before anything is
written or submitted (and all `cluster.dry_run=true` adds is printing it and plan.json).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from attninf.config import ConfigError
from attninf.submit import preflight
from tests.helpers import ROOT

PERMIT = ["eval.allow_code_eval=true", "pretrain.allow_local_spec=true"]


def ingested(folder, files_per_domain: int = 32) -> list[str]:
    """The paper presets after ingest (slurm/README.md): every stage reads local parquet. A
    stand-in with the ingest's layout and fields, one row group per file: 128 parts, enough for
    the presets' 128 score tasks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for d in ("fineweb_edu", "cosmopedia", "python_edu", "openwebmath"):
        (folder / d).mkdir(parents=True, exist_ok=True)
        for f in range(files_per_domain):
            pq.write_table(pa.table({"id": [f"{d}-{f}-0", f"{d}-{f}-1"], "domain": [d, d],
                                     "text": ["a document", "another one"]}), folder / d / f"{f:05d}.parquet")
    return ["corpus=parquet", f"corpus.paths=[{folder}/*/*.parquet]", "corpus.id_field=id",
            "corpus.domain_field=domain"]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture
def code_eval_permitted(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


def _plan(tmp_path, preset, *extra, corpus: list[str] | None = None):
    corpus = ingested(tmp_path / "ingested") if corpus is None else corpus
    cfg = _compose([f"+experiment={preset}", f"run_dir={tmp_path / 'run'}", "cluster=slurm", *corpus, *extra])
    _, _, _, jobs, problems = preflight(cfg)
    return {j.id: j for j in jobs}, problems


def test_paper_7b_submits_32_nodes_of_8_ranks(tmp_path, code_eval_permitted):
    jobs, problems = _plan(tmp_path, "paper_7b", *PERMIT)
    assert problems == [], problems
    arms = ["baseline", "attention_influence", "random", "perplexity"]
    assert list(jobs) == ["detect", "score:parts", "score:finish", "select", "mix:parts", "mix:finish",
                          *[f"pretrain[{a}]" for a in arms], *[f"eval[{a}]" for a in arms], "report"]
    for a in arms:
        j = jobs[f"pretrain[{a}]"]
        assert (j.step, j.nodes, j.tasks_per_node, j.gpus_per_node, j.gpus) == ("ranks", 32, 8, 8, 256)
        assert j.after == ["mix:finish"] and j.time_min == 2880
        # 6 x 6.07e9 x 1e12 + attention, at MFU 0.4 of 989.4 TFLOP/s, over 4 arms: ~30k GPU-h each
        assert 29_000 < j.gpu_hours < 31_000 and j.wall_hours == pytest.approx(j.gpu_hours / 256)
        mem = j.facts["memory_per_gpu"]
        assert 30 < mem["total"] < 45 and mem["gpu_gib"] == 80  # TP2 + SP + flash: fits in 80 GB
    s = jobs["score:parts"]
    assert (s.array, s.gpus_per_node, jobs["score:finish"].after) == (128, 1, ["score:parts"])
    assert jobs["select"].after == ["score:finish"]
    m = jobs["mix:parts"]
    assert (m.array, m.gpus_per_node, jobs["mix:finish"].after) == (32, 0, ["mix:parts"])


def test_paper_1b_proxy_submits_4_nodes_of_8_ranks(tmp_path, code_eval_permitted):
    jobs, problems = _plan(tmp_path, "paper_1b_proxy", *PERMIT)
    assert problems == [], problems
    j = jobs["pretrain[baseline]"]
    assert (j.nodes, j.tasks_per_node, j.gpus) == (4, 8, 32)
    assert 7 < j.wall_hours < 10  # the preset says ~9 h per arm


def test_ranks_that_do_not_match_tp_pp_dp_are_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^pretrain.launch: launch.nodes x launch.tasks_per_node = 16 x 8 = 128 "
                                          r"ranks, but tensor_parallel x pipeline_parallel x data_parallel = "
                                          r"2 x 1 x 128 = 256$"):
        _plan(tmp_path, "paper_7b", "pretrain.launch.nodes=16")


def test_tasks_per_node_must_equal_gpus_per_node(tmp_path, code_eval_permitted):
    _, problems = _plan(tmp_path, "paper_7b", *PERMIT, "pretrain.launch.nodes=64", "pretrain.launch.tasks_per_node=4")
    assert problems == [f"pretrain[{a}]: 4 tasks per node but cluster.stages.pretrain.gpus_per_node=8: one rank "
                        "per GPU (set the stage's tasks per node or the GPUs per node so they match)"
                        for a in ("baseline", "attention_influence", "random", "perplexity")]


def test_refusal_wall_time_beyond_the_limit_and_its_requeues(tmp_path, code_eval_permitted):
    _, problems = _plan(tmp_path, "paper_7b", *PERMIT, "cluster.stages.pretrain.time_min=1440",
                        "cluster.max_requeues=2")
    assert len(problems) == 4
    assert problems[0].startswith("pretrain[baseline]: estimated 117.6 h of wall time per job is beyond its time "
                                  "limit x (1 + requeues) = 24 h x 3 = 72 h; raise"), problems[0]


def test_refusal_memory_over_the_gpus(tmp_path, code_eval_permitted):
    """The local spec's attention keeps the s x s matrix: at sequence 8192 it does not fit."""
    _, problems = _plan(tmp_path, "paper_7b", *PERMIT, "pretrain.gpu.attention_backend=unfused")
    (p,) = problems
    assert re.match(r"pretrain: 1\d\d\.\d GiB per GPU \(weights 5.7, gradients 11.3, optimizer 0.3, activations "
                    r"1\d\d\.\d, logits 1.5\) is over the GPU's 80 GiB", p), p


def test_refusal_humaneval_without_code_execution(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    _, problems = _plan(tmp_path, "paper_7b", "pretrain.allow_local_spec=true")
    assert problems == ["eval: HumanEval is requested but code execution is not permitted (missing "
                        "eval.allow_code_eval=true and HF_ALLOW_CODE_EVAL=1 in the environment); permit it "
                        "or drop humaneval from eval.tasks"]


def test_refusal_layer_spec_library_missing(tmp_path, code_eval_permitted):
    pytest.importorskip("megatron.core")
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("TransformerEngine is installed here")
    except ImportError:
        pass
    _, problems = _plan(tmp_path, "paper_7b", "eval.allow_code_eval=true")
    assert problems == ["pretrain: the TransformerEngine layer spec is required on GPUs and transformer_engine is "
                        "not importable here; install it (pip install transformer-engine[pytorch]) or set "
                        "pretrain.allow_local_spec=true"]


def test_dry_run_prints_the_graph_writes_plan_json_and_submits_nothing(tmp_path):
    """Through the CLI, without any Slurm on PATH: refusals are `refused:` lines, exit 2."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": f"{empty}:{os.path.dirname(sys.executable)}", "PYTHONPATH": str(ROOT),
           "WANDB_MODE": "disabled", "HF_ALLOW_CODE_EVAL": "1"}
    run = tmp_path / "run"
    corpus = ingested(tmp_path / "ingested")
    p = subprocess.run([sys.executable, "-m", "attninf.cli", "+experiment=paper_7b", f"run_dir={run}",
                        "cluster=slurm", "cluster.dry_run=true", *PERMIT, *corpus], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0].split()[:6] == ["job", "nodes", "tasks/n", "GPUs", "CPUs/t", "mem"]
    row = next(ln for ln in lines if ln.startswith("pretrain[baseline]")).split()
    assert row[1:4] == ["32", "8", "256"] and row[6] == "48h00"
    assert any(ln.startswith("memory per GPU (pretrain, GiB): weights 5.7") for ln in lines)
    plan = json.loads((run / "cluster" / "plan.json").read_text())
    assert len(plan["jobs"]) == 15 and plan["problems"] == []  # mix is an array: parts + finish
    # nothing prepared, nothing submitted: no stage folder, no jobs.json (Hydra's own .hydra/ aside)
    assert set(os.listdir(run)) - {".hydra"} == {"cluster"} and os.listdir(run / "cluster") == ["plan.json"]
    # a refusal: one `refused:` line per problem, exit 2, plan.json still written
    p = subprocess.run([sys.executable, "-m", "attninf.cli", "+experiment=paper_7b", f"run_dir={run}",
                        "cluster=slurm", "cluster.dry_run=true", "pretrain.allow_local_spec=true", *corpus],
                       env={**env, "HF_ALLOW_CODE_EVAL": "0"}, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2
    refused = [ln for ln in p.stdout.splitlines() if ln.startswith("refused: ")]
    assert len(refused) == 1 and "HumanEval" in refused[0]
    assert json.loads((run / "cluster" / "plan.json").read_text())["problems"] == [refused[0][len("refused: "):]]



def test_refusals_of_the_data_path_at_size(tmp_path, code_eval_permitted):
    """Errors that only show at size, before any job: a hub stream split over array tasks, more
    tasks than parts, a mix task's memory request below its processes."""
    _, problems = _plan(tmp_path, "paper_7b", *PERMIT, corpus=[])  # the preset's own hub stream
    assert problems == [
        "score: corpus.kind=hf is one part ('all') but cluster.stages.score.array_tasks=128: ingest the "
        "corpus first (python -m tools.ingest) or set cluster.stages.score.array_tasks=1",
        "mix: corpus.kind=hf is one part ('all') but cluster.stages.mix.array_tasks=32: ingest the "
        "corpus first (python -m tools.ingest) or set cluster.stages.mix.array_tasks=1"], problems
    small = ingested(tmp_path / "small", files_per_domain=2)  # 8 parts
    jobs, problems = _plan(tmp_path, "paper_7b", *PERMIT, "+cluster.stages.mix.mem_gb=4", corpus=small)
    assert jobs["score:parts"].facts["parts"] == 8 and jobs["mix:parts"].facts["memory_gb_per_task"] == 8.5
    assert problems == [
        "score: cluster.stages.score.array_tasks=128 but the corpus has 8 parts of <= 20,000 rows: 120 tasks "
        "would find no work; lower cluster.stages.score.array_tasks or the part size",
        "mix: cluster.stages.mix.array_tasks=32 but the corpus has 8 parts of <= 100,000 rows: 24 tasks would "
        "find no work; lower cluster.stages.mix.array_tasks or the part size",
        "mix: cluster.stages.mix.mem_gb=4 but each task runs 17 processes of ~0.5 GB (8.5 GB); raise mem_gb "
        "or lower mix.workers"], problems
