"""Head sets: retrieval / bottom / random / list / none, sizes, validation, config files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from attninf.config import ConfigError, build
from selection.heads import (HeadsConfig, load_heads_json, n_selected, rank_heads, resolve_heads)

CONF = Path(__file__).resolve().parents[2] / "conf"


def _scores(n_layers=4, n_heads=5, seed=0):
    rng = random.Random(seed)
    return [[rng.random() for _ in range(n_heads)] for _ in range(n_layers)]


def _cfg(**kw) -> HeadsConfig:
    return build(HeadsConfig, kw, "heads")


def test_sizes_round_half_up():
    assert n_selected(0.05, 30 * 9) == 14  # 13.5 -> 14 (SmolLM2-135M)
    assert n_selected(0.05, 16 * 20) == 16  # the paper's selector
    assert n_selected(0.001, 20) == 1  # never empty
    assert n_selected(0.05, 20, count=3) == 3


def test_rank_heads_matches_sorting_and_breaks_ties_at_random_by_seed():
    s = _scores()
    flat = sorted(((s[l][h], l, h) for l in range(4) for h in range(5)), key=lambda x: -x[0])
    assert rank_heads(s) == [(l, h) for _, l, h in flat]
    tied = [[0.5, 0.9], [0.9, 0.1]]
    for seed in range(5):
        r = rank_heads(tied, seed=seed)
        assert set(r[:2]) == {(0, 1), (1, 0)} and r[2:] == [(0, 0), (1, 1)]
        assert rank_heads(tied, descending=False, seed=seed)[:2] == [(1, 1), (0, 0)]
    # a big block of zeros (the demo: 220 of 270 heads score exactly 0): the seeded order is not
    # the (layer, head) order, differs between seeds and is the same for the same seed
    zeros = [[0.0] * 9 for _ in range(30)]
    zeros[20][3] = 0.5
    orders = {tuple(rank_heads(zeros, descending=False, seed=k)[:14]) for k in range(4)}
    assert len(orders) == 4
    assert rank_heads(zeros, False, 1) == rank_heads(zeros, False, 1)
    first = rank_heads(zeros, descending=False, seed=0)[:14]
    assert {l for l, _ in first} != {0, 1} and len({l for l, _ in first}) > 4


def test_bottom_cut_inside_a_tie_is_random_and_warns_naming_the_block(caplog):
    from selection.heads import tie_at_cut

    zeros = [[0.0] * 9 for _ in range(30)]
    for l in range(17, 25):
        zeros[l][l % 9] = 0.1 * (l - 16)  # 8 non-zero heads in layers 17-24
    hj = {"scores": zeros, "selected": [[24, 6]]}
    with caplog.at_level("WARNING", logger="selection.heads"):
        bottom = resolve_heads(_cfg(set="bottom", count=14, seed=0), hj, 30, 9)
    assert len(bottom) == 14 and all(zeros[l][h] == 0.0 for l, h in bottom)
    assert {l for l, _ in bottom} != {0, 1}
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "bottom cut at 14 heads falls inside a block of 262 heads tied at score 0" in msg
    assert "layers 0-29" in msg and "14 of them were drawn at random (heads.seed=0)" in msg
    tie = tie_at_cut(zeros, rank_heads(zeros, descending=False), 14)
    assert tie["size"] == 262 and tie["drawn"] == 14 and tie["layers"] == [0, 29]
    assert tie_at_cut(zeros, rank_heads(zeros), 8) is None  # the top 8 are distinct: no warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="selection.heads"):
        resolve_heads(_cfg(set="retrieval", count=8), hj, 30, 9)
    assert not caplog.records


def test_random_control_excludes_the_papers_top_5_percent_at_any_size():
    """heads.fraction=0.02 (5 of 270 heads) used to exclude only the top 5 heads, so the
    "non-retrieval" random heads could include the paper's top 14."""
    rng = random.Random(0)
    s = [[rng.random() for _ in range(9)] for _ in range(30)]
    top14 = set(rank_heads(s)[:14])
    hj = {"scores": s, "selected": [list(h) for h in rank_heads(s)[:14]]}
    for seed in range(30):
        rnd = resolve_heads(_cfg(set="random", fraction=0.02, seed=seed), hj, 30, 9)
        assert len(rnd) == 5 and not set(rnd) & top14
    # a larger requested size excludes the retrieval set at that size (which holds the top 5%)
    top40 = set(rank_heads(s)[:40])
    for seed in range(10):
        rnd = resolve_heads(_cfg(set="random", count=40, seed=seed), hj, 30, 9)
        assert not set(rnd) & top40


