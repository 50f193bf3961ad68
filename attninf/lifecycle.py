"""One stage lifecycle, two executors: prepare -> run parts -> finish.

The local runner (attninf/runner.py) and the Slurm submitter (attninf/submit.py) both drive a
stage through these functions; neither names a stage, both read its declared shape
(attninf/stages.py):

- `plan_units`: the key, folder and inputs of every (stage, arm) before anything runs. The key
  hashes the stage's config sections minus their operational keys (intervals, launch; see
  `typed.operational`), the arm, and the upstream keys, chained through stages that have not
  run yet, so a submission knows every job's key in advance.
- `prepare`: a folder holding a finished manifest with this key is done (skip); one holding
  another key is moved aside (`<stage>.old-<key>`); otherwise the resolved config is frozen
  into `config.yaml` beside a `running` manifest, which is all a worker anywhere needs.
- parts: an array stage lists its parts; any executor runs any subset of them (array task r
  of n takes `share(parts, r, n, weights)`: a contiguous run of the list, balanced by the
  weights the stage gave with its parts, e.g. bytes); each finished part gets a marker `parts/<name>.done` holding the key,
  written atomically (temp file + rename). No lock is held while parts run: two workers that
  race on one part write identical files, and a marker under another key does not count.
  A ranks stage is one part, `ranks`, marked when every rank exited 0.
- `complete`: the stage's finish ran; the manifest says `done` with its outputs.

Stopping for a requeue: every worker and rank records SIGUSR1 (Slurm's time-limit warning) and
SIGTERM (preemption, `scontrol requeue`) as a flag (attninf/stop.py; the handler never raises).
Safe points read it: an array task stops at the next part boundary, a training rank at the next
step (after a checkpoint), a finish step before it starts; the process exits with `EXIT_REQUEUE`
so the job script requeues the job. A step with no safe point left runs to its end.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from attninf import arms, manifest, stop
from attninf.config import digest, to_plain
from attninf.context import MissingInput, StageContext
from attninf.stages import STAGES

log = logging.getLogger("attninf")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped at a safe point, requeue me
PARTS = "parts"
RANKS_PART = "ranks"


@dataclass
class Unit:
    """One (stage, arm) of a run: what it is called, where it lives, what makes it what it is."""

    name: str
    arm: str | None
    out: Path
    key: str
    sections: dict
    inputs: dict[str, dict]
    upstream: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name + (f"[{self.arm}]" if self.arm else "")


def stage_key(cfg: DictConfig, name: str, arm: str | None, inputs: dict[str, dict]) -> tuple[str, dict]:
    """(key, sections): what the stage computes from; operational keys never enter it."""
    from attninf.typed import identity

    spec = STAGES[name]
    sections = {s: identity(s, to_plain(cfg.get(s))) for s in spec.sections}
    if arm is not None:
        sections["arm"] = {"name": arm, **(to_plain(cfg.arms[arms.base(arm)]) or {})}
    key = digest({"stage": name, "arm": arm, "config": sections,
                  "inputs": {k: v["key"] for k, v in sorted(inputs.items())}})
    return key, sections


def plan_units(cfg: DictConfig, names: list[str], dirs: dict) -> dict[tuple[str, str | None], Unit]:
    """Every (stage, arm) of `names`, keyed as it will be once its inputs exist.

    An upstream outside `names` must be finished already (MissingInput names what to add);
    one inside is chained by its planned key.
    """
    out: dict[tuple[str, str | None], Unit] = {}
    for name in names:
        for arm in STAGES[name].arms(cfg):
            out[(name, arm)] = plan_unit(cfg, name, arm, dirs, out)
    return out


def plan_unit(cfg: DictConfig, name: str, arm: str | None, dirs: dict,
              planned: dict[tuple[str, str | None], Unit] | None = None) -> Unit:
    run_dir = Path(cfg.run_dir)
    planned = planned or {}
    inputs, ups = {}, []
    for u, ua in STAGES[name].needs(cfg, arm):
        udir = dirs.get((u, ua), run_dir / u)
        if (u, ua) in planned:
            k = planned[(u, ua)].key
            ups.append((u, ua))
        else:
            m = manifest.read(udir)
            if m is None or m.get("status") != "done":
                what = u + (f" (arm {ua})" if ua else "")
                raise MissingInput(
                    f"stage '{name}' needs the outputs of '{what}' at {udir}, which has no "
                    f"finished manifest: add '{u}' to stages=[...] (run_dir={run_dir})")
            k = m["key"]
        inputs[f"{u}/{ua}" if ua else u] = {"path": str(udir), "key": k}
    # A seeded arm's key is computed on its own config (pretrain.seed).
    key, sections = stage_key(arms.config_for(cfg, arm), name, arm, inputs)
    return Unit(name, arm, dirs[(name, arm)], key, sections, inputs, ups)


def is_done(unit: Unit) -> bool:
    m = manifest.read(unit.out)
    return bool(m) and m.get("status") == "done" and m.get("key") == unit.key


def prepare(cfg: DictConfig, unit: Unit, force: bool = False) -> dict | None:
    """Make the folder ready for workers; return the finished manifest when there is nothing to do."""
    import importlib

    spec = STAGES[unit.name]
    out = unit.out
    out.mkdir(parents=True, exist_ok=True)
    old = manifest.read(out)
    if old and old.get("key") == unit.key and old.get("status") == "done" and not force:
        problem = None
        if spec.verify:
            mod, _, attr = spec.verify.partition(":")
            problem = getattr(importlib.import_module(mod), attr)(out)
        if problem is None:
            return old
        log.warning("%s: %s; re-running it (intact parts are kept)", unit.label, problem)
        clear_part(out, None)  # markers may name what the check found missing
    if old and old.get("key") != unit.key:
        aside = out.with_name(f"{out.name}.old-{old.get('key', 'unknown')[:8]}")
        shutil.rmtree(aside, ignore_errors=True)
        out.rename(aside)
        log.info("%s: config or inputs changed; previous outputs moved to %s", unit.label, aside)
        out.mkdir(parents=True)
    elif old and old.get("status") in ("running", "partial", "failed"):
        log.info("resume %-20s from an unfinished run (key %s)", unit.label, unit.key)
    # Workers launched elsewhere (srun, array tasks, ranks) read exactly this config.
    manifest.write_atomic(out / "config.yaml", OmegaConf.to_yaml(arms.config_for(cfg, unit.arm), resolve=True))
    started = (old or {}).get("started") if (old or {}).get("key") == unit.key else None
    record(unit, "running", started=started or time.time())
    return None


def record(unit: Unit, status: str, **extra) -> dict:
    m = manifest.read(unit.out) or {}
    extra.setdefault("started", m.get("started"))
    return manifest.write(unit.out, stage=unit.name, arm=unit.arm, key=unit.key, status=status,
                          config=unit.sections, inputs=unit.inputs, **extra)


def complete(unit: Unit, outputs: Any, wall_s: float) -> dict:
    return record(unit, "done", outputs=outputs, wall_s=wall_s)


def unit_of(stage_dir: Path) -> tuple[Unit, DictConfig]:
    """The unit a worker serves, from the folder `prepare` wrote (no Hydra, no planning)."""
    m = manifest.read(stage_dir)
    if m is None or not (stage_dir / "config.yaml").exists():
        raise MissingInput(f"{stage_dir}: no manifest.json/config.yaml; start the stage with `attninf` first")
    cfg = OmegaConf.load(stage_dir / "config.yaml")
    return Unit(m["stage"], m.get("arm"), Path(stage_dir), m["key"], m.get("config") or {},
                m.get("inputs") or {}), cfg


def check_inputs(unit: Unit) -> None:
    """Every input is finished under the key this unit was planned with (else: MissingInput)."""
    for k, v in unit.inputs.items():
        m = manifest.read(Path(v["path"]))
        if m is None or m.get("status") != "done" or m.get("key") != v["key"]:
            raise MissingInput(f"{unit.label}: its input '{k}' at {v['path']} is not finished under key "
                               f"{v['key']} (found {(m or {}).get('status')}, key {(m or {}).get('key')})")


def context(cfg: DictConfig, unit: Unit, dirs: dict | None = None, tracker=None,
            typed: dict | None = None) -> StageContext:
    from attninf.tracking import NullTracker

    dirs = dict(dirs or {})
    dirs[(unit.name, unit.arm)] = unit.out
    for k, v in unit.inputs.items():
        stage, _, arm = k.partition("/")
        dirs[(stage, arm or None)] = Path(v["path"])
    return StageContext(name=unit.name, arm=unit.arm, run_dir=Path(cfg.run_dir), out=unit.out,
                        cfg=arms.config_for(cfg, unit.arm), dirs=dirs, tracker=tracker or NullTracker(),
                        typed=typed)


# --- parts ----------------------------------------------------------------------------------

def _marker(out: Path, part: str) -> Path:
    return out / PARTS / f"{part}.done"


def mark_part(unit: Unit, part: str, **info) -> None:
    (unit.out / PARTS).mkdir(exist_ok=True)
    manifest.write_json(_marker(unit.out, part), {"key": unit.key, "host": os.uname().nodename,
                                                  "pid": os.getpid(), "time": time.time(), **info})


def part_done(unit: Unit, part: str) -> bool:
    m = manifest.read(unit.out / PARTS, f"{part}.done")
    return bool(m) and m.get("key") == unit.key


def clear_part(out: Path, part: str | None) -> None:
    """Forget one part's marker (or all of them with None)."""
    if part is None:
        shutil.rmtree(out / PARTS, ignore_errors=True)
    else:
        _marker(out, part).unlink(missing_ok=True)


