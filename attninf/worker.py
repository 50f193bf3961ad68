"""One step of a stage's lifecycle from its frozen folder, wherever a job runs it.

The launching process (`attninf`, local or `cluster=slurm`) composes the config with Hydra once
and `prepare`s the stage folder (config.yaml + a `running` manifest); every job step reads that
folder instead of composing again (Hydra in every rank would fight over output folders):

  python -m attninf.worker RUN/score --step parts    # an array task: its share of the parts
  python -m attninf.worker RUN/score --step finish   # every part marked: merge, manifest `done`
  python -m attninf.worker RUN/detect --step process # a one-process stage, start to `done`

An array task's share is a contiguous run of the parts (attninf.lifecycle.share, balanced by the
weights the stage gave), r and n from attninf.dist.rank_world (the Slurm array task, or
ATTNINF_RANK / ATTNINF_WORLD_SIZE for a manual fan-out). A ranks stage's ranks are not
started here: the executor runs `python -m <rank module> <folder>` in every rank (srun, or
attninf.dist.spawn_ranks), then `--step finish`, which marks the ranks part done first.

Exit codes: 0 = the step did its work; 75 (lifecycle.EXIT_REQUEUE) = stopped at a safe point on
SIGUSR1/SIGTERM, requeue the job; 2 = an expected failure (one line: missing input, config).
Safe points: a part boundary (parts), the start of the step (finish, process). A signal that
arrives later in a finish or process step is recorded and the step runs to its end (see
attninf/stop.py for why that beats restarting it).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a signal while they load is only recorded
    from attninf import stop as _stop

    _stop.install()

import argparse
import logging
import time
from pathlib import Path

from attninf import lifecycle
from attninf.config import ConfigError
from attninf.context import Incomplete, InputError, MissingInput
from attninf.dist import rank_world
from attninf.runner import setup_logging
from attninf.stages import STAGES

log = logging.getLogger("attninf")


def run_step(stage_dir: Path, step: str | None = None) -> int:
    unit, cfg = lifecycle.unit_of(stage_dir)
    spec = STAGES[unit.name]
    shape = spec.shape_of(cfg)
    step = step or {"array": "parts", "ranks": "finish"}.get(shape.kind, "process")
    lifecycle.check_inputs(unit)
    ctx = lifecycle.context(cfg, unit)
    if lifecycle.is_done(unit):
        log.info("%s: already done", unit.label)
        return 0
    if step == "parts":
        if shape.kind != "array":
            raise ConfigError(f"{unit.label}: --step parts needs an array stage (this one is {shape.kind})")
        lifecycle.install_stop_handlers()
        rank, world = rank_world()
        names, mine = lifecycle.task_parts(ctx, unit, rank, world)
        done = lifecycle.run_parts(ctx, unit, mine, task=rank)
        log.info("%s: task %d/%d ran %d of its %d part(s)", unit.label, rank, world, len(done), len(mine))
        return 0
    t0 = time.perf_counter()
    lifecycle.install_stop_handlers()
    # The step's one safe point: a signal before here (while this process started) means the time
    # limit is near, so requeue rather than start work the limit may cut.
    lifecycle.raise_if_stop_requested(f"{unit.label} --step {step}")
    if step == "finish":
        if shape.kind == "array":
            names = lifecycle.part_list(ctx, unit)
            missing = lifecycle.missing_parts(unit, names)
            if missing:
                raise Incomplete(f"{unit.label}: {len(missing)} of {len(names)} parts are not finished "
                                 f"(e.g. {missing[0]}); re-submit to run them")
            ctx.parts = names
        outputs = spec.call("finish")(ctx)  # a ranks stage's finish checks the ranks' own result
        if shape.kind == "ranks":
            lifecycle.mark_part(unit, lifecycle.RANKS_PART)
    elif step == "process":
        outputs = spec.fn()(ctx)
    else:
        raise ConfigError(f"--step {step}: one of process | parts | finish")
    lifecycle.complete(unit, outputs, time.perf_counter() - t0)
    log.info("%s: done in %.1fs%s", unit.label, time.perf_counter() - t0,
             f" ({lifecycle.stop.name()} arrived after the step's safe point: it ran to its end)"
             if lifecycle.stop_requested() else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage_dir", type=Path)
    p.add_argument("--step", choices=("process", "parts", "finish"), default=None,
                   help="default: parts for an array stage, finish for a ranks stage, else process")
    args = p.parse_args(argv)
    setup_logging()
    try:
        return run_step(args.stage_dir, args.step)
    except lifecycle.Interrupted as e:
        log.warning("%s; exiting for a requeue", e)
        return lifecycle.EXIT_REQUEUE
    except (ConfigError, MissingInput, InputError, Incomplete) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    try:
        code = main()
    finally:
        _stop.settle()  # a signal during interpreter teardown must not change the exit code
    raise SystemExit(code)
