"""Per-item scores from lm-eval's sample logs, aligned across arms for the paired statistics.

An eval folder holds `results.json` and `samples/<leaf task>.jsonl`: one row per (item, filter)
with `doc_id`, `filter` and the metric's per-item value (e.g. `acc`, `exact_match`, HumanEval's
`pass_at_k` = that problem's pass@1 over its n samples). A group such as MMLU is read leaf by
leaf (results.json's `group_subtasks`); its score is lm-eval's aggregate of the leaf means,
weighted by leaf size (`weight_by_size`, what MMLU's group config says) or, if that does not
reproduce the group value lm-eval reported, by equal weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class ItemsMissing(LookupError):
    """The sample logs needed for an item-level comparison are absent or do not line up."""


def leaves(res: dict, task: str) -> list[str]:
    """Leaf tasks under `task` (itself when it is not a group), in results.json order."""
    subs = (res.get("group_subtasks") or {}).get(task)
    if not subs:
        return [task]
    out: list[str] = []
    for s in subs:
        out += leaves(res, s)
    return out


def read_leaf(eval_dir: Path, leaf: str, key: str) -> dict[int, float]:
    """{doc_id: value} of metric `key` ("metric,filter") in eval_dir/samples/<leaf>.jsonl."""
    path = Path(eval_dir) / "samples" / f"{leaf}.jsonl"
    if not path.exists():
        raise ItemsMissing(f"{path}: no sample log (eval.log_samples=false?)")
    name, _, filt = key.partition(",")
    out: dict[int, float] = {}
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            row = json.loads(line)
            if filt and row.get("filter", "none") != filt:
                continue
            if name not in row:
                raise ItemsMissing(f"{path}:{i}: no field '{name}' (metric {key})")
            out[int(row["doc_id"])] = float(row[name])
    if not out:
        raise ItemsMissing(f"{path}: no rows for filter '{filt}'")
    return out


@dataclass
class Aligned:
    """Scores of two arms on their common items: [seeds x items] each, plus subtask labels."""

    a: np.ndarray
    b: np.ndarray
    strata: list[str] | None
    stratum_weights: dict[str, float] | None
    aggregation: str
    dropped: int  # items present in some runs but not all


def align(dirs_a: list[Path], dirs_b: list[Path], res: dict, task: str, key: str) -> Aligned:
    """Items common to every run of both arms (matched by leaf task and lm-eval doc_id)."""
    ls = leaves(res, task)
    rows_a: list[list[float]] = [[] for _ in dirs_a]
    rows_b: list[list[float]] = [[] for _ in dirs_b]
    strata: list[str] = []
    dropped = 0
    for leaf in ls:
        per = [read_leaf(d, leaf, key) for d in list(dirs_a) + list(dirs_b)]
        common = sorted(set.intersection(*(set(p) for p in per)))
        dropped += len(set.union(*(set(p) for p in per))) - len(common)
        for j, p in enumerate(per):
            vals = [p[i] for i in common]
            (rows_a[j] if j < len(dirs_a) else rows_b[j - len(dirs_a)]).extend(vals)
        strata += [leaf] * len(common)
    if not strata:
        raise ItemsMissing(f"{task}: no items common to all runs")
    a, b = np.array(rows_a, dtype=float), np.array(rows_b, dtype=float)
    weights, how = None, "mean over items"
    if len(ls) > 1:
        weights, how = _group_weights(res, task, key, b[0], strata)
    return Aligned(a, b, strata if len(ls) > 1 else None, weights, how, dropped)


def _group_weights(res: dict, task: str, key: str, b0: np.ndarray, strata: list[str]):
    """Size weights (lm-eval weight_by_size), unless equal weights reproduce lm-eval's number."""
    reported = ((res.get("results") or {}).get(task) or {}).get(key)
    s = np.asarray(strata)
    names = list(dict.fromkeys(strata))
    means = np.array([b0[s == n].mean() for n in names])
    sizes = np.array([np.sum(s == n) for n in names], dtype=float)
    by_size = float(means @ sizes / sizes.sum())
    equal = float(means.mean())
    if isinstance(reported, (int, float)) and abs(equal - reported) < 1e-9 < abs(by_size - reported):
        return {n: 1.0 for n in names}, f"mean of {len(names)} subtask means (as lm-eval reported)"
    return None, f"size-weighted over {len(names)} subtasks (lm-eval weight_by_size)"
