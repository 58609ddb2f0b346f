"""YAML files and command-line overrides into the config tree, and back.

:func:`load_config` reads a YAML file, applies ``key.sub=value`` overrides on top, and builds the dataclass tree of
:mod:`rarl_fast.config`, checking every value against its field's annotation; a problem raises one
:class:`~rarl_fast.config.ConfigError` naming the key and where its value came from (the file, or the override),
with a bounded repr of the value. :func:`dump_config` writes a config back as YAML that loads to an equal config.

The YAML reader is PyYAML's safe loader with two changes: only ``true``/``false`` are booleans (YAML 1.2), so
``check_images: off`` is the string ``off`` (boolean fields accept ``yes``/``no``/``on``/``off`` as well), and
aliases that would expand the document by more than :data:`MAX_ALIAS_EXPANSION` nodes are refused before
anything is built (a few hundred bytes of nested aliases can stand for billions of values).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rarl_fast.config import Config, ConfigError

__all__ = [
    "MAX_ALIAS_EXPANSION",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "overlay_config",
    "parse_override",
    "short_repr",
]


_FLOAT_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
INT_MAX = 2**63 - 1
"""Largest magnitude of any integer field: torch and numpy take integers as int64."""
MAX_ALIAS_EXPANSION = 10_000
"""Nodes that YAML aliases may add to a document when expanded (a config has a few hundred in all)."""

_BOUNDED = reprlib.Repr()
_BOUNDED.maxlevel, _BOUNDED.maxstring, _BOUNDED.maxother, _BOUNDED.maxlong = 3, 80, 80, 40
_BOUNDED.maxlist = _BOUNDED.maxtuple = _BOUNDED.maxdict = _BOUNDED.maxset = 6


def short_repr(value: Any) -> str:
    """A repr of ``value`` that stays short however large (or deeply shared) the value is."""
    return _BOUNDED.repr(value)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: ``on``/``off``/``yes``/``no`` stay strings."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _expansion(node: yaml.Node, memo: dict[int, int], active: set[int], budget: list[int]) -> int:
    """Nodes of ``node`` with every alias expanded, counted without expanding: each distinct node once, plus what
    each repeated visit (an alias) adds, taken from ``budget``; raises ValueError past the budget or on a cycle."""
    key = id(node)
    if key in memo:
        budget[0] -= memo[key]
        if budget[0] < 0:
            raise ValueError(f"its aliases expand to more than {MAX_ALIAS_EXPANSION} extra nodes")
        return memo[key]
    if key in active:
        raise ValueError("an alias refers to a node that contains it (a recursive structure)")
    active.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    size = 1 + sum(_expansion(child, memo, active, budget) for child in children)
    active.discard(key)
    memo[key] = size
    return size


def _load_yaml(text: str) -> Any:
    """``text`` parsed by :class:`_Loader`; raises ``yaml.YAMLError`` on a syntax error and ValueError when its
    aliases expand past :data:`MAX_ALIAS_EXPANSION` or it nests too deeply."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expansion(node, {}, set(), [MAX_ALIAS_EXPANSION])
        return loader.construct_document(node)
    except RecursionError:
        raise ValueError("it nests too deeply") from None
    finally:
        loader.dispose()


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
        raise ConfigError(key, f"expected {_type_name(tp)}, got {short_repr(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {short_repr(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping (section), got {type(value).__name__} {short_repr(value)}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {short_repr(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {short_repr(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {short_repr(value)}")
        return {
            _coerce(k, args[0], f"{key} (key {short_repr(k)})"): _coerce(v, args[1], f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {type(value).__name__} {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {type(value).__name__} {short_repr(value)}")
        if abs(value) > INT_MAX:
            raise ConfigError(key, f"must be within +-{INT_MAX} (int64), got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `1e-6` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {type(value).__name__} {short_repr(value)}")
        if not math.isfinite(value):
            raise ConfigError(key, f"must be finite, got {short_repr(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a string, got {str(value).lower()}: quote it if you mean the word")
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__} {short_repr(value)}")
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
            raise ConfigError(key[:100], f"unknown key{hint}")
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
    """``key.sub=value`` -> (``key.sub``, value parsed as YAML: numbers, true/false, null, lists, mappings); a value
    that is not valid YAML is taken as the string it is."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError("", f"not of the form key.sub=value: {short_repr(text)}", "command-line override")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except ValueError as err:  # an alias bomb or absurd nesting: refused, not taken as a string
        raise ConfigError(key, f"refused: {err}", f"command-line override {short_repr(text)}") from None
    return key, value


def _read_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; problems with the file as a whole raise ConfigError naming it."""
    p, label = Path(path), str(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("", "config file not found", label) from None
    except IsADirectoryError:
        raise ConfigError("", "is a folder, not a config file", label) from None
    except OSError as err:
        raise ConfigError("", f"cannot read the config file: {err.strerror}", label) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError("", f"not UTF-8 text (byte 0x{data[err.start]:02x} on line {line})", label) from None
    try:
        loaded = _load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError("", f"not valid YAML: {err}", label) from None
    except ValueError as err:
        raise ConfigError("", f"refused: {err}", label) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError("", f"the top level must be a mapping, got {type(loaded).__name__}", label)
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML; None = all defaults), apply ``key.sub=value`` overrides, validate.

    Any problem raises one :class:`ConfigError` naming the key and the file (or the override) it came from.
    """
    base = _read_file(path) if path is not None else {}
    file_label = str(path) if path is not None else "defaults"
    tree = copy.deepcopy(base)
    parsed: list[tuple[str, str, Any]] = []
    for text in overrides:
        key, value = parse_override(text)
        try:
            _set_dotted(tree, key, value)
        except ConfigError as err:
            raise ConfigError(err.key, err.problem, f"command-line override {short_repr(text)}") from None
        parsed.append((text, key, value))
    try:
        return config_from_dict(tree)
    except ConfigError as err:
        raise ConfigError(err.key, err.problem, _blame(err, base, parsed, file_label)) from None


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


def _blame(err: ConfigError, base: dict[str, Any], parsed: list[tuple[str, str, Any]], file_label: str) -> str:
    """Where the value behind ``err`` came from: the override that set its key (or a section above or below it);
    else the first override after which the config fails with this same error; else the file."""
    field = re.match(r"[A-Za-z0-9_.]*", err.key).group(0).rstrip(".")  # without `[i]` or ` (key k)` parts
    parts = field.split(".")
    for i in range(len(parts), 0, -1):
        hits = [text for text, key, _ in parsed if key == ".".join(parts[:i])]
        if hits:
            return f"command-line override {short_repr(hits[-1])}"
    below = [text for text, key, _ in parsed if field and key.startswith(field + ".")]
    if below:
        return f"command-line override {short_repr(below[-1])}"
    if not parsed:
        return file_label
    tree = copy.deepcopy(base)
    for k in range(len(parsed) + 1):  # k overrides applied: does the same error appear already?
        if k:
            _set_dotted(tree, parsed[k - 1][1], parsed[k - 1][2])
        try:
            config_from_dict(copy.deepcopy(tree))
        except ConfigError as again:
            if (again.key, again.problem) == (err.key, err.problem):
                return file_label if k == 0 else f"command-line override {short_repr(parsed[k - 1][0])}"
    return f"{file_label} with the command-line overrides"


def config_diff(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every field that differs between two configs."""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: dict[str, Any], b: dict[str, Any], prefix: str) -> None:
        for k in a:
            key = f"{prefix}{k}"
            if isinstance(a[k], dict) and isinstance(b[k], dict) and dataclasses.is_dataclass(_field_type(key)):
                walk(a[k], b[k], key + ".")
            elif a[k] != b[k]:
                out.append((key, a[k], b[k]))

    walk(config_to_dict(old), config_to_dict(new), "")
    return out


def _field_type(dotted: str) -> Any:
    """The annotation of the config field at ``dotted`` (a section's dataclass, or a value's type)."""
    tp: Any = Config
    for name in dotted.split("."):
        tp = typing.get_type_hints(tp)[name]
    return tp


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """YAML text of ``cfg`` (written to ``path`` when given); loading it gives an equal config."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
