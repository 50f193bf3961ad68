"""The local executor: runs the selected stages in order in this process, through the lifecycle
of attninf/lifecycle.py (prepare -> run parts -> finish), skipping those whose manifest says done.

Shapes (attninf/stages.py) run here as: one process = the stage function in this process; an
array = every unmarked part in order, then finish; ranks = nodes x tasks_per_node processes of
the stage's rank module on this machine (attninf.dist.spawn_ranks), then finish. The Slurm
executor (attninf/submit.py) runs the same lifecycle as jobs.

Resume rule: a stage is skipped when its folder holds a `done` manifest with the key computed
now (hash of its config sections + its inputs' keys). A folder with another key is moved aside
(`<stage>.old-<key>`) before the stage runs again, so nothing is silently overwritten; a folder
left `running` by a killed process with the same key is handed back to the stage, which resumes
from its part markers (e.g. finished score shards) or its checkpoints (pretraining).

Multirun (sweeps): jobs share `run_dir`. A stage whose config (or upstream config) is touched by
the job's overrides gets its own folder named after those overrides, e.g. `select-select.ratio=0.1`;
untouched stages (e.g. `score` in a ratio sweep) share one folder and run once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from attninf import arms, lifecycle, manifest
from attninf.config import ConfigError, digest, to_plain
from attninf.context import Incomplete, StageContext
from attninf.dist import rank_world, spawn_ranks
from attninf.lifecycle import stage_key  # noqa: F401  (re-exported)
from attninf.typed import SECTION_CONFIGS, typed_sections  # noqa: F401  (re-exported)
from attninf.progress import PipelineProgress
from attninf.stages import ORDER, STAGES
from attninf.summary import print_summary
from attninf.tracking import Tracker

log = logging.getLogger("attninf")

# Override keys that never change what a stage computes.
_NEUTRAL = ("stages", "run_dir", "wandb", "hydra", "experiment_name")


def _override_key(ov: str) -> str:
    return ov.lstrip("+~").split("=", 1)[0]


def stage_dirs(cfg: DictConfig, overrides: list[str], multirun: bool) -> dict[tuple[str, str | None], Path]:
    """Folder of every (stage, arm). Plain runs: `run_dir/<stage>[/<arm>]`."""
    run_dir = Path(cfg.run_dir)
    variant: dict[str, list[str]] = {}
    relevant = [o for o in overrides if _override_key(o).split(".")[0].split("/")[0] not in _NEUTRAL]
    for name in ORDER:
        spec = STAGES[name]
        own = []
        for o in relevant:
            top = _override_key(o).split(".")[0].split("/")[0]
            owned_by_someone = any(top in s.sections for s in STAGES.values())
            if top in spec.sections or not owned_by_someone:
                own.append(o)
        ups = set()
        for arm in spec.arms(cfg):
            for u, _ in spec.needs(cfg, arm):
                ups.update(variant.get(u, []))
        variant[name] = sorted(set(own) | ups)
    dirs = {}
    for name in ORDER:
        spec = STAGES[name]
        folder = name
        if multirun and variant[name]:
            tag = ",".join(variant[name])
            safe = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", tag)
            if len(safe) > 120:  # keep names short without letting two sweeps share a folder
                safe = safe[:103] + "-" + hashlib.sha256(tag.encode()).hexdigest()[:16]
            folder = f"{name}-{safe}"
        for arm in spec.arms(cfg):
            dirs[(name, arm)] = run_dir / folder / arm if arm else run_dir / folder
    return dirs


def _tracker(cfg: DictConfig, name: str, arm: str | None, out: Path, config: dict) -> Tracker:
    w = cfg.get("wandb") or {}
    return Tracker(mode=w.get("mode", "offline"), project=w.get("project", "attention-influence"),
                   group=w.get("group") or cfg.get("experiment_name"),
                   name=f"{name}/{arm}" if arm else name, dir=out / "wandb",
                   config={"stage": name, "arm": arm, **config}, tags=[name] + ([arm] if arm else []))


def selected_stages(cfg: DictConfig) -> list[str]:
    wanted = list(cfg.get("stages") or [])
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {ORDER}")
    return [s for s in ORDER if s in wanted]


def execute(ctx: StageContext, unit: lifecycle.Unit) -> Any:
    """The local executor: run the stage's shape in this process (ranks: as local processes).

    array: every part not yet marked, in order, then finish; ranks: nodes x tasks_per_node
    processes of the stage's rank module on this machine (the same command srun starts on a
    cluster), then finish; process: the stage function.
    """
    spec = STAGES[unit.name]
    shape = spec.shape_of(ctx.cfg)
    if shape.kind == "array":
        # This process's share: all of it, unless it is one of several workers (a manual fan-out,
        # torchrun ranks, an array task that started the stage; attninf.dist.rank_world).
        rank, world = rank_world()
        names = lifecycle.part_list(ctx, unit)
        lifecycle.run_parts(ctx, unit, lifecycle.share(names, rank, world))
        missing = lifecycle.missing_parts(unit, names)
        if missing:
            raise Incomplete(f"{unit.label}: worker {rank}/{world} did its share; {len(missing)} of "
                             f"{len(names)} parts still missing (e.g. {missing[0]})")
        ctx.parts = names
        return spec.call("finish")(ctx)
    if shape.kind == "ranks":
        if not lifecycle.part_done(unit, lifecycle.RANKS_PART):
            state = spawn_ranks(spec.rank_module, unit.out, shape.nodes, shape.tasks_per_node)
            if state != "done":
                raise Incomplete(f"{unit.label}: the ranks stopped before the end (a stop request or "
                                 f"exit_after_steps); re-run to resume from {unit.out}")
            lifecycle.mark_part(unit, lifecycle.RANKS_PART)
        return spec.call("finish")(ctx)
    return spec.fn()(ctx)


def run_stage(cfg: DictConfig, name: str, arm: str | None, dirs, force: bool = False,
              on_start=None, typed: dict | None = None) -> dict:
    """prepare -> run -> finish for one (stage, arm) in this process; returns its manifest."""
    unit = lifecycle.plan_unit(cfg, name, arm, dirs)
    done = lifecycle.prepare(cfg, unit, force)
    if done is not None:
        log.info("skip %-22s done (key %s) at %s", unit.label, unit.key, unit.out)
        return done
    tracker = _tracker(arms.config_for(cfg, arm), name, arm, unit.out, unit.sections)
    ctx = lifecycle.context(cfg, unit, dirs, tracker, typed)
    log.info("run  %-22s -> %s", unit.label, unit.out)
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    try:
        outputs = execute(ctx, unit)
    except Incomplete as e:
        lifecycle.record(unit, "partial", wall_s=time.perf_counter() - t0, error=str(e))
        tracker.finish()
        raise
    except BaseException as e:
        lifecycle.record(unit, "failed", wall_s=time.perf_counter() - t0,
                         error="".join(traceback.format_exception_only(type(e), e)).strip())
        tracker.finish()
        raise
    wall = time.perf_counter() - t0
    m = lifecycle.complete(unit, outputs, wall)
    tracker.summary({"wall_s": wall})
    tracker.finish()
    log.info("done %-22s in %.1fs", unit.label, wall)
    return m


def validate_sections(cfg: DictConfig, names: list[str] | None = None) -> dict:
    """Every section built and validated once (attninf/typed.py); returns the typed sections."""
    return typed_sections(cfg, names)


def run_key(cfg: DictConfig) -> str:
    """What one run directory holds: the config minus keys that never change a result."""
    plain = to_plain(cfg) or {}
    return digest({k: v for k, v in plain.items() if k not in _NEUTRAL})


@contextmanager
def run_dir_lock(run_dir: Path, key: str):
    """A run directory holds one run: same-key processes (array tasks, ranks) share it, a process
    with another config refuses at start naming the holder, instead of moving its outputs aside."""
    lock = open(run_dir / ".attninf-run.lock", "a+")
    owner_path = run_dir / ".attninf-run.json"
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            manifest.write_json(owner_path, {"pid": os.getpid(), "host": os.uname().nodename,
                                             "key": key, "started": time.time()})
            fcntl.flock(lock, fcntl.LOCK_SH)  # downgrade: same-key processes may join
        except BlockingIOError:
            deadline = time.time() + 10
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # the holder is still writing its owner file
                    if time.time() > deadline:
                        raise
                    time.sleep(0.1)
            owner = manifest.read(run_dir, owner_path.name) or {}
            if owner.get("key") != key:
                raise ConfigError(
                    f"run_dir={run_dir}: in use by pid {owner.get('pid')} on {owner.get('host')} "
                    f"with another config (key {owner.get('key')}, this one {key}); wait for it to "
                    "finish or choose another run_dir")
            yield False
            return
        yield True
    finally:
        lock.close()


_TMP = re.compile(r"^\..+\.tmp(\d+)$")


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Temp files of killed atomic writes (`.name.tmp<pid>` whose pid is gone) are deleted."""
    gone = []
    for root, _, files in os.walk(run_dir):
        for f in files:
            m = _TMP.match(f)
            if not m:
                continue
            pid = int(m.group(1))
            alive = True
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
            if not alive or pid == os.getpid():
                p = Path(root) / f
                p.unlink(missing_ok=True)
                gone.append(p)
    if gone:
        log.info("removed %d temp file(s) left by killed writes (e.g. %s)", len(gone), gone[0])
    return gone


