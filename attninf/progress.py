"""Progress for long loops: documents/s, tokens/s and ETA on the terminal and in W&B.

The same numbers go to both places so a cluster user watching W&B sees what a local user sees.
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
        self.bar.set_postfix(tok_s=f"{self.tokens / dt:,.0f}", refresh=False)
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