def test_retrieval_bottom_random_none():
    s = _scores()
    hj = {"scores": s, "selected": [list(h) for h in rank_heads(s)[:1]]}
    top = resolve_heads(_cfg(set="retrieval", count=3), hj, 4, 5)
    assert top == rank_heads(s)[:3]
    bottom = resolve_heads(_cfg(set="bottom", count=3), hj, 4, 5)
    assert bottom == rank_heads(s)[-3:][::-1]
    assert min(s[l][h] for l, h in top) > max(s[l][h] for l, h in bottom)
    rnd = resolve_heads(_cfg(set="random", count=3, seed=1), hj, 4, 5)
    assert len(set(rnd)) == 3 and not set(rnd) & set(top)
    assert resolve_heads(_cfg(set="random", count=3, seed=1), hj, 4, 5) == rnd  # seeded
    assert resolve_heads(_cfg(set="random", count=3, seed=2), hj, 4, 5) != rnd
    # without exclusion no scores are needed
    free = resolve_heads(_cfg(set="random", count=19, exclude_retrieval=False), None, 4, 5)
    assert len(free) == 19
    assert resolve_heads(_cfg(set="none"), None, 4, 5) == []


def test_random_excludes_retrieval_exhaustively():
    s = _scores()
    hj = {"scores": s, "selected": []}
    top = set(rank_heads(s)[:10])
    for seed in range(20):
        assert not top & set(resolve_heads(_cfg(set="random", count=10, seed=seed), hj, 4, 5))
    # 55% of 20 heads = 11 random heads, but excluding the top 11 leaves only 9
    with pytest.raises(ConfigError, match="11 random heads requested but only 9 heads lie outside the 11 excluded"):
        resolve_heads(_cfg(set="random", fraction=0.55), hj, 4, 5)


def test_list_and_validation_errors():
    assert resolve_heads(_cfg(set="list", list=[[0, 1], [3, 4]]), None, 4, 5) == [(0, 1), (3, 4)]
    assert resolve_heads(_cfg(set="list", list=["2,3", "1:0"]), None, 4, 5) == [(2, 3), (1, 0)]
    with pytest.raises(ConfigError, match=r"head \[4, 0\] is outside the model \(4 layers x 5 heads"):
        resolve_heads(_cfg(set="list", list=[[4, 0]]), None, 4, 5)
    with pytest.raises(ConfigError, match=r"heads.fraction: 0.0 is outside \(0, 1\]"):
        _cfg(fraction=0.0)
    with pytest.raises(ConfigError, match=r"heads.fraction: 1.5"):
        _cfg(fraction=1.5)
    with pytest.raises(ConfigError, match="heads.set: 'best'"):
        _cfg(set="best")
    with pytest.raises(ConfigError, match="set heads.set=list"):
        _cfg(list=[[0, 0]])
    with pytest.raises(ConfigError, match="duplicate"):
        _cfg(set="list", list=[[0, 0], [0, 0]])
    with pytest.raises(ConfigError, match="needs retrieval scores"):
        resolve_heads(_cfg(set="retrieval"), None, 4, 5)
    with pytest.raises(ConfigError, match="exclude_retrieval=false"):
        resolve_heads(_cfg(set="random"), None, 4, 5)
    with pytest.raises(ConfigError, match="unknown config key"):
        _cfg(sett="retrieval")


def test_heads_file(tmp_path):
    s = _scores()
    doc = {"model": "m", "n_layers": 4, "n_heads": 5, "scores": s,
           "selected": [list(h) for h in rank_heads(s)[:2]]}
    f = tmp_path / "heads.json"
    f.write_text(json.dumps(doc))
    hj = load_heads_json(f)
    # top-k re-ranked from scores, so another fraction than detection's still works
    assert resolve_heads(_cfg(set="retrieval", count=4, file=str(f)), hj, 4, 5) == rank_heads(s)[:4]
    assert resolve_heads(_cfg(set="retrieval", fraction=0.2, file=str(f)), hj, 4, 5) == rank_heads(s)[:4]
    with pytest.raises(ConfigError, match=r"scores are for 4 layers x 5 heads .* this model has 30 x 9"):
        resolve_heads(_cfg(set="retrieval", file=str(f)), hj, 30, 9)
    plain = tmp_path / "list.json"
    plain.write_text("[[1, 2], [0, 0]]")
    assert resolve_heads(_cfg(set="retrieval", file=str(plain)), load_heads_json(plain), 4, 5) == [(1, 2), (0, 0)]
    assert resolve_heads(_cfg(set="list", file=str(plain)), load_heads_json(plain), 4, 5) == [(1, 2), (0, 0)]
    with pytest.raises(ConfigError, match="outside the model"):
        resolve_heads(_cfg(set="list", file=str(plain)), load_heads_json(plain), 1, 1)
    with pytest.raises(ConfigError, match="does not exist"):
        load_heads_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_heads_json(bad)


