"""One lifecycle, two executors: shapes, parts with atomic markers, typed arms, operational keys.

The array stage here is a real (tiny) stage registered for the test: its parts are files it
writes; the local runner and `python -m attninf.worker` (what a Slurm array task runs) drive it
through the same prepare -> parts -> finish, and neither names it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from attninf import lifecycle
from attninf.config import ConfigError
from attninf.runner import run_pipeline, stage_dirs
from tests.helpers import ROOT

# --- the toy array stage (module-level: workers import it by name) ----------------------------

PART_NAMES = [f"p{i}" for i in range(5)]


def toy_parts(ctx):
    return PART_NAMES[: int(ctx.cfg.score.n)]


def toy_run_parts(ctx, names):
    for n in names:
        (ctx.out / f"{n}.txt").write_text(f"{n}:{ctx.cfg.score.x}\n")
        with open(ctx.out / "calls.log", "a") as fh:
            fh.write(n + "\n")
        yield n


def toy_finish(ctx):
    text = "".join((ctx.out / f"{n}.txt").read_text() for n in ctx.parts)
    (ctx.out / "merged.txt").write_text(text)
    return {"parts": len(ctx.parts)}


def toy_shape(cfg):
    from attninf.stages import ARRAY

    return ARRAY


@pytest.fixture
def array_toy(monkeypatch, toy):
    """`score` as an array stage over toy parts (after the toy `detect`)."""
    from attninf import stages as st

    monkeypatch.setitem(st.STAGES, "score", st.StageSpec(
        "score", "tests.toy_stages:consume", ("score",), lambda cfg, arm: [("detect", None)],
        shape="tests.attninf.test_lifecycle:toy_shape", parts="tests.attninf.test_lifecycle:toy_parts",
        run_parts="tests.attninf.test_lifecycle:toy_run_parts", finish="tests.attninf.test_lifecycle:toy_finish"))


def _cfg(tmp_path, n=5, x=1):
    from tests.toy_stages import pipeline_cfg

    return pipeline_cfg(tmp_path, score={"n": n, "x": x})


def test_local_executor_runs_every_part_then_finish(tmp_path, array_toy):
    cfg = _cfg(tmp_path)
    res = run_pipeline(cfg)
    out = tmp_path / "run" / "score"
    assert res[("score", None)]["status"] == "done" and res[("score", None)]["outputs"] == {"parts": 5}
    assert (out / "merged.txt").read_text() == "".join(f"p{i}:1\n" for i in range(5))
    markers = sorted(p.name for p in (out / "parts").glob("*.done"))
    assert markers == [f"p{i}.done" for i in range(5)]
    key = json.loads((out / "manifest.json").read_text())["key"]
    assert all(json.loads(p.read_text())["key"] == key for p in (out / "parts").glob("*.done"))
    assert not list(out.rglob(".*.tmp*"))  # every marker was renamed into place


def _worker(stage_dir: Path, step: str, rank: int | None = None, world: int | None = None):
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    if rank is not None:
        env.update(ATTNINF_RANK=str(rank), ATTNINF_WORLD_SIZE=str(world))
    # the toy stage must be registered inside the worker too
    code = ("import sys; from tests.attninf import test_lifecycle as t; from attninf import stages as st; "
            "st.STAGES['score'] = st.StageSpec('score', 'tests.toy_stages:consume', ('score',), "
            "lambda c, a: [('detect', None)], shape='tests.attninf.test_lifecycle:toy_shape', "
            "parts='tests.attninf.test_lifecycle:toy_parts', run_parts='tests.attninf.test_lifecycle:toy_run_parts', "
            "finish='tests.attninf.test_lifecycle:toy_finish'); "
            "st.STAGES['detect'] = st.StageSpec('detect', 'tests.toy_stages:produce', ('detect',)); "
            "from attninf.worker import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, str(stage_dir), "--step", step], env=env,
                          capture_output=True, text=True, timeout=120)


def test_array_tasks_run_any_subset_and_finish_needs_every_marker(tmp_path, array_toy):
    """What a Slurm array runs: task r of n takes a contiguous run of the parts
    (lifecycle.share); the finish job refuses while a part is missing and completes the manifest
    once every part is marked; a re-run repeats nothing."""
    cfg = _cfg(tmp_path)
    run_pipeline(OmegaConf.merge(cfg, {"stages": ["detect"]}))
    dirs = stage_dirs(cfg, [], False)
    unit = lifecycle.plan_units(cfg, ["score"], dirs)[("score", None)]
    assert lifecycle.prepare(cfg, unit) is None  # frozen config + running manifest
    out = unit.out
    p = _worker(out, "parts", 1, 2)  # task 1 of 2: p2, p3, p4 (the parts whose midpoints lie in the second half)
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in (out / "parts").glob("*.done")) == ["p2.done", "p3.done", "p4.done"]
    p = _worker(out, "finish")
    assert p.returncode == 2 and "2 of 5 parts are not finished (e.g. p0)" in p.stderr, p.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    assert _worker(out, "parts", 0, 2).returncode == 0  # p0, p1
    assert _worker(out, "parts", 0, 2).returncode == 0  # again: every part of its share is marked
    assert (out / "calls.log").read_text().split() == ["p2", "p3", "p4", "p0", "p1"]
    p = _worker(out, "finish")
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert (m["status"], m["key"], m["outputs"]) == ("done", unit.key, {"parts": 5})
    # the local executor sees the same folder as done: nothing runs again
    run_pipeline(cfg)
    assert (out / "calls.log").read_text().split() == ["p2", "p3", "p4", "p0", "p1"]


@pytest.mark.parametrize("world", [1, 2, 3, 7, 8, 40])
def test_share_is_contiguous_covers_every_part_and_balances_the_weights(world):
    """The executors' one split: contiguous runs in list order, each part once, every task
    within half of the heaviest part of 1/world of the weight; without weights, blocks."""
    import numpy as np

    names = [f"shard-{i:05d}" for i in range(40)]
    weights = [int(w) for w in np.random.default_rng(world).integers(1, 1000, size=40)]
    got = [lifecycle.share(names, r, world, weights) for r in range(world)]
    assert [n for g in got for n in g] == names
    total = sum(weights)
    for g in got:
        assert abs(sum(weights[names.index(n)] for n in g) - total / world) <= max(weights)
    blocks = [lifecycle.share(names, r, world) for r in range(world)]
    assert [n for g in blocks for n in g] == names
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_a_stage_may_weight_its_parts_and_the_index_keeps_the_weights(tmp_path, array_toy, monkeypatch):
    """parts(ctx) may return (name, weight) pairs: the index keeps names and weights, and a task's
    share is balanced by them (one heavy first part is a task's whole share)."""
    cfg = _cfg(tmp_path)
    run_pipeline(OmegaConf.merge(cfg, {"stages": ["detect"]}))
    monkeypatch.setattr(sys.modules[__name__], "toy_parts",
                        lambda ctx: [("p0", 100.0)] + [(f"p{i}", 1.0) for i in range(1, 5)])
    dirs = stage_dirs(cfg, [], False)
    unit = lifecycle.plan_units(cfg, ["score"], dirs)[("score", None)]
    lifecycle.prepare(cfg, unit)
    ctx = lifecycle.context(cfg, unit, dirs)
    names, mine = lifecycle.task_parts(ctx, unit, 0, 2)
    assert names == PART_NAMES and mine == ["p0"]
    assert lifecycle.task_parts(ctx, unit, 1, 2)[1] == ["p1", "p2", "p3", "p4"]
    idx = json.loads((unit.out / "parts" / "index.json").read_text())
    assert idx["weights"] == [100.0, 1.0, 1.0, 1.0, 1.0]


def test_a_marker_under_another_key_does_not_count(tmp_path, array_toy):
    cfg = _cfg(tmp_path)
    run_pipeline(cfg)
    out = tmp_path / "run" / "score"
    marker = json.loads((out / "parts" / "p2.done").read_text())
    (out / "parts" / "p2.done").write_text(json.dumps({**marker, "key": "another"}))
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    (out / "calls.log").unlink()
    run_pipeline(cfg)
    assert (out / "calls.log").read_text().split() == ["p2"]


def test_the_lifecycle_holds_no_lock_while_parts_run():
    """No flock (or any lock) in the lifecycle and the executors: parts coordinate by markers."""
    for f in ("attninf/lifecycle.py", "attninf/submit.py", "attninf/worker.py", "attninf/plan.py"):
        text = (ROOT / f).read_text()
        assert "fcntl" not in text and "flock" not in text, f


STAGE_NAMES = ("detect", "mirror", "score", "select", "mix", "pretrain", "eval", "eval_masked", "report")


def test_executors_and_launch_name_no_stage():
    """The executors (runner, submitter, worker, plan, lifecycle, rank launcher) hold no stage name
    as a string: they read shapes and functions from the registry."""
    pat = re.compile(r"""["'](%s)["'\[]""" % "|".join(STAGE_NAMES))
    for f in ("attninf/runner.py", "attninf/submit.py", "attninf/worker.py", "attninf/plan.py",
              "attninf/lifecycle.py", "attninf/dist.py"):
        code = (ROOT / f).read_text()
        hits = [ln for ln in code.splitlines() if pat.search(ln)]
        assert not hits, (f, hits)


# --- typed arms ------------------------------------------------------------------------------

def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("arm, message", [
    ({"selectoin": "random"}, r"^unknown config key\(s\) arms.x.selectoin; known: selection, subset_weight"),
    ({"selection": "attention_infleunce"}, r"^arms.x.selection: 'attention_infleunce' is not a selection method"),
    ({"subset_weight": 1.0}, r"^arms.x.subset_weight: 1.0 must be null .* or in \(0, 1\)"),
    ({"subset_weight": 1.5}, r"^arms.x.subset_weight: 1.5 must be null"),
])
def test_arms_are_typed_and_checked_before_any_stage(tmp_path, arm, message):
    cfg = _compose(["+experiment=smoke", f"run_dir={tmp_path / 'run'}", "stages=[pretrain]"])
    cfg.arms = {"baseline": {"selection": None}, "x": arm}
    with pytest.raises(ConfigError, match=message):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "pretrain").exists()


def test_an_arm_method_that_select_does_not_make_is_refused():
    from attninf.typed import typed_sections

    cfg = _compose(["+experiment=smoke", "select.methods=[attention_influence]", "stages=[select]"])
    with pytest.raises(ConfigError, match=r"^arms.random.selection: 'random' is not in select.methods"):
        typed_sections(cfg, ["select"])
    typed = typed_sections(_compose(["+experiment=smoke", "stages=[select]"]), ["select"])
    assert typed["arms"]["attention_influence"].selection == "attention_influence"
    assert typed["pretrain"].launch.world == 1


# --- operational keys --------------------------------------------------------------------------

def test_operational_settings_do_not_change_the_pretrain_key():
    from attninf.lifecycle import stage_key

    base = _compose(["+experiment=smoke"])
    inputs = {"mix": {"path": "x", "key": "k"}}
    key = stage_key(base, "pretrain", "baseline", inputs)[0]
    for ov in ("pretrain.save_interval=2", "pretrain.eval_interval=5", "pretrain.exit_after_steps=3",
               "pretrain.launch.tasks_per_node=2", "pretrain.launch.nodes=2", "pretrain.log_interval=3",
               "pretrain.keep_last=5", "cluster=slurm_onenode"):
        assert stage_key(_compose(["+experiment=smoke", ov]), "pretrain", "baseline", inputs)[0] == key, ov
    for ov in ("pretrain.optim.lr=0.002", "pretrain.train_iters=7", "pretrain.tensor_parallel=2"):
        assert stage_key(_compose(["+experiment=smoke", ov]), "pretrain", "baseline", inputs)[0] != key, ov
