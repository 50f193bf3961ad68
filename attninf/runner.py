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

import contextlib
import fcntl
import hashlib
import importlib
import logging
import os
import re
import shutil
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from attninf import arms, manifest
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
        sections["arm"] = {"name": arm, **(to_plain(cfg.arms[arms.base(arm)]) or {})}
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
    cfg = arms.config_for(cfg, arm)  # a seeded arm (`<arm>@seed<S>`) trains with pretrain.seed=S
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
        problem = None
        if old and old.get("key") == key and old.get("status") == "done" and not force:
            if spec.verify:
                mod, _, attr = spec.verify.partition(":")
                problem = getattr(importlib.import_module(mod), attr)(out)
            if problem is None:
                log.info("skip %-22s done (key %s) at %s", label, key, out)
                return old
            log.warning("%s: %s; re-running it (intact parts are kept)", label, problem)
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


# Config section -> its typed dataclass: all are validated before the first stage runs, whichever
# stages are selected (an out-of-range value must not surface hours into a run).
SECTION_CONFIGS = {
    "model": "selection.models:ModelConfig", "detect": "selection.detect:DetectConfig",
    "heads": "selection.heads:HeadsConfig", "mirror": "selection.mirror:MirrorConfig",
    "corpus": "selection.corpora:CorpusConfig", "score": "selection.score:ScoreConfig",
    "select": "selection.select:SelectConfig", "mix": "pretrain.mix:MixConfig",
    "tokenizer": "pretrain.mix:TokenizerConfig", "pretrain": "pretrain.train:PretrainConfig",
    "eval": "eval.config:EvalConfig", "report": "eval.report:ReportConfig",
}


# Inputs a later command supplies: required only when a selected stage reads the section.
_DEFERRED = ("corpus.paths", "corpus.sources", "corpus.domain_field")


def validate_sections(cfg: DictConfig, names: list[str] | None = None) -> None:
    """Build every present section whose owner is a registered (real) stage; ConfigError names the key.

    Ranges, types and unknown keys are checked in every section whichever stages run; inputs
    (corpus files) only where a selected stage reads them.
    """
    import importlib

    from attninf.config import build

    stand_ins = {sec for spec in STAGES.values() if spec.target.startswith("tests.")
                 for sec in spec.sections}  # test doubles own their (free-form) sections
    real = {sec for spec in STAGES.values() for sec in spec.sections} - stand_ins
    for sec, target in SECTION_CONFIGS.items():
        if sec not in real or cfg.get(sec) is None:
            continue
        used = names is None or any(sec in STAGES[n].sections for n in names)
        mod, _, cls = target.partition(":")
        try:
            obj = build(getattr(importlib.import_module(mod), cls), cfg.get(sec), sec)
        except ConfigError as e:
            if used or not str(e).startswith(_DEFERRED):
                raise
            continue
        if sec == "heads" and getattr(obj, "list", None) is not None:
            _check_heads_geometry(obj.list, cfg.get("model"))
        if sec == "corpus" and used and obj.kind != "hf":  # paths that must exist, before any compute
            from selection.corpora import CorpusError, local_files

            try:
                local_files(obj)
            except CorpusError as e:
                raise ConfigError(f"corpus.paths: {e}") from None


def _check_heads_geometry(heads, model_cfg) -> None:
    """heads.list against the model's layers x heads, when its config.json is readable locally."""
    import json

    from selection.heads import check_heads, parse_head_list

    path = Path(os.path.expanduser(str((model_cfg or {}).get("path") or ""))) / "config.json"
    try:
        mc = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # hub id or alias: checked when the model loads
    n_l, n_h = mc.get("num_hidden_layers"), mc.get("num_attention_heads")
    if not (n_l and n_h):
        return
    check_heads(parse_head_list(to_plain(heads), "heads.list"), n_l, n_h, "heads.list")


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
    validate_sections(cfg, names)
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
