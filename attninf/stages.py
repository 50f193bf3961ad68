"""The stage registry: what each stage reads (config sections, upstream stages) and runs.

Stage functions are imported lazily ("module:function") so `attninf stages=[report]` never
imports Megatron or torch. Artifacts flow one way:
detect -> score -> select -> mix -> pretrain[arm] -> eval[arm] -> report,
with `mirror` (paper Table 6 on probes) and `eval_masked` (Table 6 through lm-eval) hanging off
detect.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig

Needs = Callable[[DictConfig, "str | None"], list[tuple[str, "str | None"]]]


def _arms(cfg: DictConfig) -> list[str]:
    # One entry per (arm, seed) when pretrain.seeds is set: `<arm>@seed<S>` (attninf/arms.py).
    from attninf.arms import expand

    return expand(cfg)


def _none(cfg, arm):
    return []


@dataclass(frozen=True)
class StageSpec:
    name: str
    target: str  # "module:function" taking a StageContext, returning a JSON-able outputs summary
    sections: tuple[str, ...]  # config sections that define this stage's work
    needs: Needs = _none
    per_arm: Callable[[DictConfig], bool] = lambda cfg: False
    # "module:function(out) -> problem | None": checks a `done` folder's outputs are intact
    # before the runner skips it (a deleted shard is re-made instead of silently missing).
    verify: str | None = None

    def fn(self):
        mod, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(mod), attr)

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


STAGES: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec("detect", "selection.detect:run", ("model", "detect")),
    StageSpec("mirror", "selection.mirror:run", ("model", "detect", "heads", "mirror"), _heads_needs),
    StageSpec("score", "selection.score:run", ("model", "heads", "corpus", "score"), _heads_needs,
              verify="selection.score:verify"),
    StageSpec("select", "selection.select:run", ("select",), lambda cfg, arm: [("score", None)]),
    StageSpec("mix", "pretrain.mix:run", ("corpus", "mix", "arms", "tokenizer"),
              lambda cfg, arm: [("select", None)] if any(
                  (a or {}).get("selection") for a in (cfg.get("arms") or {}).values()) else []),
    StageSpec("pretrain", "pretrain.train:run", ("pretrain",), lambda cfg, arm: [("mix", None)],
              per_arm=lambda cfg: bool(_arms(cfg))),
    StageSpec("eval", "eval.run:run", ("eval",),
              lambda cfg, arm: [("pretrain", arm)] if arm is not None else [],
              per_arm=_eval_is_per_arm),
    StageSpec("eval_masked", "eval.masked:run", ("model", "heads", "eval"), _heads_needs),
    StageSpec("report", "eval.report:run", ("report", "arms"), _report_needs),
]}

# eval_masked before mix/pretrain: its written prediction (eval/prediction.py) exists before training.
ORDER = ["detect", "mirror", "score", "select", "eval_masked", "mix", "pretrain", "eval", "report"]
