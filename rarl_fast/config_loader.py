"""YAML files and command-line overrides into the config tree, and back.

:func:`load_config` reads a YAML file (safe loader), applies ``key.sub=value`` overrides on top, and builds the
dataclass tree of :mod:`rarl_fast.config`, checking every value against its field's annotation; a problem raises
one :class:`~rarl_fast.config.ConfigError` naming the key and where its value came from (the file, or the
override). :func:`dump_config` writes a config back as YAML that loads to an equal config.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rarl_fast.config import Config, ConfigError

__all__ = ["config_from_dict", "config_to_dict", "dump_config", "load_config", "overlay_config", "parse_override"]


_FLOAT_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and minimally converted) against the annotation ``tp``; raises ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping (section), got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, args[0], f"{key} (key {k!r})"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `1e-6` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(key, f"unsupported annotation {tp!r}")  # a bug in this module, not in the user's file


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = [n for n in names if n.lower() == str(k).lower() or n.startswith(str(k)[:3])]
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(names)}"
            raise ConfigError(key, f"unknown key{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise (err.under(prefix) if prefix else err) from None


def config_from_dict(values: dict[str, Any], cls: type = Config) -> Any:
    """Build ``cls`` (default :class:`Config`) from a nested dict; strict about keys, types and bounds."""
    if not isinstance(values, dict):
        raise ConfigError("", f"the top level must be a mapping, got {type(values).__name__}")
    return _build(cls, values, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (lists for tuples) that ``config_from_dict`` turns back into an equal config."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = config_to_dict(v)
        elif isinstance(v, tuple | list):
            v = list(v)
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"'{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (``key.sub``, value parsed as YAML: numbers, true/false, null, lists, mappings)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(key or text, f"override {text!r} is not of the form key.sub=value", "command line")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML; None = all defaults), apply ``key.sub=value`` overrides, validate.

    Any problem raises one :class:`ConfigError` naming the key and the file (or the override) it came from.
    """
    tree: dict[str, Any] = {}
    source_of: dict[str, str] = {}
    file_label = str(path) if path is not None else "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("", f"config file not found: {p}", file_label)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError("", f"not valid YAML: {err}", file_label) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("", f"the top level must be a mapping, got {type(loaded).__name__}", file_label)
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        try:
            _set_dotted(tree, key, value)
        except ConfigError as err:
            raise ConfigError(err.key, err.problem, f"command-line override {text!r}") from None
        source_of[key] = f"command-line override {text!r}"
    try:
        return config_from_dict(tree)
    except ConfigError as err:
        raise ConfigError(err.key, err.problem, _source(err.key, source_of, file_label)) from None


def _overlay_leaves(node: Any, values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) per leaf of ``values``: a mapping under a section of ``node`` is walked into, any other
    value (a dict-valued field such as ``group_mix`` too) replaces the field whole, as an override does."""
    out: list[tuple[str, Any]] = []
    for k, v in values.items():
        child = getattr(node, str(k), None) if node is not None else None
        key = f"{prefix}{k}"
        if isinstance(v, dict) and dataclasses.is_dataclass(child):
            out += _overlay_leaves(child, v, key + ".")
        else:
            out.append((key, v))
    return out


def overlay_config(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """``cfg`` with the nested mapping ``values`` laid over it (sections merge, fields are replaced), validated;
    a problem raises one :class:`ConfigError` naming the key and ``source`` (the overlay's file)."""
    if not isinstance(values, dict):
        raise ConfigError("", f"an overlay must be a mapping, got {type(values).__name__}", source)
    tree = config_to_dict(cfg)
    try:
        for key, value in _overlay_leaves(cfg, values):
            _set_dotted(tree, key, value)
        return config_from_dict(tree)
    except ConfigError as err:
        raise ConfigError(err.key, err.problem, source) from None


def _source(key: str, source_of: dict[str, str], file_label: str) -> str:
    """The override that set ``key`` (or a section above it), else the file."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        hit = source_of.get(".".join(parts[:i]))
        if hit:
            return hit
    for k, src in source_of.items():  # an override below the key (a field of the failing section)
        if k.startswith(key + "."):
            return src
    return file_label


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """YAML text of ``cfg`` (written to ``path`` when given); loading it gives an equal config."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
