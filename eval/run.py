"""Stage `eval`: score an HF model with lm-evaluation-harness under the paper's settings.

  attninf stages=[eval] eval.model=DIR_OR_HUB_ID run_dir=runs/x          # one model
  attninf stages=[eval] +experiment=demo                                 # every arm's export
  attninf stages=[eval] +experiment=demo eval.pre_decay=true             # + the pre-decay exports

With `eval.model` unset the stage runs once per arm on `pretrain/<arm>/hf`. Writes
`results.json` (lm-eval's format + an `attninf` block: model, offline data, few-shot pools, time),
`samples/<task>.jsonl`, the generated task overrides (`tasks/`) and lm-eval's request cache
(`cache/`, so a killed evaluation resumes without recomputing finished requests). With
`eval.pre_decay=true` the arm's `hf_pre_decay` export is evaluated the same way into
`pre_decay/` (results.json, samples/, cache/) of the same stage folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from attninf.config import ConfigError, asdict, build
from eval import harness
from eval.code_exec import network_isolation_available, sandbox_record
from eval.config import EvalConfig

log = logging.getLogger(__name__)


def _evaluate(ctx, ecfg: EvalConfig, tp, data, path: str, source: str, out: Path, phase: str,
              backend: str = "hf") -> dict:
    from selection.models import precision_of, resolve_model_path

    hf_tasks, gen_tasks = harness.split_tasks(tp.tasks, ecfg, backend)
    res, model_meta, load_s = None, {}, 0.0
    if hf_tasks:
        t0 = time.perf_counter()
        model, tok = harness.load_model(path, ecfg.dtype, ecfg.device)
        load_s = time.perf_counter() - t0
        lm = harness.make_lm(model, tok, ecfg)
        res = harness.run_suite(lm, ecfg, tp, out, tasks=hf_tasks)
        model_meta = {"dtype": precision_of(model)["dtype"], "precision": precision_of(model),
                      "device": str(model.device), "max_length": lm.max_length}
        del lm, model  # the GPU's memory goes to vLLM next
    vllm_meta = None
    if gen_tasks:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        window = harness.model_window(path, ecfg)
        t0 = time.perf_counter()
        vlm = harness.make_vllm_lm(path, ecfg, window)
        vllm_meta = {"tasks": gen_tasks, "model_args": harness.vllm_model_args(ecfg, path, window),
                     "load_s": time.perf_counter() - t0}
        part = harness.run_suite(vlm, ecfg, tp, out, cache_tag="requests-vllm", tasks=gen_tasks)
        if res is None:
            res = part
        else:
            wall = res.get("attninf_wall_s", 0) + part.pop("attninf_wall_s", 0)
            cut = {**res.pop("attninf_truncated", {}), **part.pop("attninf_truncated", {})}
            res = {**harness._merge_results(res, part), "attninf_wall_s": wall, "attninf_truncated": cut}
        model_meta.setdefault("max_length", window)
    meta = {
        "stage": "eval", "arm": ctx.arm, "phase": phase, "suite": ecfg.suite,
        "model": {"path": path, "source": source, "resolved": resolve_model_path(path), "load_s": load_s,
                  **model_meta},
        "backend": {"requested": ecfg.backend, "used": backend, "vllm": vllm_meta},
        "limit": ecfg.limit, "task_limit": dict(ecfg.task_limit), "tasks": tp.tasks, "skipped_tasks": tp.skipped,
        "num_fewshot": {k: v["num_fewshot"] for k, v in tp.leaves.items()},
        "offline_data": harness.data_meta(data),
        "humaneval": asdict(ecfg.humaneval) if "humaneval" in tp.leaves else None,
        "sandbox_network_namespace": network_isolation_available() if "humaneval" in tp.leaves else None,
        "sandbox": sandbox_record(ecfg.humaneval.sandbox) if "humaneval" in tp.leaves else None,
    }
    # Results hit the disk before any W&B call, so a logging failure cannot lose them.
    head = harness.save_results(res, out, meta)
    harness.log_to_tracker(ctx.tracker, res, prefix="eval" if phase == "final" else f"eval_{phase}")
    ctx.tracker.artifact(out / "results.json", type="eval-results",
                         name=f"eval-{ctx.arm or 'model'}" + ("" if phase == "final" else f"-{phase}"))
    for task, h in head.items():
        log.info("%-10s %-9s %s = %.4f ± %.4f", task, phase, h["metric"], h["value"], h["stderr"] or 0.0)
    return {"head": head, "wall_s": res.get("attninf", {}).get("wall_s")}


def run(ctx) -> dict:
    ecfg = build(EvalConfig, ctx.section("eval"), "eval")
    if ecfg.model:
        path, source = ecfg.model, "eval.model"
    elif ctx.arm is not None:
        path, source = str(ctx.upstream("pretrain", ctx.arm) / "hf"), f"pretrain/{ctx.arm}/hf"
    else:
        raise ConfigError("eval.model: set a model dir / hub id, or define arms whose pretraining "
                          "exports are evaluated")
    todo = [("final", path, source, ctx.out)]
    if ecfg.pre_decay:
        pre = Path(path).with_name("hf_pre_decay")
        if not (pre / "config.json").exists():
            raise ConfigError(
                f"eval.pre_decay: {pre} does not exist; train with pretrain.export_pre_decay=true "
                "and pretrain.save_pre_decay=true (and a schedule with a decay phase)")
        todo.append(("pre_decay", str(pre), f"pretrain/{ctx.arm}/hf_pre_decay", ctx.out / "pre_decay"))
    # The backend, tasks, offline data and the code-execution gate are settled before the model loads.
    backend = harness.resolve_backend(ecfg.backend, harness.cuda_available(), harness.vllm_installed())
    if ecfg.backend != "hf":
        log.info("eval.backend=%s: %s for %s", ecfg.backend, backend,
                 "the generation tasks in eval.vllm.tasks" if backend == "vllm" else "every task")
    tp, data = harness.plan(ecfg, ctx.out)
    done = {phase: _evaluate(ctx, ecfg, tp, data, p, src, out, phase, backend) for phase, p, src, out in todo}
    final = done["final"]
    return {"model": path, "tasks": tp.tasks, "skipped": tp.skipped, "offline_data": data.used,
            "headline": final["head"], "wall_s": final["wall_s"],
            **({"pre_decay": {"headline": done["pre_decay"]["head"], "wall_s": done["pre_decay"]["wall_s"]}}
               if "pre_decay" in done else {})}
