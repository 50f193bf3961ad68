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
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, open_dict

from attninf.config import ConfigError, build, check, to_plain

_SEEDED = re.compile(r"^(?P<arm>.+)@seed(?P<seed>-?\d+)$")


@dataclass
class ArmConfig:
    """One pretraining arm: the corpus plus, optionally, one selection method's documents."""

    selection: str | None = None  # a select method (selection/select.py METHODS); null = corpus only
    # null = add the subset once more (mix.subset_weight); f in (0, 1) = its share of trained tokens
    subset_weight: float | None = None

    def validate(self) -> None:
        from selection.select import METHODS  # imports no torch

        check(self.selection is None or self.selection in METHODS, "selection",
              f"'{self.selection}' is not a selection method; known: {', '.join(METHODS)} (or null: corpus only)")
        check(self.subset_weight is None or 0.0 < self.subset_weight < 1.0, "subset_weight",
              f"{self.subset_weight} must be null (add the subset once more) or in (0, 1): "
              "a share of 1 or more leaves the corpus a negative weight")


def load_arms(node, select_methods: list[str] | None = None) -> dict[str, ArmConfig]:
    """`arms` as {name: ArmConfig}; a misspelled key or method is one ConfigError naming it.

    With `select_methods` (select.methods), an arm's method must be one the select stage makes,
    or mix would find no rows for it after the whole corpus is tokenised.
    """
    data = to_plain(node) if node is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"arms: expected a mapping of arm name -> {{selection, subset_weight}}, got {data!r}")
    out = {}
    for name, v in data.items():
        check(bool(_NAME.match(str(name))), f"arms.{name}",
              "arm names are letters, digits, '_' and '-' (they name folders; '@seed' is added by pretrain.seeds)")
        a = build(ArmConfig, v or {}, f"arms.{name}")
        if select_methods is not None and a.selection is not None:
            check(a.selection in select_methods, f"arms.{name}.selection",
                  f"'{a.selection}' is not in select.methods {list(select_methods)}: add it there")
        out[str(name)] = a
    return out


_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


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

