"""Progress for long loops: documents/s, tokens/s and ETA on the terminal and in W&B.

The same numbers go to both places so a cluster user watching W&B sees what a local user sees.
PipelineProgress (used by attninf.runner) prints `stage i of n` at each stage's start and end
with an ETA for the whole pipeline; a running stage's bar feeds it its done fraction.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int | None, desc: str, tracker=None, unit: str = "doc",
                 log_every_s: float = 10.0, prefix: str = "progress", disable: bool = False,
                 path=None):
        """`path`: also keep the latest rates in this JSON file (read by attninf-status)."""
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=disable,
                        mininterval=1.0)
        self.tracker = tracker
        self.prefix = prefix
        self.t0 = time.perf_counter()
        self.items = 0
        self.tokens = 0
        self.total = total
        self._last_log = self.t0
        self.log_every_s = log_every_s
        self.path = path

    def rates(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {f"{self.prefix}/items": self.items, f"{self.prefix}/tokens": self.tokens,
               f"{self.prefix}/items_per_s": self.items / dt,
               f"{self.prefix}/tokens_per_s": self.tokens / dt, f"{self.prefix}/elapsed_s": dt}
        if self.total:
            rate = self.items / dt
            out[f"{self.prefix}/eta_s"] = (self.total - self.items) / rate if rate > 0 else float("nan")
        return out

    def update(self, items: int = 1, tokens: int = 0) -> None:
        self.items += items
        self.tokens += tokens
        self.bar.update(items)
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        post = {"tok_s": f"{self.tokens / dt:,.0f}"}
        pipe = active_pipeline()
        if pipe is not None and self.total:
            pipe.stage_fraction(self.items / self.total)
            post["pipeline_eta"] = fmt_s(pipe.eta_s())
        self.bar.set_postfix(post, refresh=False)
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            if self.tracker is not None:
                self.tracker.log(self.rates())
            self._write()

    def _write(self, finished: bool = False) -> None:
        if self.path is None:
            return
        from attninf.manifest import write_json

        r = self.rates()
        write_json(self.path, {"items": self.items, "tokens": self.tokens, "total": self.total,
                               "tokens_per_s": r[f"{self.prefix}/tokens_per_s"],
                               "eta_s": r.get(f"{self.prefix}/eta_s"), "finished": finished})

    def close(self) -> dict[str, float]:
        self.bar.close()
        r = self.rates()
        if self.tracker is not None:
            self.tracker.log(r)
        self._write(finished=True)
        return r

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- the whole pipeline -----------------------------------------------------------------------

# Relative cost of one unit of each stage (one arm for per-arm stages), before anything is
# measured: the demo's wall times on 2 CPU cores, in seconds. Only the ratios matter: the ETA
# scales them by how fast this run has gone so far (see PipelineProgress.eta_s).
STAGE_PRIOR_S = {"detect": 30.0, "mirror": 15.0, "score": 150.0, "select": 3.0, "mix": 5.0,
                 "pretrain": 45.0, "eval": 20.0, "eval_masked": 60.0, "report": 5.0}


def fmt_s(s: float | None) -> str:
    """Seconds as '42s', '3m05s' or '1h02m'; '?' when unknown."""
    if s is None or s != s or s < 0:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class PipelineProgress:
    """`stage i of n` lines and an ETA for the whole pipeline.

    The ETA is the remaining prior cost (STAGE_PRIOR_S of the units not finished, less the done
    fraction of the running one) times the measured speed: wall time spent on finished units
    (and the running one) / their prior cost. The running stage's done fraction comes from its
    own progress bar (Progress.update reports items / total here), so the ETA moves while a
    long stage runs, not only between stages. Units skipped as already done cost nothing more,
    but their recorded wall time still calibrates the speed.
    """

    def __init__(self, units: list[tuple[str, str | None]], log=None, clock=time.perf_counter):
        self.units = units
        self.n = len(units)
        self.log = log
        self.clock = clock
        self.t0 = clock()
        self.done: set[int] = set()
        self.skipped: set[int] = set()
        self.work_s = 0.0  # wall time of units that ran here (finished or running)
        self.work_prior = 0.0  # prior cost those units completed
        self.current: int | None = None
        self.current_t0 = 0.0
        self.fraction = 0.0

    @staticmethod
    def label(unit: tuple[str, str | None]) -> str:
        name, arm = unit
        return name + (f"[{arm}]" if arm else "")

    def prior(self, i: int) -> float:
        return STAGE_PRIOR_S.get(self.units[i][0], 10.0)

    def eta_s(self) -> float | None:
        """Seconds left for the whole pipeline, None before anything has been measured."""
        spent, prior_done = self.work_s, self.work_prior
        if self.current is not None:
            spent += self.clock() - self.current_t0
            prior_done += self.fraction * self.prior(self.current)
        left = sum(self.prior(i) for i in range(self.n) if i not in self.done and i not in self.skipped)
        if self.current is not None:
            left -= self.fraction * self.prior(self.current)
        if left <= 0:
            return 0.0
        if prior_done <= 0 or spent <= 0:
            return None
        return left * spent / prior_done

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log.info(msg)

    def start(self, i: int) -> None:
        self.current, self.current_t0, self.fraction = i, self.clock(), 0.0
        _ACTIVE[0] = self
        self._say(f"stage {i + 1} of {self.n}: {self.label(self.units[i])} started "
                  f"(elapsed {fmt_s(self.clock() - self.t0)}, pipeline ETA {fmt_s(self.eta_s())})")

    def stage_fraction(self, fraction: float) -> None:
        """The running stage's own progress figure, 0..1."""
        self.fraction = min(max(float(fraction), 0.0), 1.0)

    def end(self, i: int, wall_s: float | None, skipped: bool = False) -> None:
        if skipped:
            self.skipped.add(i)
            if wall_s:  # its earlier run on this config is a measurement too
                self.work_s += wall_s
                self.work_prior += self.prior(i)
        else:
            self.done.add(i)
            self.work_s += self.clock() - self.current_t0 if self.current == i else (wall_s or 0.0)
            self.work_prior += self.prior(i)
        self.current = None
        _ACTIVE[0] = None
        what = "skipped (already done)" if skipped else f"done in {fmt_s(wall_s)}"
        self._say(f"stage {i + 1} of {self.n}: {self.label(self.units[i])} {what}; "
                  f"pipeline ETA {fmt_s(self.eta_s())}")

    def abort(self) -> None:
        self.current = None
        _ACTIVE[0] = None


_ACTIVE: list[PipelineProgress | None] = [None]


def active_pipeline() -> PipelineProgress | None:
    """The pipeline whose stage is running in this process (None outside the runner)."""
    return _ACTIVE[0]
