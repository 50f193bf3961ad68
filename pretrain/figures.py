"""Figures: the LR schedule and loss curves of one arm, and loss curves across arms.

Read from the `metrics.jsonl` each training run writes (train rows: step, loss, lr, ...;
validation rows: step, val/<domain>, val/mean). Matplotlib's Agg backend, no display needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from attninf import plots


def _rows(path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def _plt():
    return plots.pyplot()


def plot_run(metrics_file, out_png, schedule_cfg=None, total_steps: int | None = None,
             max_lr: float | None = None, title: str = "") -> Path:
    """Two panels: LR per step (logged, plus the planned WSD closed form) and train/val loss."""
    from pretrain.schedule import phases, wsd_lr

    plt = _plt()
    rows = _rows(metrics_file)
    tr = [r for r in rows if "loss" in r]
    va = [r for r in rows if "val/mean" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if schedule_cfg is not None and total_steps and max_lr:
        xs = list(range(total_steps))
        ax1.plot([x + 1 for x in xs], [wsd_lr(x, schedule_cfg, total_steps, max_lr) for x in xs],
                 color="0.7", lw=3, label="WSD (planned)")
        ph = phases(schedule_cfg, total_steps)
        ax1.axvline(ph.stable_end, ls=":", color="k", lw=1, label="end of stable phase")
        ax2.axvline(ph.stable_end, ls=":", color="k", lw=1)
    ax1.plot([r["step"] for r in tr], [r["lr"] for r in tr], lw=1, label="logged")
    ax1.set(xlabel="step", ylabel="learning rate", title="LR schedule")
    ax1.legend()
    ax2.plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=1, label="train")
    doms = sorted({k for r in va for k in r if k.startswith("val/") and k != "val/mean"})
    for k in doms:
        ax2.plot([r["step"] for r in va], [r[k] for r in va], marker=".", lw=1, label=k)
    ax2.set(xlabel="step", ylabel="loss (nats/token)", title=f"loss {title}".strip())
    ax2.legend(fontsize=8)
    return plots.save(fig, out_png)


def plot_loss_curves(metrics_files: dict[str, str | Path], out_png) -> Path:
    """Training loss (left) and mean validation loss (right) per arm, for the report."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, path in metrics_files.items():
        rows = _rows(path)
        tr = [r for r in rows if "loss" in r]
        va = [r for r in rows if "val/mean" in r]
        ax1.plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=1, label=arm)
        if va:
            ax2.plot([r["step"] for r in va], [r["val/mean"] for r in va], marker=".", lw=1, label=arm)
    ax1.set(xlabel="step", ylabel="train loss", title="training loss per arm")
    ax2.set(xlabel="step", ylabel="held-out loss (mean over domains)", title="validation loss per arm")
    ax1.legend()
    ax2.legend()
    return plots.save(fig, out_png)
