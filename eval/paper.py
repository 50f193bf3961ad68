"""The paper's tables (eval/paper_numbers.yaml) and how to read the matching lm-eval metric."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")


@lru_cache(maxsize=4)
def load(path: str | None = None) -> dict:
    with open(path or PAPER_NUMBERS, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def headline_metrics(path: str | None = None) -> dict[str, str]:
    """lm-eval task -> the `metric,filter` key the paper's number corresponds to."""
    out = {}
    for table in ("table1", "table6"):
        for row in load(path)[table]["rows"]:
            if row.get("task") and row.get("metric"):
                out.setdefault(row["task"], row["metric"])
    return out


def pick_metric(metrics: dict, key: str) -> tuple[str, float, float | None] | None:
    """(key used, value, stderr) from one task's lm-eval result dict.

    Falls back to the first key with the same metric name under another filter (e.g. a task
    version that renamed its filter); the caller reports the key it got.
    """
    name = key.split(",", 1)[0]
    cands = [key] + [k for k in metrics if k.split(",", 1)[0] == name and "_stderr" not in k]
    for k in cands:
        v = metrics.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            filt = k.split(",", 1)[1] if "," in k else None
            se = metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
            return k, float(v), float(se) if isinstance(se, (int, float)) else None
    return None
