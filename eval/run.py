"""Stage `eval`: score an HF model with lm-evaluation-harness under the paper's settings.

  attninf stages=[eval] eval.model=DIR_OR_HUB_ID run_dir=runs/x          # one model
  attninf stages=[eval] +experiment=demo                                 # every arm's export

With `eval.model` unset the stage runs once per arm on `pretrain/<arm>/hf`. Writes
`results.json` (lm-eval's format + an `attninf` block: model, mirror, few-shot pools, time),
`samples/<task>.jsonl`, the generated task overrides (`tasks/`) and lm-eval's request cache
(`cache/`, so a killed evaluation resumes without recomputing finished requests).
"""

from __future__ import annotations

import logging
import time

from attninf.config import ConfigError, asdict, build
from eval import harness
from eval.code_exec import network_isolation_available, sandbox_record
from eval.config import EvalConfig

log = logging.getLogger(__name__)


def run(ctx) -> dict:
    ecfg = build(EvalConfig, ctx.section("eval"), "eval")
    if ecfg.model:
        path, source = ecfg.model, "eval.model"
    elif ctx.arm is not None:
        path, source = str(ctx.upstream("pretrain", ctx.arm) / "hf"), f"pretrain/{ctx.arm}/hf"
    else:
        raise ConfigError("eval.model: set a model dir / hub id, or define arms whose pretraining "
                          "exports are evaluated")
    # Tasks, mirror and the code-execution gate are settled before the model loads.
    tp, mirror = harness.plan(ecfg, ctx.out)
    t0 = time.perf_counter()
    model, tok = harness.load_model(path, ecfg.dtype, ecfg.device)
    load_s = time.perf_counter() - t0
    lm = harness.make_lm(model, tok, ecfg)
    res = harness.run_suite(lm, ecfg, tp, ctx.out)
    meta = {
        "stage": "eval", "arm": ctx.arm, "suite": ecfg.suite,
        "model": {"path": path, "source": source, "resolved": harness.resolve_model_path(path),
                  "dtype": ecfg.dtype, "device": str(model.device), "load_s": load_s,
                  "max_length": lm.max_length},
        "limit": ecfg.limit, "tasks": tp.tasks, "skipped_tasks": tp.skipped,
        "num_fewshot": {k: v["num_fewshot"] for k, v in tp.leaves.items()},
        "mirror": harness.mirror_meta(mirror),
        "humaneval": asdict(ecfg.humaneval) if "humaneval" in tp.leaves else None,
        "sandbox_network_namespace": network_isolation_available() if "humaneval" in tp.leaves else None,
        "sandbox": sandbox_record(ecfg.humaneval.sandbox) if "humaneval" in tp.leaves else None,
    }
    # Results hit the disk before any W&B call, so a logging failure cannot lose them.
    head = harness.save_results(res, ctx.out, meta)
    harness.log_to_tracker(ctx.tracker, res)
    ctx.tracker.artifact(ctx.out / "results.json", type="eval-results",
                         name=f"eval-{ctx.arm or 'model'}")
    for task, h in head.items():
        log.info("%-10s %s = %.4f ± %.4f", task, h["metric"], h["value"], h["stderr"] or 0.0)
    return {"model": path, "tasks": tp.tasks, "skipped": tp.skipped, "mirror": mirror.used,
            "headline": head, "wall_s": res.get("attninf", {}).get("wall_s")}
