"""The WSD (warmup-stable-decay) learning-rate schedule, as the paper trains the 7B.

PAPER.md section 5: warmup 0.1% of steps, stable until 75%, decay over the last 25%; decay shape
and minimum LR are not stated (linear to 10% of peak assumed, both configurable). The schedule
itself is Megatron's `OptimizerParamScheduler(lr_decay_style="WSD")`; this module only turns the
paper's fractions into its step counts (`megatron_kwargs`) and states the closed form (`wsd_lr`)
that figures plot and tests hold the real scheduler against.

Step convention (Megatron's): the update with 0-based index n uses lr(n). With warmup, lr(0) =
init_lr (0 by default), so the very first update does nothing; that is Megatron's own behaviour.
The *end of the stable phase* is step `stable_end` = total - decay_steps: the checkpoint taken
there is the pre-decay model (the paper reports pre-decay results at 746B of 1T tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attninf.config import check

DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass
class WSDConfig:
    warmup_fraction: float = 0.001  # paper: 0.1% of steps
    stable_end_fraction: float = 0.75  # paper: stable until 75%, then decay over the last 25%
    decay_style: str = "linear"  # unstated in the paper; linear | cosine | exponential | minus_sqrt
    min_lr_ratio: float = 0.1  # unstated; min LR = ratio x peak
    init_lr: float = 0.0
    # Explicit step counts override the fractions (tiny runs: 0.1% of 60 steps rounds to 0).
    warmup_steps: int | None = None
    decay_steps: int | None = None

    def validate(self) -> None:
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
        check(0 < self.stable_end_fraction <= 1, "stable_end_fraction", "must be in (0, 1]")
        check(self.decay_style in DECAY_STYLES, "decay_style", f"one of {DECAY_STYLES}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")


@dataclass(frozen=True)
class Phases:
    total: int
    warmup: int
    decay: int

    @property
    def stable_end(self) -> int:
        return self.total - self.decay


def phases(cfg: WSDConfig, total_steps: int) -> Phases:
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_fraction * total_steps))
    decay = cfg.decay_steps if cfg.decay_steps is not None else total_steps - int(round(cfg.stable_end_fraction * total_steps))
    if not 0 <= warm < total_steps:
        raise ValueError(f"pretrain.schedule: warmup steps {warm} must be in [0, {total_steps})")
    if not 0 <= decay <= total_steps - warm:
        raise ValueError(f"pretrain.schedule: decay steps {decay} must be in [0, total - warmup = "
                         f"{total_steps - warm}]")
    return Phases(total_steps, warm, decay)


def megatron_kwargs(cfg: WSDConfig, total_steps: int, max_lr: float) -> dict:
    """Arguments for megatron.core.optimizer_param_scheduler.OptimizerParamScheduler (LR part)."""
    ph = phases(cfg, total_steps)
    return dict(init_lr=cfg.init_lr, max_lr=max_lr, min_lr=max_lr * cfg.min_lr_ratio,
                lr_warmup_steps=ph.warmup, lr_decay_steps=total_steps, lr_decay_style="WSD",
                wsd_decay_steps=ph.decay, lr_wsd_decay_style=cfg.decay_style)


def wsd_lr(step: int, cfg: WSDConfig, total_steps: int, max_lr: float) -> float:
    """Closed form of the schedule at 0-based update `step`."""
    ph = phases(cfg, total_steps)
    lo = max_lr * cfg.min_lr_ratio
    if ph.warmup > 0 and step <= ph.warmup:
        return cfg.init_lr + (max_lr - cfg.init_lr) * step / ph.warmup
    if step <= ph.stable_end:
        return max_lr
    if step > total_steps:
        return lo
    r = (step - ph.stable_end) / ph.decay
    coeff = {"linear": 1 - r, "cosine": 0.5 * (math.cos(math.pi * r) + 1),
             "exponential": 2 * 0.5 ** r - 1, "minus_sqrt": 1 - math.sqrt(r)}[cfg.decay_style]
    return lo + coeff * (max_lr - lo)
