"""Seeds as arms: `pretrain.seeds` expands every arm into `<arm>@seed<S>` with its own key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from attninf import arms
from attninf.config import ConfigError
from attninf.runner import stage_dirs, stage_key
from attninf.stages import STAGES


def _cfg(seeds):
    return OmegaConf.create({"run_dir": "/r", "stages": ["mix", "pretrain", "eval", "report"],
                             "arms": {"baseline": {"selection": None}, "ai": {"selection": "attention_influence"}},
                             "pretrain": {"seed": 1234, "seeds": seeds, "train_iters": 4}, "eval": {}})


def test_expand_split_and_per_seed_config():
    assert arms.expand(_cfg(None)) == ["baseline", "ai"]
    c = _cfg([0, 1])
    assert arms.expand(c) == ["baseline@seed0", "baseline@seed1", "ai@seed0", "ai@seed1"]
    assert STAGES["pretrain"].arms(c) == arms.expand(c) == STAGES["eval"].arms(c)
    assert arms.split("ai@seed1") == ("ai", 1) and arms.split("ai") == ("ai", None)
    s1 = arms.config_for(c, "ai@seed1")
    assert s1.pretrain.seed == 1 and s1.pretrain.seeds is None and c.pretrain.seed == 1234
    assert arms.config_for(c, "ai") is c
    dirs = stage_dirs(c, [], multirun=False)
    assert dirs[("pretrain", "ai@seed1")] == dirs[("pretrain", "ai@seed0")].parent / "ai@seed1"


def test_adding_a_seed_keeps_the_other_seeds_keys():
    inputs = {"mix": {"key": "m"}}
    two, three = _cfg([0, 1]), _cfg([0, 1, 2])
    k2 = stage_key(arms.config_for(two, "ai@seed0"), "pretrain", "ai@seed0", inputs)[0]
    k3 = stage_key(arms.config_for(three, "ai@seed0"), "pretrain", "ai@seed0", inputs)[0]
    k_other = stage_key(arms.config_for(three, "ai@seed1"), "pretrain", "ai@seed1", inputs)[0]
    assert k2 == k3 != k_other


@pytest.mark.parametrize("bad", [[], [0, 0], ["a"]])
def test_bad_seeds_are_a_config_error(bad):
    with pytest.raises(ConfigError, match="pretrain.seeds"):
        arms.expand(_cfg(bad))