def test_config_files_compose(tmp_path):
    """conf/heads, conf/detect, conf/mirror compose under Hydra and build their dataclasses."""
    from hydra import compose, initialize_config_dir

    from selection.detect import DetectConfig
    from selection.mirror import MirrorConfig

    for g in ("heads", "detect", "mirror"):
        shutil.copytree(CONF / g, tmp_path / g)
    (tmp_path / "config.yaml").write_text(
        "defaults:\n  - detect: paper\n  - heads: retrieval\n  - mirror: default\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        for heads in sorted(p.stem for p in (CONF / "heads").glob("*.yaml")):
            for det in sorted(p.stem for p in (CONF / "detect").glob("*.yaml")):
                cfg = compose("config", overrides=[f"heads={heads}", f"detect={det}"])
                h = build(HeadsConfig, cfg.heads, "heads")
                d = build(DetectConfig, cfg.detect, "detect")
                build(MirrorConfig, cfg.mirror, "mirror")
                assert h.set == {"retrieval": "retrieval", "random": "random", "bottom": "bottom"}[heads]
                assert d.mode == ("generate" if det == "paper" else "teacher_forced")
        paper = build(DetectConfig, compose("config").detect, "detect")
        assert (paper.num_probes, paper.max_tokens, paper.shots, paper.key_length,
                paper.max_value_tokens, paper.match) == (800, 4096, 3, 32, 30, "offsets")
        h = build(HeadsConfig, compose("config").heads, "heads")
        assert h.fraction is None and h.size_fraction == 0.05  # one knob; null = paper 5%


def test_heads_file_masks_its_own_selected_list(tmp_path):
    """A file listing 2 heads masks those 2 unless a size is asked for explicitly, even when the
    list is not the top of its scores; bottom/random take its size and random avoids it."""
    from selection.heads import retrieval_set

    s = _scores()
    own = [list(h) for h in rank_heads(s)[3:5]]  # deliberately not the top-2
    f = tmp_path / "heads.json"
    f.write_text(json.dumps({"model": "m", "scores": s, "selected": own}))
    hj = load_heads_json(f)
    cfg = _cfg(set="retrieval", file=str(f))
    assert cfg.fraction is None
    assert resolve_heads(cfg, hj, 4, 5) == [tuple(h) for h in own]
    assert len(resolve_heads(_cfg(set="bottom", file=str(f)), hj, 4, 5)) == 2
    rnd = resolve_heads(_cfg(set="random", file=str(f), seed=3), hj, 4, 5)
    assert len(rnd) == 2 and not set(rnd) & {tuple(h) for h in own}
    # the avoided set: the top max(5% = 1, size 2) by score + the file's own list
    assert set(retrieval_set(cfg, hj, 4, 5)) == set(rank_heads(s)[:2]) | {tuple(h) for h in own}
    assert set(retrieval_set(_cfg(set="retrieval", count=3), hj, 4, 5)) == (
        set(rank_heads(s)[:3]) | {tuple(h) for h in own})


def test_table6_rows_name_the_set_masked_and_random_avoids_it(tmp_path):
    from eval.masked import head_sets

    s = _scores()
    hj = {"scores": s, "selected": [list(h) for h in rank_heads(s)[:2]]}
    for seed in range(20):
        sets = head_sets(_cfg(set="bottom", seed=seed), hj, 4, 5, ["none", "retrieval", "random"])
        bottom, label = sets["retrieval"]
        assert bottom == rank_heads(s, descending=False)[:2]
        assert "bottom" in label and "retrieval heads" not in label
        rnd, rlabel = sets["random"]
        assert len(rnd) == 2 and "random" in rlabel
        # outside both the masked (bottom) set and the retrieval heads
        assert not set(rnd) & (set(bottom) | set(rank_heads(s)[:2]))
    top, label = head_sets(_cfg(set="retrieval"), hj, 4, 5, ["retrieval"])["retrieval"]
    assert top == rank_heads(s)[:2] and label.startswith("2 retrieval heads")
