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
