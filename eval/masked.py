"""Stage `eval_masked`: paper Table 6 ("mirror effect") through the same lm-eval tasks.

The selector (the `model` group) is evaluated three times: unmasked, with its retrieval heads
masked, and with as many random non-retrieval heads masked. The paper's finding: masking
retrieval heads wrecks GSM8K/BBH/MMLU while random heads barely matter.

The masking is the selection work's own (selection.masking, installed by load_selector), toggled
on the loaded model around each lm-eval run, so exactly the heads and mode used for scoring are
evaluated here. Each head set gets its own folder (results.json, samples, request cache) and
`results.json` at the top sums them up:
{"head_sets": {name: {"heads": [[l, h], ...], "n_heads": k, "headline": {...}}}, "attninf": {...}}.
`prediction.json` / `prediction.md`: the written prediction of which tasks should gain
(eval/prediction.py); the stage runs before `mix` and `pretrain` so it is on disk before training.

  attninf stages=[detect,eval_masked] eval=core eval.limit=50 eval.allow_code_eval=true
"""

from __future__ import annotations

import dataclasses
import logging
import time

from attninf.config import build
from attninf.manifest import write_json
from eval import harness, prediction
from eval.config import EvalConfig

log = logging.getLogger(__name__)


def head_sets(hcfg, heads_json: dict | None, n_layers: int, n_heads: int, wanted: list[str]) -> dict:
    """{slot: (heads, label)} for the requested Table-6 rows.

    Slot `retrieval` = the configured `heads` set (whatever heads.set names: its label says which,
    so heads.set=bottom is not reported as retrieval heads); slot `random` = as many random heads
    (heads.seed) drawn outside both the masked set and the retrieval heads, the paper's control.
    """
    from selection.heads import describe, random_heads, resolve_heads, retrieval_set

    target = resolve_heads(hcfg, heads_json, n_layers, n_heads)
    out = {}
    for name in wanted:
        if name == "none":
            out[name] = ([], "unmasked")
        elif name == "retrieval":
            out[name] = (list(target), describe(hcfg, target))
        elif name == "random":
            avoid = set(target) | set(retrieval_set(hcfg, heads_json, n_layers, n_heads))
            rnd = random_heads(max(1, len(target)), avoid, n_layers, n_heads, hcfg.seed)
            out[name] = (rnd, f"{len(rnd)} random heads (outside the masked"
                              f"{' and the retrieval' if heads_json is not None else ''} heads)")
    return out


def run(ctx) -> dict:
    from selection.heads import HeadsConfig, heads_json_for_stage
    from selection.heads import head_geometry
    from selection.masking import base_implementation, mask_heads
    from selection.models import ModelConfig, load_selector, precision_of, resolve_model_path

    ecfg = build(EvalConfig, ctx.section("eval"), "eval")
    ecfg = dataclasses.replace(ecfg, tasks=list(ecfg.masked.tasks or ecfg.tasks), task_limit={},
                               limit=ecfg.masked.limit if ecfg.masked.limit is not None else ecfg.limit)
    mcfg = build(ModelConfig, ctx.section("model"), "model")
    hcfg = build(HeadsConfig, ctx.section("heads"), "heads")
    heads_json, heads_source = heads_json_for_stage(ctx, hcfg)
    tp, data = harness.plan(ecfg, ctx.out)
    model, tok = load_selector(mcfg)
    n_layers, n_heads, _ = head_geometry(model)
    sets = head_sets(hcfg, heads_json, n_layers, n_heads, list(ecfg.masked.head_sets))
    base_meta = {"stage": "eval_masked", "suite": ecfg.suite, "limit": ecfg.limit,
                 "model": {"path": mcfg.path, "resolved": resolve_model_path(mcfg.path),
                           "dtype": precision_of(model)["dtype"], "precision": precision_of(model),
                           "device": str(model.device),
                           "attn_impl": base_implementation(model)},
                 "heads": {"set": hcfg.set, "source": heads_source, "mode": hcfg.mode,
                           "seed": hcfg.seed, "n_layers": n_layers, "n_heads": n_heads},
                 "tasks": tp.tasks, "skipped_tasks": tp.skipped,
                 "num_fewshot": {k: v["num_fewshot"] for k, v in tp.leaves.items()},
                 "offline_data": harness.data_meta(data)}
    summary: dict[str, dict] = {}
    for name, (heads, label) in sets.items():
        t0 = time.perf_counter()
        log.info("eval_masked: head set %s = %s (mode %s)", name, label, hcfg.mode)
        with mask_heads(model, heads, mode=hcfg.mode):
            lm = harness.make_lm(model, tok, ecfg)
            res = harness.run_suite(lm, ecfg, tp, ctx.out / name)
        head = harness.save_results(res, ctx.out / name, {**base_meta, "head_set": name, "label": label,
                                                          "heads_masked": [list(h) for h in heads]})
        summary[name] = {"heads": [list(h) for h in heads], "n_heads": len(heads), "label": label, "headline": head,
                         "wall_s": time.perf_counter() - t0}
        write_json(ctx.out / "results.json", {"head_sets": summary, "attninf": base_meta})
        ctx.tracker.summary({f"eval_masked/{name}/{t}": h["value"] for t, h in head.items()})
        for t, h in head.items():
            log.info("  %-10s %-9s %s = %.4f", name, t, h["metric"], h["value"])
    # The written prediction (eval/prediction.py): which tasks AttentionInfluence data should
    # improve, from the mirror gap; this stage runs before pretraining, and the report checks it.
    pred = prediction.predict(ctx.out)
    prediction.write(ctx.out, pred)
    log.info("eval_masked: prediction written (gain expected on: %s)", ", ".join(pred.get("gain_expected_on") or [])
             or "no task")
    return {"prediction": pred.get("gain_expected_on"),
            "head_sets": {k: {"n_heads": v["n_heads"],
                              "headline": {t: h["value"] for t, h in v["headline"].items()}}
                          for k, v in summary.items()}}
