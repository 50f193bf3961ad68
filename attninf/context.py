"""What a stage function receives: its folder, the frozen config, its inputs, a tracker."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from attninf import manifest
from attninf.tracking import NullTracker, Tracker


class MissingInput(RuntimeError):
    """An upstream stage has not finished; the message says which stage to run."""


class InputError(ValueError):
    """An input (corpus file, score shard, model path) is missing, altered or unusable.

    An expected failure, like a config error: the message is one line naming the file/row and
    what to do, and the CLI exits 2 without a traceback.
    """


class Incomplete(RuntimeError):
    """This worker did its share but the stage is not finished (other shards/ranks pending)."""


@dataclass
class StageContext:
    name: str
    arm: str | None
    run_dir: Path
    out: Path
    cfg: DictConfig
    dirs: dict[tuple[str, str | None], Path] = field(default_factory=dict)
    tracker: Tracker = field(default_factory=NullTracker)
    # Typed config sections, built and validated once by the executor (attninf/typed.py).
    typed: dict[str, Any] | None = None
    # An array stage's part names, as the executor fixed them (`finish` reads them).
    parts: list[str] | None = None

    def config(self, key: str) -> Any:
        """The typed config of a section (its dataclass; `arms`: {name: ArmConfig})."""
        if self.typed is None or key not in self.typed:
            from attninf.typed import typed_sections

            self.typed = {**(self.typed or {}), **typed_sections(self.cfg, [self.name])}
        return self.typed[key]

    def section(self, key: str) -> Any:
        """A resolved config section (DictConfig), or None when absent."""
        return self.cfg.get(key)

    def upstream(self, stage: str, arm: str | None = None) -> Path:
        """Folder of a finished upstream stage; raises MissingInput naming what to run."""
        path = self.dirs.get((stage, arm))
        if path is None:
            path = self.run_dir / stage / arm if arm else self.run_dir / stage
        m = manifest.read(path)
        if m is None or m.get("status") != "done":
            what = f"{stage}" + (f" (arm {arm})" if arm else "")
            raise MissingInput(
                f"stage '{self.name}' needs the outputs of '{what}' at {path}, which has no "
                f"finished manifest: run it first, e.g. `attninf stages=[{stage},{self.name}] "
                f"run_dir={self.run_dir}`")
        return path
