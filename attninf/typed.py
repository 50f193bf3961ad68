"""Config sections as typed dataclasses, built and validated once, before the first stage.

Hydra composes a loose DictConfig; `typed_sections` turns every section a registered stage owns
into its dataclass (attninf/config.py's `build`: unknown keys, types and ranges fail with the
dotted key), including `arms` (attninf/arms.py). The executors hand the result to the stages
(`StageContext.config(section)`), so a stage never re-reads its section raw.

A config class may list `OPERATIONAL` keys (dotted, relative to its section): settings that
change how a stage runs, never what it computes (save and eval intervals, exit_after_steps, the
launch layout). `identity` drops them from the section before it is hashed into the stage key,
so changing one mid-run resumes from the checkpoints instead of starting over.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from attninf.config import ConfigError, build, to_plain
from attninf.stages import STAGES

# Config section -> its typed dataclass: all are validated before the first stage runs, whichever
# stages are selected (an out-of-range value must not surface hours into a run).
SECTION_CONFIGS = {
    "model": "selection.models:ModelConfig", "detect": "selection.detect:DetectConfig",
    "heads": "selection.heads:HeadsConfig", "mirror": "selection.mirror:MirrorConfig",
    "corpus": "selection.corpora:CorpusConfig", "score": "selection.score:ScoreConfig",
    "select": "selection.select:SelectConfig", "mix": "pretrain.mix:MixConfig",
    "tokenizer": "pretrain.mix:TokenizerConfig", "pretrain": "pretrain.train:PretrainConfig",
    "eval": "eval.config:EvalConfig", "report": "eval.report:ReportConfig",
}

# Inputs a later command supplies: required only when a selected stage reads the section.
_DEFERRED = ("corpus.paths", "corpus.sources", "corpus.domain_field")


def _cls(section: str):
    mod, _, cls = SECTION_CONFIGS[section].partition(":")
    return getattr(importlib.import_module(mod), cls)


def operational(section: str) -> tuple[str, ...]:
    if section not in SECTION_CONFIGS:
        return ()
    return tuple(getattr(_cls(section), "OPERATIONAL", ()))


def identity(section: str, plain: Any) -> Any:
    """The section as it enters a stage key: without its operational keys."""
    drop = operational(section)
    if not drop or not isinstance(plain, dict):
        return plain
    out = json.loads(json.dumps(plain))
    for dotted in drop:
        node, *path, last = [out, *dotted.split(".")]
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def typed_sections(cfg: DictConfig, names: list[str] | None = None) -> dict[str, Any]:
    """Build every present section whose owner is a registered (real) stage; ConfigError names the key.

    Ranges, types and unknown keys are checked in every section whichever stages run; inputs
    (corpus files) only where a selected stage reads them. Returns {section: typed object}.
    """
    from attninf.arms import load_arms

    stand_ins = {sec for spec in STAGES.values() if spec.target.startswith("tests.")
                 for sec in spec.sections}  # test doubles own their (free-form) sections
    real = {sec for spec in STAGES.values() for sec in spec.sections} - stand_ins
    out: dict[str, Any] = {}
    for sec in SECTION_CONFIGS:
        if sec not in real or cfg.get(sec) is None:
            continue
        used = names is None or any(sec in STAGES[n].sections for n in names)
        try:
            obj = build(_cls(sec), cfg.get(sec), sec)
        except ConfigError as e:
            if used or not str(e).startswith(_DEFERRED):
                raise
            continue
        out[sec] = obj
        if sec == "heads" and getattr(obj, "list", None) is not None:
            _check_heads_geometry(obj.list, cfg.get("model"))
        if sec == "corpus" and used and obj.kind != "hf":  # paths that must exist, before any compute
            from selection.corpora import CorpusError, local_files

            try:
                local_files(obj)
            except CorpusError as e:
                raise ConfigError(f"corpus.paths: {e}") from None
    if "arms" in real and cfg.get("arms") is not None:
        select = out.get("select")
        out["arms"] = load_arms(cfg.get("arms"), getattr(select, "methods", None))
    return out


def _check_heads_geometry(heads, model_cfg) -> None:
    """heads.list against the model's layers x heads, when its config.json is readable locally."""
    from selection.heads import check_heads, parse_head_list

    path = Path(os.path.expanduser(str((model_cfg or {}).get("path") or ""))) / "config.json"
    try:
        mc = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # hub id or alias: checked when the model loads
    n_l, n_h = mc.get("num_hidden_layers"), mc.get("num_attention_heads")
    if not (n_l and n_h):
        return
    check_heads(parse_head_list(to_plain(heads), "heads.list"), n_l, n_h, "heads.list")
