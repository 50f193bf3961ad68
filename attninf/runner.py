"""Runs the selected stages in order, skipping the ones whose manifest says they are done.

Resume rule: a stage is skipped when its folder holds a `done` manifest with the key computed
now (hash of its config sections + its inputs' keys). A folder with another key is moved aside
(`<stage>.old-<key>`) before the stage runs again, so nothing is silently overwritten; a folder
left `running` by a killed process with the same key is handed back to the stage, which resumes
from its own completion markers (e.g. finished score shards).

Multirun (sweeps): jobs share `run_dir`. A stage whose config (or upstream config) is touched by
the job's overrides gets its own folder named after those overrides, e.g. `select-select.ratio=0.1`;
untouched stages (e.g. `score` in a ratio sweep) share one folder and run once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from attninf import manifest
from attninf.config import ConfigError, digest, to_plain
from attninf.context import Incomplete, MissingInput, StageContext
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


def stage_key(cfg: DictConfig, name: str, arm: str | None, inputs: dict[str, dict]) -> tuple[str, dict]:
    spec = STAGES[name]
    sections = {s: to_plain(cfg.get(s)) for s in spec.sections}
    if arm is not None:
        sections["arm"] = {"name": arm, **(to_plain(cfg.arms[arm]) or {})}
    key = digest({"stage": name, "arm": arm, "config": sections,
                  "inputs": {k: v["key"] for k, v in sorted(inputs.items())}})
    return key, sections


@contextmanager
def _lock(stage_dir: Path):
    """One process per stage folder at a time (sweep jobs sharing an upstream stage wait here)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    with open(stage_dir.parent / f".{stage_dir.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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


def run_stage(cfg: DictConfig, name: str, arm: str | None, dirs, force: bool = False,
              on_start=None) -> dict:
    spec = STAGES[name]
    out = dirs[(name, arm)]
    run_dir = Path(cfg.run_dir)
    inputs = {}
    for u, ua in spec.needs(cfg, arm):
        udir = dirs.get((u, ua), run_dir / u)
        m = manifest.read(udir)
        if m is None or m.get("status") != "done":
            what = u + (f" (arm {ua})" if ua else "")
            raise MissingInput(
                f"stage '{name}' needs the outputs of '{what}' at {udir}, which has no finished "
                f"manifest: add '{u}' to stages=[...] (run_dir={run_dir})")
        inputs[f"{u}/{ua}" if ua else u] = {"path": str(udir), "key": m["key"]}
    key, sections = stage_key(cfg, name, arm, inputs)
    label = name + (f"[{arm}]" if arm else "")
    with _lock(out):
        old = manifest.read(out)
        if old and old.get("key") == key and old.get("status") == "done" and not force:
            log.info("skip %-22s done (key %s) at %s", label, key, out)
            return old
        if old and old.get("key") != key:
            aside = out.with_name(f"{out.name}.old-{old.get('key', 'unknown')[:8]}")
            shutil.rmtree(aside, ignore_errors=True)
            out.rename(aside)
            log.info("%s: config or inputs changed; previous outputs moved to %s", label, aside)
            out.mkdir(parents=True)
        elif old and old.get("status") in ("running", "partial", "failed"):
            log.info("resume %-20s from an unfinished run (key %s)", label, key)
        # Workers launched elsewhere (srun, array tasks) read exactly this config.
        manifest.write_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        started = time.time()
        manifest.write(out, stage=name, arm=arm, key=key, status="running", config=sections,
                       inputs=inputs, started=started)
        tracker = _tracker(cfg, name, arm, out, sections)
        ctx = StageContext(name=name, arm=arm, run_dir=run_dir, out=out, cfg=cfg, dirs=dirs,
                           tracker=tracker)
        log.info("run  %-22s -> %s", label, out)
        if on_start is not None:
            on_start()
        t0 = time.perf_counter()
        try:
            outputs = spec.fn()(ctx)
        except Incomplete as e:
            manifest.write(out, stage=name, arm=arm, key=key, status="partial", config=sections,
                           inputs=inputs, wall_s=time.perf_counter() - t0, error=str(e), started=started)
            tracker.finish()
            raise
        except BaseException as e:
            manifest.write(out, stage=name, arm=arm, key=key, status="failed", config=sections,
                           inputs=inputs, wall_s=time.perf_counter() - t0,
                           error="".join(traceback.format_exception_only(type(e), e)).strip(),
                           started=started)
            tracker.finish()
            raise
        wall = time.perf_counter() - t0
        m = manifest.write(out, stage=name, arm=arm, key=key, status="done", config=sections,
                           inputs=inputs, outputs=outputs, wall_s=wall, started=started)
        tracker.summary({"wall_s": wall})
        tracker.finish()
        log.info("done %-22s in %.1fs", label, wall)
        return m


def run_pipeline(cfg: DictConfig, overrides: list[str] | None = None, multirun: bool = False) -> dict:
    """Run `cfg.stages` in pipeline order. Returns {(stage, arm): manifest}."""
    names = selected_stages(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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
            results[(name, arm)] = m = run_stage(cfg, name, arm, dirs, on_start=lambda i=i: started(i))
            pipe.end(i, m.get("wall_s"), skipped=i not in ran)
    finally:
        pipe.abort()
    print_summary(run_dir, units, dirs, {units[i] for i in ran}, time.perf_counter() - pipe.t0)
    return results


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
