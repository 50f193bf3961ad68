"""W&B tracking that can never cost a result.

One W&B group per experiment, one run per stage (and arm). Offline by default (`wandb sync`
uploads later); `wandb.mode=disabled` turns it off. Every call is guarded: a tracking failure is
logged as a warning and the stage goes on, because losing a scoring shard to a logging error
would be absurd.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, mode: str = "offline", project: str = "attention-influence",
                 group: str | None = None, name: str | None = None, dir: str | Path | None = None,
                 config: dict | None = None, tags: list[str] | None = None):
        self.mode = mode
        self._kw = dict(project=project, group=group, name=name, config=config or {},
                        tags=tags or [], dir=str(dir) if dir else None, mode=mode,
                        reinit="finish_previous")
        self._run = None
        self._failed = mode == "disabled"

    @property
    def run(self):
        """The wandb run, created on first use (a stage that logs nothing costs no wandb init)."""
        if self._run is None and not self._failed:
            try:
                import wandb

                if self._kw["dir"]:
                    Path(self._kw["dir"]).mkdir(parents=True, exist_ok=True)
                os.environ.setdefault("WANDB_SILENT", "true")
                self._run = wandb.init(**self._kw)
            except Exception as e:  # noqa: BLE001 - tracking must never break a stage
                log.warning("wandb disabled for this stage: %s", e)
                self._failed = True
        return self._run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:  # noqa: BLE001
            log.warning("wandb log failed: %s", e)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(values)
        except Exception as e:  # noqa: BLE001
            log.warning("wandb summary failed: %s", e)

    def artifact(self, path: str | Path, type: str, name: str, reference: bool = True) -> None:
        """Register an artifact; by reference (a file:// URI) so corpora are never copied."""
        if self.run is None:
            return
        try:
            import wandb

            art = wandb.Artifact(name=name.replace("/", "-"), type=type)
            p = Path(path).resolve()
            if reference:
                art.add_reference(p.as_uri(), checksum=p.is_file())
            elif p.is_dir():
                art.add_dir(str(p))
            else:
                art.add_file(str(p))
            self.run.log_artifact(art)
        except Exception as e:  # noqa: BLE001
            log.warning("wandb artifact %s failed: %s", name, e)

    def finish(self) -> None:
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("wandb finish failed: %s", e)
            self._run = None


class NullTracker(Tracker):
    def __init__(self):
        super().__init__(mode="disabled")
