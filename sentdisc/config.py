"""Config dataclasses -> one command line, with ``--config FILE.yaml`` and flag overrides.

Each concern (model, data, training, transfer, ...) is a dataclass. A job composes several;
their field names become flat flags named as in the original sentiment-discovery tool
(``--rnn_size``, ``--batch_size``). Precedence: dataclass default < YAML file < command line.
A YAML file may be flat or grouped by section; unknown keys are an error naming the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml


def _base_type(tp):
    """Optional[int] -> int, list[str] -> list; other types unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return origin or tp


def _coerce(value: Any, tp, name: str, source: str) -> Any:
    base = _base_type(tp)
    if value is None:
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            (inner,) = typing.get_args(tp) or (str,)
            return [_coerce(v, inner, name, source) for v in value]
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if base in (int, float, str):
            return base(value)
        return value
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {name} must be {getattr(base, '__name__', base)}, got {value!r}") from None


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def build_parser(description: str, *classes) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML file of defaults")
    seen: dict[str, str] = {}
    for cls in classes:
        group = parser.add_argument_group(cls.__name__)
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise TypeError(f"flag --{f.name} defined by both {seen[f.name]} and {cls.__name__}")
            seen[f.name] = cls.__name__
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            helptext = f.metadata.get("help", "")
            if _base_type(hints[f.name]) is bool:
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=f"{helptext} (default {default})")
            else:
                group.add_argument(f"--{f.name}", type=str, default=argparse.SUPPRESS,
                                   metavar=_base_type(hints[f.name]).__name__.upper(),
                                   help=f"{helptext} (default {default})")
    return parser


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    flat: dict = {}
    for k, v in data.items():
        if isinstance(v, dict):  # grouped by section (model:, data:, train:)
            flat.update(v)
        else:
            flat[k] = v
    return flat


def build(classes: Sequence[type], values: dict, source: str = "config") -> tuple:
    """Instantiate each dataclass from a flat dict; unknown keys are an error."""
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}")
    out = []
    for cls in classes:
        hints = _hints(cls)
        kwargs = {f.name: _coerce(values[f.name], hints[f.name], f.name, source)
                  for f in dataclasses.fields(cls) if f.name in values}
        out.append(cls(**kwargs))
    return tuple(out)


def parse(classes: Sequence[type], argv: Sequence[str] | None = None, description: str = "",
          parser: argparse.ArgumentParser | None = None) -> tuple:
    """Command line -> one instance per dataclass in ``classes``."""
    parser = parser or build_parser(description, *classes)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    values = load_yaml(args.config) if args.config else {}
    source = f"config {args.config}" if args.config else "config"
    try:
        build(classes, values, source)  # report a bad file value against the file
        cli = {k: v for k, v in vars(args).items() if k != "config"}
        merged = {**values, **cli}
        return build(classes, merged, "command line")
    except ValueError as e:
        parser.error(str(e))


def to_flat_dict(*configs) -> dict:
    out = {}
    for c in configs:
        out.update(dataclasses.asdict(c))
    return out
