"""Two real (if trivial) stage functions for runner tests: they write and read artifacts."""

import json

CALLS = []


def produce(ctx):
    CALLS.append((ctx.name, ctx.arm))
    if ctx.cfg.get("fail_once") and not (ctx.out / "attempted").exists():
        (ctx.out / "attempted").touch()
        raise RuntimeError("boom")
    (ctx.out / "value.json").write_text(json.dumps({"v": ctx.cfg.detect.value}))
    return {"value": ctx.cfg.detect.value}


def consume(ctx):
    CALLS.append((ctx.name, ctx.arm))
    up = json.loads((ctx.upstream("detect") / "value.json").read_text())
    (ctx.out / "double.json").write_text(json.dumps({"v": 2 * up["v"]}))
    return {"double": 2 * up["v"]}


def pipeline_cfg(tmp_path, **kw):
    """A two-stage config (detect -> score) over these toy stages; `toy_stages` fixture registers them."""
    from omegaconf import OmegaConf

    base = {"run_dir": str(tmp_path / "run"), "stages": ["detect", "score"], "detect": {"value": 3},
            "score": {"x": 1}, "wandb": {"mode": "disabled"}, "arms": {}}
    base.update(kw)
    return OmegaConf.create(base)