def run_pipeline(cfg: DictConfig, overrides: list[str] | None = None, multirun: bool = False) -> dict:
    """Run `cfg.stages` in pipeline order. Returns {(stage, arm): manifest}."""
    names = selected_stages(cfg)
    typed = validate_sections(cfg, names)
    preflight_local(cfg, names)
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir}: is a file, not a folder; point run_dir at a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir={run_dir}: cannot create it ({e.strerror}); choose another run_dir") from None
    # Sweep jobs share run_dir with different configs by design (each in its own stage folders).
    lock = run_dir_lock(run_dir, run_key(cfg)) if not multirun else contextlib.nullcontext(False)
    with lock as alone:
        if alone:  # no other process of this run is writing: orphaned temp files are garbage
            remove_stale_temp_files(run_dir)
        if not multirun:
            manifest.write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        dirs = stage_dirs(cfg, overrides or [], multirun)
        results = {}
        units = [(name, arm) for name in names for arm in STAGES[name].arms(cfg)]
        pipe = PipelineProgress(units, log=log)
        ran: set[int] = set()  # units that ran here (the others were done already)

        def started(i):
            ran.add(i)
            pipe.start(i)

        try:
            for i, (name, arm) in enumerate(units):
                results[(name, arm)] = m = run_stage(cfg, name, arm, dirs, on_start=lambda i=i: started(i),
                                                     typed=typed)
                pipe.end(i, m.get("wall_s"), skipped=i not in ran)
        finally:
            pipe.abort()
    print_summary(run_dir, units, dirs, {units[i] for i in ran}, time.perf_counter() - pipe.t0)
    return results


def preflight_local(cfg: DictConfig, names: list[str]) -> None:
    """The stages' own preflight checks (permissions, libraries) before the first stage runs here.

    On this machine there is no cluster request: checks that need one (memory per GPU) see
    no resources and skip themselves.
    """
    problems = []
    for name in names:
        spec = STAGES[name]
        if spec.preflight:
            for arm in spec.arms(cfg)[:1]:
                problems += spec.call("preflight")(arms.config_for(cfg, arm), arm, None)[1]
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
