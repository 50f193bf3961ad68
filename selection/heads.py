"""Head sets: which attention heads a later stage masks.

Every stage that masks heads (mirror, score, eval_masked) takes its set from here, so an
ablation is one config switch (`heads.set=random`, `heads.fraction=0.1`, `heads.file=...`):
- retrieval: the top heads by detected retrieval score (the paper: top 5% of layer x head);
- bottom:    the lowest-scoring heads (a "least retrieval-like" control);
- random:    seeded random heads, by default excluding the retrieval heads of the same size
             (the paper's Table 6 control: "random non-retrieval heads");
- list:      an explicit [[layer, head], ...] list (`heads.list`), or a file holding one;
- none:      no heads (the unmasked reference).
Head identifiers are zero-based [layer, query_head] everywhere.

Size: `count` when given, else round-half-up(fraction x n_layers x n_heads), at least 1
(5% of 30 x 9 = 13.5 -> 14 heads on SmolLM2-135M; the paper's 16 x 20 selector -> 16).
Ranking ties are broken in a seeded random order (`heads.seed`): breaking them by (layer, head)
made `bottom` on a selector whose lower heads all score exactly 0 "every head of the first
layers", about the most destructive set there is, not a "least retrieval-like" one. When a
cut falls inside a block of tied scores, a warning names the block (its score, size and layers)
and how many of its heads the set drew; heads.json records it as `tie_at_cut`.

The random control's exclusion (`exclude_retrieval`) is the union of the paper's top 5%, the
retrieval set at the requested size and a heads.json's own `selected` list, whatever the size
asked for: excluding only the top set at the requested size let "non-retrieval" heads drawn at
fraction 0.02 include the paper's top 5%.

One knob: `heads.fraction` (or `heads.count`) is also what the detect stage writes as heads.json
`selected` and boxes in its heatmap, so the figure marks exactly what gets masked. Left at null
(the default) it means the paper's 5% at detection, and a given heads.json's own `selected`
list when masking: a file listing 2 heads masks those 2 (bottom/random sets take its size).
Asking for a fraction or count explicitly re-ranks the file's scores at that size.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from attninf.config import ConfigError, check

log = logging.getLogger(__name__)

Head = tuple[int, int]
SETS = ("retrieval", "random", "bottom", "list", "none")
DEFAULT_FRACTION = 0.05  # paper: top 5% of layer x head
MASK_MODES = ("uniform", "zero")


@dataclass
class HeadsConfig:
    """The `heads` config group (conf/heads/*.yaml)."""

    set: str = "retrieval"
    fraction: float | None = None  # null = paper 5% at detection / a heads.json's own `selected`
    count: int | None = None  # overrides fraction
    exclude_retrieval: bool = True  # random: draw only among non-retrieval heads (paper Table 6)
    seed: int = 0  # random sets
    file: str | None = None  # a detect/heads.json (or a JSON list of [layer, head]) to use instead of this run's detect
    list: Any = None  # explicit [[layer, head], ...] for set=list
    mode: str = "uniform"  # masking: uniform = causal running mean of values (paper), zero = output 0

    def validate(self) -> None:
        check(self.set in SETS, "set", f"'{self.set}' is not one of {list(SETS)}")
        check(self.fraction is None or 0.0 < self.fraction <= 1.0, "fraction",
              f"{self.fraction} is outside (0, 1]")
        check(self.count is None or self.count >= 1, "count", f"{self.count} must be >= 1 (or null)")
        check(self.mode in MASK_MODES, "mode", f"'{self.mode}' is not one of {list(MASK_MODES)}")
        if self.list is not None:
            check(self.set == "list", "list", f"a head list is given but heads.set={self.set}; "
                                              "set heads.set=list to use it")
            parse_head_list(self.list, "heads.list")
        if self.set == "list":
            check(self.list is not None or self.file is not None, "list",
                  "heads.set=list needs heads.list=[[layer,head],...] or heads.file=PATH")

    @property
    def size_fraction(self) -> float:
        """The fraction detection selects at (null = the paper's 5%)."""
        return DEFAULT_FRACTION if self.fraction is None else self.fraction

    @property
    def explicit_size(self) -> bool:
        return self.fraction is not None or self.count is not None


def needs_scores(set_: str, exclude_retrieval: bool = True) -> bool:
    """Whether head set `set_` is chosen by retrieval score (retrieval, bottom, and random heads
    that must avoid the retrieval heads, paper Table 6)."""
    return set_ in ("retrieval", "bottom") or (set_ == "random" and bool(exclude_retrieval))


def needs_detection(heads: Any) -> bool:
    """Whether a stage masking the `heads` section's set needs this run's detect output.

    The one statement of the rule: the stage registry (attninf/stages.py) declares the detect
    dependency with it and heads_json_for_stage reads heads.json by it. A head file or an explicit
    list replaces detection; otherwise the set needs detection when it is chosen by score.
    Takes the raw section (a DictConfig or dict) so the registry need not build the config.
    """
    heads = heads or {}
    if heads.get("file") or heads.get("list"):
        return False
    return needs_scores(heads.get("set", "retrieval"), heads.get("exclude_retrieval", True))


def parse_head_list(obj: Any, where: str) -> list[Head]:
    """[[l, h], ...] (lists, tuples or "l,h"/"l:h" strings) -> list of int tuples; clear errors."""
    if not isinstance(obj, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of [layer, head] pairs, got {type(obj).__name__}")
    out: list[Head] = []
    for i, item in enumerate(obj):
        if isinstance(item, str):
            item = item.replace(":", ",").split(",")
        try:
            l, h = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}[{i}]: {item!r} is not a [layer, head] pair") from None
        out.append((l, h))
    if len(set(out)) != len(out):
        dup = sorted({x for x in out if out.count(x) > 1})
        raise ConfigError(f"{where}: duplicate heads {dup}")
    return out


def head_geometry(model) -> tuple[int, int, int]:
    """(layers, attention heads, key/value heads) of a transformers model, from its config."""
    c = model.config
    return c.num_hidden_layers, c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads


def check_heads(heads: Sequence[Head], n_layers: int, n_heads: int, where: str) -> None:
    """Every head inside the model, or a ConfigError naming the first one that is not."""
    for l, h in heads:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise ConfigError(f"{where}: head [{l}, {h}] is outside the model "
                              f"({n_layers} layers x {n_heads} heads, zero-based)")


def n_selected(fraction: float, total: int, count: int | None = None) -> int:
    if count is not None:
        return min(count, total)
    return max(1, min(total, int(fraction * total + 0.5)))


TIE_DECIMALS = 12  # scores equal to 12 decimals are ties (means over probes differ in the last bits)


def _tie_key(s: float) -> float:
    return round(float(s), TIE_DECIMALS)


def rank_heads(scores: Sequence[Sequence[float]], descending: bool = True, seed: int = 0) -> list[Head]:
    """All heads ordered by score (best first unless descending=False); ties in a seeded random
    order (one uniform draw per head from random.Random, so the order is a pure function of the
    scores and the seed)."""
    rng = random.Random(f"head-ties:{int(seed)}")
    flat = [(_tie_key(s), rng.random(), l, h) for l, row in enumerate(scores) for h, s in enumerate(row)]
    flat.sort(key=lambda x: ((-x[0]) if descending else x[0], x[1]))
    return [(l, h) for _, _, l, h in flat]


def tie_at_cut(scores: Sequence[Sequence[float]], ranking: Sequence[Head], n: int) -> dict | None:
    """The block of tied scores a cut of `ranking` after n heads falls inside, or None.

    {"score", "size" (heads in the block), "drawn" (of them inside the cut), "layers" [min, max],
    "heads" (the first 8 of the block)}."""
    if not (0 < n < len(ranking)):
        return None
    key = lambda hd: _tie_key(scores[hd[0]][hd[1]])  # noqa: E731
    if key(ranking[n - 1]) != key(ranking[n]):
        return None
    v = key(ranking[n - 1])
    block = [hd for hd in ranking if key(hd) == v]
    drawn = sum(1 for hd in ranking[:n] if key(hd) == v)
    layers = [l for l, _ in block]
    return {"score": v, "size": len(block), "drawn": drawn, "layers": [min(layers), max(layers)],
            "heads": [list(h) for h in sorted(block)[:8]]}


def warn_tie(what: str, tie: dict | None, n: int, seed: int) -> None:
    """One warning naming the tied block a cut fell inside (no-op without a tie)."""
    if tie is None:
        return
    log.warning("heads: the %s cut at %d heads falls inside a block of %d heads tied at score %.6g "
                "(layers %d-%d, e.g. %s); %d of them were drawn at random (heads.seed=%d)",
                what, n, tie["size"], tie["score"], tie["layers"][0], tie["layers"][1],
                " ".join(f"({l},{h})" for l, h in tie["heads"][:4]), tie["drawn"], seed)


def ranked_cut(scores: Sequence[Sequence[float]], n: int, descending: bool, seed: int, what: str) -> list[Head]:
    """The first n heads of the seeded ranking, warning when the cut splits a tie."""
    ranking = rank_heads(scores, descending, seed)
    warn_tie(what, tie_at_cut(scores, ranking, n), n, seed)
    return ranking[:n]


def load_heads_json(path: str | Path) -> dict:
    """A detect/heads.json, or a JSON file holding just a list of heads (wrapped as `selected`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"heads.file: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"heads.file: {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(data, list):
        return {"selected": [list(h) for h in parse_head_list(data, str(path))], "scores": None}
    if not isinstance(data, dict) or "selected" not in data:
        raise ConfigError(f"heads.file: {path} has no 'selected' field (expected detect/heads.json)")
    parse_head_list(data["selected"], f"{path}: selected")
    scores = data.get("scores")
    if scores is not None:
        if (not isinstance(scores, list) or not scores or not all(isinstance(r, list) for r in scores)
                or len({len(r) for r in scores}) != 1):
            raise ConfigError(f"{path}: 'scores' must be a [n_layers][n_heads] list of floats")
    return data


def _check_geometry(heads_json: dict, n_layers: int, n_heads: int, where: str) -> None:
    scores = heads_json.get("scores")
    if scores is not None and (len(scores) != n_layers or len(scores[0]) != n_heads):
        raise ConfigError(
            f"{where}: scores are for {len(scores)} layers x {len(scores[0])} heads "
            f"(model {heads_json.get('model')}), but this model has {n_layers} x {n_heads}")


def resolve_heads(cfg: HeadsConfig, heads_json: dict | None, n_layers: int, n_heads: int,
                  where: str = "heads") -> list[Head]:
    """The head set `cfg` names, for a model of n_layers x n_heads query heads.

    heads_json: the detection result (or heads.file) when the set needs scores
    (retrieval, bottom, random with exclude_retrieval); None otherwise.
    """
    total = n_layers * n_heads
    n = n_selected(cfg.size_fraction, total, cfg.count)
    if heads_json is not None:
        _check_geometry(heads_json, n_layers, n_heads, where)
        if not cfg.explicit_size and heads_json.get("selected"):
            n = len(heads_json["selected"])  # the file's own set decides the size
    if cfg.set == "none":
        return []
    if cfg.set == "list":
        if cfg.list is not None:
            heads = parse_head_list(cfg.list, "heads.list")
        elif heads_json is not None:
            heads = parse_head_list(heads_json["selected"], "heads.file: selected")
        else:
            raise ConfigError("heads.set=list needs heads.list or heads.file")
        check_heads(heads, n_layers, n_heads, "heads.list" if cfg.list is not None else "heads.file")
        return heads
    if needs_scores(cfg.set, cfg.exclude_retrieval):
        if heads_json is None:
            need = ("heads.set=random with heads.exclude_retrieval=true" if cfg.set == "random"
                    else f"heads.set={cfg.set}")
            raise ConfigError(f"{need} needs retrieval scores: run the detect stage in this run_dir "
                              "or give heads.file=PATH/heads.json"
                              + (" (or set heads.exclude_retrieval=false)" if cfg.set == "random" else ""))
    if cfg.set == "retrieval":
        retrieval = _retrieval(heads_json, n, cfg.explicit_size, cfg.seed)
        check_heads(retrieval, n_layers, n_heads, where)
        return retrieval
    if cfg.set == "bottom":
        if heads_json.get("scores") is None:
            raise ConfigError("heads.set=bottom needs a heads.json with 'scores' (a plain list has none)")
        return ranked_cut(heads_json["scores"], n, False, cfg.seed, "bottom")
    # random
    excluded: set[Head] = set()
    if cfg.exclude_retrieval:
        excluded = set(exclusion_set(heads_json, n, cfg.explicit_size, cfg.seed, n_layers * n_heads))
    return random_heads(n, excluded, n_layers, n_heads, cfg.seed)


def random_heads(n: int, avoid: set[Head], n_layers: int, n_heads: int, seed: int) -> list[Head]:
    """n seeded random heads outside `avoid`."""
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in avoid]
    if n > len(pool):
        raise ConfigError(f"heads: {n} random heads requested but only {len(pool)} heads lie "
                          f"outside the {len(avoid)} excluded ones")
    return random.Random(seed).sample(pool, n)


def retrieval_set(cfg: HeadsConfig, heads_json: dict | None, n_layers: int, n_heads: int) -> list[Head]:
    """The retrieval heads a random control must avoid (empty without a detection): the paper's
    top 5%, the retrieval set at the requested size and the file's own `selected` (exclusion_set)."""
    if heads_json is None:
        return []
    n = n_selected(cfg.size_fraction, n_layers * n_heads, cfg.count)
    if not cfg.explicit_size and heads_json.get("selected"):
        n = len(heads_json["selected"])
    return exclusion_set(heads_json, n, cfg.explicit_size, cfg.seed, n_layers * n_heads)


def exclusion_set(heads_json: dict, n: int, rerank: bool, seed: int, total: int) -> list[Head]:
    """Union of the top max(5%, n) heads by score, the retrieval set of size n and the file's
    `selected` list, in that order without repeats. The paper's 5% whatever n: at fraction 0.02
    the top 5% must stay out of the "non-retrieval" heads too."""
    out: list[Head] = []
    if heads_json.get("scores") is not None:
        k = max(n_selected(DEFAULT_FRACTION, total), n)
        out += ranked_cut(heads_json["scores"], k, True, seed, "retrieval-exclusion")
    out += _retrieval(heads_json, n, rerank, seed)
    if heads_json.get("selected"):
        out += [tuple(h) for h in parse_head_list(heads_json["selected"], "heads.file: selected")]  # type: ignore[misc]
    seen: set[Head] = set()
    return [h for h in out if not (h in seen or seen.add(h))]  # type: ignore[func-returns-value]


def describe(cfg: HeadsConfig, heads: Sequence[Head]) -> str:
    """A row label that names the head set actually masked (Table 6 rows), e.g.
    "14 bottom heads (lowest retrieval score)"."""
    names = {"retrieval": "retrieval heads (top retrieval score)",
             "bottom": "bottom heads (lowest retrieval score)",
             "random": "random heads" + (" (non-retrieval)" if cfg.exclude_retrieval else ""),
             "list": "listed heads" + (f" ({Path(cfg.file).name})" if cfg.file else ""),
             "none": "heads"}
    return f"{len(heads)} {names[cfg.set]}"


def _retrieval(heads_json: dict, n: int, rerank: bool = True, seed: int = 0) -> list[Head]:
    """The file's own `selected` list unless a size was asked for explicitly (rerank), then the
    top-n by score; a plain list file (no scores) is always used as given."""
    if rerank and heads_json.get("scores") is not None:
        return ranked_cut(heads_json["scores"], n, True, seed, "retrieval")
    return [tuple(h) for h in parse_head_list(heads_json["selected"], "heads.file: selected")]  # type: ignore[misc]


def heads_json_for_stage(ctx, cfg: HeadsConfig) -> tuple[dict | None, str | None]:
    """(heads_json, where it came from): heads.file, else this run's detect output when present."""
    if cfg.file:
        return load_heads_json(cfg.file), str(cfg.file)
    if not needs_detection({"set": cfg.set, "exclude_retrieval": cfg.exclude_retrieval}):
        return None, None
    from attninf.context import MissingInput

    try:
        folder = ctx.upstream("detect")
    except MissingInput:
        if cfg.set == "random":
            raise ConfigError("heads.set=random with heads.exclude_retrieval=true needs this run's "
                              "detect output (add detect to stages) or heads.file=PATH/heads.json; "
                              "or set heads.exclude_retrieval=false") from None
        raise
    path = Path(folder) / "heads.json"
    return load_heads_json(path), str(path)


def heads_for_stage(ctx, model) -> list[Head]:
    """The head set of `ctx.cfg.heads` for `model` (a stage's one-liner)."""
    from attninf.config import build

    cfg = build(HeadsConfig, ctx.cfg.get("heads"), "heads")
    n_layers, n_heads, _ = head_geometry(model)
    heads_json, _ = heads_json_for_stage(ctx, cfg)
    return resolve_heads(cfg, heads_json, n_layers, n_heads)
