"""One simulated array task of the scale test, in its own process: `python -m tests.scale_tasks
mix-task|mix-finish --out MIX --corpus CORPUS.yaml --tok DIR --selected SEL [--rank k --world n]`,
or `python -m tests.scale_tasks stage-step --out STAGE_DIR --step parts|finish|process`: one step
of a lifecycle stage from its frozen folder, exactly what `python -m attninf.worker` runs in a
Slurm array task (rank and world from ATTNINF_RANK / ATTNINF_WORLD_SIZE).

Prints one JSON line: what the task did, its wall time and its peak resident memory
(VmHWM: the process's own high-water mark, imports included). The scale
test (tests/test_scale.py) runs several at once, as an executor would run array tasks.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

ARMS = {"baseline": {"selection": None}, "attention_influence": {"selection": "attention_influence"},
        "random": {"selection": "random"}}


def _rss_mb() -> float:
    """Peak resident memory of this program: VmHWM, which starts afresh at exec. (getrusage's
    ru_maxrss does not: Linux carries the parent's peak across fork + exec, so every task would
    report at least the test process's own peak.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["mix-task", "mix-finish", "baseline-rss", "stage-step", "score-sample"])
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--step", default=None)
    p.add_argument("--out", type=Path)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--tok", type=Path)
    p.add_argument("--selected", type=Path)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--shard-docs", type=int, default=2000)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.what == "stage-step":
        from attninf.dist import rank_world
        from attninf.runner import setup_logging
        from attninf.worker import run_step

        setup_logging()
        rc = run_step(a.out, a.step)
        rank, world = rank_world()
        print(json.dumps({"what": a.step, "rank": rank, "world": world, "rc": rc,
                          "wall_s": round(time.perf_counter() - t0, 2), "rss_mb": round(_rss_mb(), 1)}))
        return rc
    if a.what == "score-sample":  # the first --parts parts of this task's share, through the stage's run_parts
        from attninf import lifecycle
        from selection import score

        unit, cfg = lifecycle.unit_of(a.out)
        ctx = lifecycle.context(cfg, unit)
        names, mine = lifecycle.task_parts(ctx, unit, a.rank, a.world)
        done = list(score.run_parts(ctx, mine[:a.parts], a.rank, a.world))
        print(json.dumps({"what": a.what, "rank": a.rank, "world": a.world, "share": len(mine), "ran": done,
                          "wall_s": round(time.perf_counter() - t0, 2), "rss_mb": round(_rss_mb(), 1)}))
        return 0
    from omegaconf import OmegaConf

    from attninf.config import build
    from pretrain import mix
    from selection.corpus_parts import assign
    from selection.corpora import CorpusConfig

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tok)
    if a.what == "baseline-rss":  # what the imports and the tokenizer cost: the floor under the others
        print(json.dumps({"rss_mb": round(_rss_mb(), 1)}))
        return 0
    ccfg = build(CorpusConfig, OmegaConf.to_container(OmegaConf.load(a.corpus)), "corpus")
    mcfg = mix.MixConfig(shard_docs=a.shard_docs, workers=1, valid_fraction=0.02)
    res: dict = {"what": a.what, "rank": a.rank, "world": a.world}
    if a.what == "mix-task":
        parts = mix.plan(ccfg, a.out, mcfg.shard_docs)
        mine = assign(parts, a.rank, a.world)
        done = mix.run_parts(mine, ccfg, a.out, str(a.tok), tok.eos_token_id, len(tok), mcfg.valid_fraction, 1)
        res.update(parts=len(mine), ran=len(done), ids=[p.id for p in mine])
    else:
        t1 = time.perf_counter()
        s = mix.build_mix_parts(ccfg, a.out, a.tok, tok.eos_token_id, len(tok), "synth", mcfg, ARMS, a.selected,
                                rank=a.rank, world=a.world)
        res.update(summary=s, finish_s=round(time.perf_counter() - t1, 2))
    res.update(wall_s=round(time.perf_counter() - t0, 2), rss_mb=round(_rss_mb(), 1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
