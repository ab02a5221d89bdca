"""Config files: YAML or JSON read into the same dataclasses the CLI flags are generated from.

Keys mirror the dataclass fields (nested dataclasses are nested mappings). Every value is checked against the field's
type: unknown keys, wrong types and invalid choices are one-line errors naming the key, what it must be and, for a
misspelt key, the closest valid one. A single value is accepted where a tuple of values is expected (a one-member
sweep axis), as on the command line. Omitted keys keep their defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from sae_kit.errors import SaeKitError

T = TypeVar("T")


class ConfigFileError(SaeKitError):
    """A config file is unreadable, or a key or value in it does not fit the dataclass."""


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a .yaml/.yml/.json file (errors do not repeat the path; `load_config` adds it)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigFileError("use a .yaml, .yml or .json config file")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigFileError("no such file") from None
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigFileError(
            f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {' '.join(str(err).split())}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"the file must hold a mapping of settings, not a {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    """An instance of dataclass `cls` from the file at `path` (ConfigFileError on any mismatch)."""
    try:
        return build(cls, read_mapping(path))
    except ConfigFileError as err:
        raise ConfigFileError(f"{path}: {err}") from None


def build(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """An instance of dataclass `cls` from a mapping, every value checked against its field's type."""
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"{where.rstrip('.') or 'the file'} must be a mapping of {cls.__name__} settings, got {data!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]  # cls is a dataclass
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{where}{close[0]}'? " if close else ""
            raise ConfigFileError(f"unknown key '{where}{key}'; {hint}valid keys: {', '.join(fields)}")
    values = {key: _value(hints[key], value, f"{where}{key}") for key, value in data.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigFileError(f"missing required key {', '.join(repr(where + m) for m in missing)}")
    try:
        return cls(**values)
    except SaeKitError as err:
        raise ConfigFileError(str(err)) from None


def _value(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build(tp, value, f"{key}.")
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _value(option, value, key)
            except ConfigFileError:
                continue
        raise ConfigFileError(f"{key} must be {_describe(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in args:
            return value
        raise ConfigFileError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
    elif origin is tuple:
        items = value if isinstance(value, list) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], v, key) for v in items)
        if len(items) == len(args):
            return tuple(_value(a, v, key) for a, v in zip(args, items))
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is Path:
        if isinstance(value, str):
            return Path(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp in (int, bool, str):
        if type(value) is tp:
            return value
    elif tp is Any:
        return value
    raise ConfigFileError(f"{key} must be {_describe(tp)}, got {value!r}")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return (
            f"a list of {_describe(args[0])}"
            if len(args) == 2 and args[1] is Ellipsis
            else f"a list of {len(args)} values"
        )
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if tp is type(None):
        return "null"
    if tp is Path:
        return "a path"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def to_jsonable(obj: Any) -> Any:
    """`dataclasses.asdict` output made JSON-friendly: Paths become strings, tuples lists."""
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj
