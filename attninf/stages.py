"""The stage registry: what each stage reads, its parallel shape, and which functions run it.

Stage functions are imported lazily ("module:function") so `attninf stages=[report]` never
imports Megatron or torch. Artifacts flow one way:
detect -> score -> select -> mix -> pretrain[arm] -> eval[arm] -> report,
with `mirror` (paper Table 6 on probes) and `eval_masked` (Table 6 through lm-eval) hanging off
detect.

A stage declares its parallel shape (`Shape`), and the executors (attninf/runner.py here,
attninf/submit.py on Slurm) run every stage through one lifecycle (attninf/lifecycle.py):
prepare -> run its parts -> finish. They read the shape and the functions below; they never
name a stage:

- `process`: one process runs `target(ctx)`, which returns the outputs summary;
- `array`: `parts(ctx)` lists the stage's parts (names), `run_parts(ctx, names)` does any subset
  of them, yielding each name as it completes (the executor then writes that part's marker),
  and `finish(ctx)` merges them once every part is marked. Array tasks split the list; the
  executor, not the stage, decides which task runs which part;
- `ranks`: one job of `nodes x tasks_per_node` processes, each `python -m <rank_module>
  <stage folder>` (rendezvous from the environment), then `finish(ctx)` in one process.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig

Needs = Callable[[DictConfig, "str | None"], list[tuple[str, "str | None"]]]


@dataclass(frozen=True)
class Shape:
    """How a stage's work is laid out over processes (what an executor must start)."""

    kind: str = "process"  # process | array | ranks
    nodes: int = 1  # ranks: nodes of the one multi-rank job
    tasks_per_node: int = 1  # ranks: processes per node (one per GPU on a GPU cluster)

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node


PROCESS = Shape()
ARRAY = Shape("array")


def _arms(cfg: DictConfig) -> list[str]:
    # One entry per (arm, seed) when pretrain.seeds is set: `<arm>@seed<S>` (attninf/arms.py).
    from attninf.arms import expand

    return expand(cfg)


def _none(cfg, arm):
    return []


def _load(target: str):
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


@dataclass(frozen=True)
class StageSpec:
    name: str
    target: str  # process shape: "module:function" taking a StageContext, returning a JSON-able summary
    sections: tuple[str, ...]  # config sections that define this stage's work
    needs: Needs = _none
    per_arm: Callable[[DictConfig], bool] = lambda cfg: False
    # "module:function(out) -> problem | None": checks a `done` folder's outputs are intact
    # before the runner skips it (a deleted shard is re-made instead of silently missing).
    verify: str | None = None
    # The parallel shape, from the config: "module:function(cfg) -> Shape" (None = one process).
    shape: str | None = None
    parts: str | None = None  # array: "module:function(ctx) -> list[str]"
    run_parts: str | None = None  # array: "module:function(ctx, names) -> Iterator[str]"
    rank_module: str | None = None  # ranks: `python -m <this> <stage folder>` in every rank
    finish: str | None = None  # array / ranks: "module:function(ctx) -> outputs summary"
    # Preflight: "module:function(cfg, arm, resources) -> (facts dict, problems list)", pure
    # arithmetic and imports only (memory per GPU, permissions, libraries), before any job.
    preflight: str | None = None
    # The item of the cost model (attninf/cost.py) this stage's GPU-hours come from, split evenly
    # over its arms: "scoring" | "training" | None.
    cost_item: str | None = None

    def fn(self):
        return _load(self.target)

    def call(self, what: str):
        return _load(getattr(self, what))

    def shape_of(self, cfg: DictConfig) -> Shape:
        return _load(self.shape)(cfg) if self.shape else PROCESS

    def arms(self, cfg: DictConfig) -> list[str | None]:
        return _arms(cfg) if self.per_arm(cfg) else [None]


def _heads_needs(cfg, arm):
    # The rule lives in selection/heads.py (needs_detection); that module imports no torch.
    from selection.heads import needs_detection

    return [("detect", None)] if needs_detection(cfg.get("heads")) else []


def _eval_is_per_arm(cfg) -> bool:
    return not (cfg.get("eval") or {}).get("model") and bool(_arms(cfg))


def _report_needs(cfg, arm):
    # The report reads every folder it shows through these declared upstreams (eval/report.py):
    # each arm's eval; and, when this run has them, each arm's pretraining (token counts, loss
    # curves), the mix (blends), and the selector side. Its key and, in a sweep, its folder follow
    # all of them.
    stages = list(cfg.get("stages") or [])
    needs = [("eval", a) for a in _arms(cfg)]
    if "pretrain" in stages:
        needs += [("pretrain", a) for a in _arms(cfg)]
    return needs + [(s, None) for s in ("detect", "mirror", "select", "mix", "eval_masked") if s in stages]


def array_shape(cfg) -> Shape:
    return ARRAY


def eval_preflight(cfg, arm, resources) -> tuple[dict, list[str]]:
    """HumanEval requested without the code-execution permission, and eval.backend=vllm where it
    cannot run (no vllm package for the jobs' interpreter, no GPU in the eval job's request),
    fail before anything runs (the eval stage itself refuses the same way, but only after
    pretraining). `resources` is the job's request (None on this machine: CUDA is asked here)."""
    import os

    from attninf.config import ConfigError, build
    from eval.config import EvalConfig
    from eval.harness import cuda_available, resolve_backend, vllm_installed

    ecfg = build(EvalConfig, cfg.get("eval"), "eval")
    problems = []
    facts: dict = {}
    if ecfg.backend != "hf":
        gpu = bool(int(getattr(resources, "gpus_per_node", 0) or 0)) if resources is not None else cuda_available()
        no_gpu = ("the eval job asks for no GPU (cluster.stages.eval.gpus_per_node)" if resources is not None
                  else "no CUDA device is visible")
        try:
            facts["eval_backend"] = resolve_backend(ecfg.backend, gpu, vllm_installed(), no_gpu)
        except ConfigError as e:
            problems.append(str(e))
    if "humaneval" in ecfg.tasks:
        missing = [what for what, ok in (("eval.allow_code_eval=true", ecfg.allow_code_eval),
                                         ("HF_ALLOW_CODE_EVAL=1 in the environment",
                                          os.environ.get("HF_ALLOW_CODE_EVAL") == "1")) if not ok]
        if missing:
            problems.append(f"eval: HumanEval is requested but code execution is not permitted "
                            f"(missing {' and '.join(missing)}); permit it or drop humaneval from eval.tasks")
    return facts, problems


STAGES: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec("detect", "selection.detect:run", ("model", "detect")),
    StageSpec("mirror", "selection.mirror:run", ("model", "detect", "heads", "mirror"), _heads_needs),
    StageSpec("score", "selection.score:run", ("model", "heads", "corpus", "score"), _heads_needs,
              verify="selection.score:verify", shape="attninf.stages:array_shape",
              parts="selection.score:parts", run_parts="selection.score:run_parts",
              finish="selection.score:finish", preflight="selection.score:preflight", cost_item="scoring"),
    StageSpec("select", "selection.select:run", ("select",), lambda cfg, arm: [("score", None)]),
    StageSpec("mix", "pretrain.mix:run", ("corpus", "mix", "arms", "tokenizer"),
              lambda cfg, arm: [("select", None)] if any(
                  (a or {}).get("selection") for a in (cfg.get("arms") or {}).values()) else [],
              shape="attninf.stages:array_shape", parts="pretrain.mix:stage_parts",
              run_parts="pretrain.mix:stage_run_parts", finish="pretrain.mix:stage_finish",
              preflight="pretrain.mix:preflight"),
    StageSpec("pretrain", "pretrain.train:finish", ("pretrain",), lambda cfg, arm: [("mix", None)],
              per_arm=lambda cfg: bool(_arms(cfg)), shape="pretrain.train:shape",
              rank_module="pretrain.launch", finish="pretrain.train:finish",
              preflight="pretrain.train:preflight", cost_item="training"),
    StageSpec("eval", "eval.run:run", ("eval",),
              lambda cfg, arm: [("pretrain", arm)] if arm is not None else [],
              per_arm=_eval_is_per_arm, preflight="attninf.stages:eval_preflight"),
    StageSpec("eval_masked", "eval.masked:run", ("model", "heads", "eval"), _heads_needs),
    StageSpec("report", "eval.report:run", ("report", "arms"), _report_needs),
]}

# eval_masked before mix/pretrain: its written prediction (eval/prediction.py) exists before training.
ORDER = ["detect", "mirror", "score", "select", "eval_masked", "mix", "pretrain", "eval", "report"]
