"""Pretraining arms and their seeds: `pretrain.seeds=[0,1]` trains every arm once per seed.

A seeded arm is an arm of its own, named `<arm>@seed<S>` (e.g. `attention_influence@seed1`), so
every per-arm stage (pretrain, eval), the report and the Slurm submission see one list of arms
from `spec.arms(cfg)` and each seed gets its own folders (`pretrain/<arm>@seed<S>/`). The seed
sets `pretrain.seed` of that arm's pretraining, which drives both the initialisation and the
data order; the mixture (mix stage) is shared by an arm's seeds. With `pretrain.seeds` null
(the default) arm names are plain and `pretrain.seed` is used.
"""

from __future__ import annotations

import copy
import re

from omegaconf import DictConfig, OmegaConf, open_dict

from attninf.config import ConfigError

_SEEDED = re.compile(r"^(?P<arm>.+)@seed(?P<seed>-?\d+)$")


def seeds(cfg: DictConfig) -> list[int] | None:
    """`pretrain.seeds` as ints (None when unset); bad values are a config error."""
    raw = (cfg.get("pretrain") or {}).get("seeds")
    if raw is None:
        return None
    vals = list(raw) if OmegaConf.is_list(raw) or isinstance(raw, (list, tuple)) else [raw]
    if not vals or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise ConfigError(f"pretrain.seeds: expected a non-empty list of integers, got {vals}")
    if len(set(vals)) != len(vals):
        raise ConfigError(f"pretrain.seeds: repeated seed in {vals}")
    return vals


def base_arms(cfg: DictConfig) -> list[str]:
    return list((cfg.get("arms") or {}).keys())


def expand(cfg: DictConfig) -> list[str]:
    """Every (arm, seed) run: plain arm names, or `<arm>@seed<S>` for each of pretrain.seeds."""
    ss = seeds(cfg)
    arms = base_arms(cfg)
    if ss is None:
        return arms
    return [f"{a}@seed{s}" for a in arms for s in ss]


def split(arm: str | None) -> tuple[str | None, int | None]:
    """`attention_influence@seed1` -> ("attention_influence", 1); plain names -> (name, None)."""
    if arm is None:
        return None, None
    m = _SEEDED.match(arm)
    return (m["arm"], int(m["seed"])) if m else (arm, None)


def base(arm: str | None) -> str | None:
    return split(arm)[0]


def config_for(cfg: DictConfig, arm: str | None) -> DictConfig:
    """The config a seeded arm's stages run with: pretrain.seed = its seed, pretrain.seeds unset.

    Dropping the list keeps each seed's stage key independent of the others: adding a seed to
    an experiment trains only the new one.
    """
    _, seed = split(arm)
    if seed is None:
        return cfg
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    with open_dict(out):
        out.pretrain.seed = seed
        out.pretrain.seeds = None
    return out

