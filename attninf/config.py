"""Typed stage configs, validated at the edge.

Hydra composes a loose DictConfig; each stage turns its section into a dataclass here, so an
unknown key, a wrong type or an out-of-range value fails before any model is loaded, with the
dotted key in the message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, mistyped or out of range; the message names the key."""


def to_plain(node: Any) -> Any:
    """DictConfig/ListConfig (resolved) -> plain python containers; anything else unchanged."""
    if isinstance(node, (DictConfig,)) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build(cls: type[T], node: Any, where: str) -> T:
    """Build dataclass `cls` from a config section, rejecting unknown keys and bad types.

    `where` is the section's dotted name (e.g. "detect") and prefixes every error message.
    Nested sections (a field whose default is another config dataclass, e.g. pretrain.optim,
    eval.humaneval) go through the same path: their unknown keys are rejected by their dotted
    name, and after construction every `validate()` runs, innermost first, its message prefixed
    with the full dotted key. A dataclass's validate() checks only its own fields.
    """
    data = to_plain(node) if node is not None else {}
    _check_keys(cls, data, where)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # type mismatch etc.
        raise ConfigError(f"{where}: {e.msg if hasattr(e, 'msg') else e}") from None
    _validate(obj, where)
    return obj  # type: ignore[return-value]


def _nested(f: dataclasses.Field) -> type | None:
    """The config dataclass of a nested section (a field built by default_factory=SomeConfig)."""
    fac = f.default_factory
    return fac if isinstance(fac, type) and dataclasses.is_dataclass(fac) else None


def _check_keys(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
            f"known: {', '.join(sorted(fields))}"
        )
    for name, f in fields.items():
        sub = _nested(f)
        if sub is not None and data.get(name) is not None:
            _check_keys(sub, data[name], f"{where}.{name}")


def _validate(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _nested(f) is not None and dataclasses.is_dataclass(value):
            _validate(value, f"{where}.{f.name}")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{where}.{e}") from None


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError("key: msg") unless cond; used inside dataclass validate() methods."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def digest(obj: Any, n: int = 16) -> str:
    """Stable short hash of a JSON-able object (config sections, manifests)."""
    blob = json.dumps(to_plain(obj), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def asdict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