def part_list(ctx: StageContext, unit: Unit) -> list[str]:
    """The stage's parts, fixed at the first call (`parts/index.json`): every task splits one list.

    A stage's `parts(ctx)` returns names, or (name, weight) pairs: the weight (e.g. the part's
    bytes) balances the tasks' shares (`share`) and is kept in the index beside the names."""
    idx = manifest.read(unit.out / PARTS, "index.json")
    if idx and idx.get("key") == unit.key:
        return list(idx["parts"])
    listed = list(STAGES[unit.name].call("parts")(ctx))
    pairs = [(str(p[0]), float(p[1])) if isinstance(p, (tuple, list)) else (str(p), None) for p in listed]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names) or any("/" in n for n in names):
        raise ValueError(f"{unit.label}: parts must be unique names without '/', got {names[:5]}...")
    index = {"key": unit.key, "parts": names}
    if any(w is not None for _, w in pairs):
        index["weights"] = [w if w is not None else 0.0 for _, w in pairs]
    (unit.out / PARTS).mkdir(exist_ok=True)
    manifest.write_json(unit.out / PARTS / "index.json", index)
    return names


def share(names: list[str], rank: int, world: int, weights: list[float] | None = None) -> list[str]:
    """Task `rank` of `world`'s parts: a contiguous run of `names` holding ~1/world of the weight.

    The one split every executor uses (the local runner, Slurm array tasks, the manual fan-out
    ATTNINF_RANK / ATTNINF_WORLD_SIZE of attninf.dist). Contiguous, not round-robin: a stage lists
    its parts in data order (file, then row group), so a task opens ~1/world of the files and
    shares at most the files at its two ends. A part belongs to the task whose weight range holds
    its midpoint (a task's share is then within half a part of 1/world); equal weights (none
    given) give blocks of len(names)/world. Any world size
    works on the same list: finished parts keep their markers whoever ran them."""
    n = len(names)
    w = [float(x) for x in weights] if weights is not None else [1.0] * n
    if len(w) != n:
        raise ValueError(f"share: {n} parts but {len(w)} weights")
    total = sum(w)
    mine, start = [], 0.0
    for i, name in enumerate(names):
        owner = min(world - 1, int((start + w[i] / 2) * world // total)) if total > 0 else i * world // max(n, 1)
        if owner == rank:
            mine.append(name)
        start += w[i]
    return mine


def task_parts(ctx: StageContext, unit: Unit, rank: int, world: int) -> tuple[list[str], list[str]]:
    """(every part, this task's share): the list fixed in `parts/index.json`, split by `share`."""
    names = part_list(ctx, unit)
    idx = manifest.read(unit.out / PARTS, "index.json") or {}
    return names, share(names, rank, world, idx.get("weights"))


def run_parts(ctx: StageContext, unit: Unit, names: list[str], **info) -> list[str]:
    """Run the unmarked parts among `names`; mark each as the stage reports it finished (`info`,
    e.g. the array task, goes into the marker).

    Stops at a part boundary when a stop was requested (raises Interrupted).
    """
    todo = [n for n in names if not part_done(unit, n)]
    if not todo:
        return []
    done = []
    for name in STAGES[unit.name].call("run_parts")(ctx, todo):
        mark_part(unit, name, **info)
        done.append(name)
        if stop_requested():
            raise Interrupted(f"{unit.label}: stopped by {stop.name()} after part {name} "
                              f"({len(done)} of {len(todo)} here)")
    return done


STOPPED = ".stopped"  # a ranks stage's marker: its ranks stopped early with their work saved


def mark_stopped(out: Path, at: Any) -> None:
    """Written by rank 0 when the ranks stop for a requeue (a signal, exit_after_steps): with
    srun --kill-on-bad-exit the step's exit code may be a kill's, this file is not."""
    manifest.write_json(Path(out) / STOPPED, {"at": at, "time": time.time(), "host": os.uname().nodename})


def missing_parts(unit: Unit, names: list[str]) -> list[str]:
    return [n for n in names if not part_done(unit, n)]


# --- stopping for a requeue -----------------------------------------------------------------

class Interrupted(RuntimeError):
    """A stop was requested (time-limit signal, preemption); work so far is saved."""


def stop_requested() -> bool:
    """A stop signal arrived (attninf/stop.py records it; the safe points here read it)."""
    return stop.requested()


def install_stop_handlers() -> None:
    """SIGUSR1 / SIGTERM set a flag and nothing else (attninf/stop.py says why)."""
    stop.install()


def raise_if_stop_requested(where: str) -> None:
    """A safe point: stop here (Interrupted, exit 75, requeue) when a signal arrived before it."""
    if stop.requested():
        raise Interrupted(f"{where}: stopped by {stop.name()} before it started")
