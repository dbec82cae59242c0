"""Config dataclasses -> one command line, with ``--config FILE.yaml`` and flag overrides.

Each concern is a dataclass (``ModelConfig``, ``DataConfig``, ``TrainConfig``, ``OutputConfig``,
...) and owns one YAML section, named after it (``ModelConfig`` -> ``model:``). A job composes
several; their field names become flat flags named as in the original sentiment-discovery tool
(``--rnn_size``, ``--batch_size``). Precedence: dataclass default < YAML file < command line.
A key in the wrong section, an unknown section or an unknown key is an error naming the file,
the section and the key. Fields marked ``path`` expand environment variables (``$VAR``,
``${VAR}``, ``${VAR:-default}``, ``~``); ``$SENTDISC_DATA`` defaults to ``default_data_dir()``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sentdisc.errors import InputError

REPO = Path(__file__).resolve().parents[1]
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


# --- the output config every job shares --------------------------------------------------------

@dataclass
class OutputConfig:
    experiment_dir: str = field(default="experiments", metadata={
        "help": "root of all outputs: a folder or a storage URI", "path": True})
    experiment_name: str = field(default="default", metadata={
        "help": "this experiment's folder under experiment_dir; rerunning a pretraining "
                "name resumes it"})

    @property
    def run_dir(self) -> str:
        """experiment_dir/experiment_name (a URI stays a URI); the name must be a plain folder
        name, so no run can write outside experiment_dir."""
        name = plain_name(self.experiment_name, "experiment_name")
        return f"{self.experiment_dir.rstrip('/')}/{name}"


def plain_name(name: str, flag: str) -> str:
    """``name`` if it is a plain folder name (so nothing named by a flag writes outside the
    folder it is meant for), else an InputError naming ``--flag``."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise InputError(f"--{flag} must be a plain folder name, got {name!r}")
    return name


# --- paths and environment ---------------------------------------------------------------------

def default_data_dir() -> Path:
    """$SENTDISC_DATA, else ../shared/data beside the working directory or this checkout."""
    if os.environ.get("SENTDISC_DATA"):
        return Path(os.environ["SENTDISC_DATA"])
    candidates = [Path.cwd().parent / "shared" / "data", REPO.parent / "shared" / "data"]
    return next((p for p in candidates if p.is_dir()), candidates[-1]).resolve()


def expand(value: str) -> str:
    """Environment variables and ``~`` in a path; SENTDISC_DATA falls back to default_data_dir()."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1) or m.group(3), m.group(2)
        if os.environ.get(name):
            return os.environ[name]
        if default is not None:
            return default
        if name == "SENTDISC_DATA":
            return str(default_data_dir())
        raise ValueError(f"{value!r}: environment variable {name} is not set")

    return os.path.expanduser(_VAR.sub(sub, value)) if value else value


# --- dataclasses <-> flags and YAML --------------------------------------------------------------

def section_name(cls) -> str:
    """The YAML section a dataclass owns: ModelConfig -> model, TrainConfig -> train."""
    name = cls.__name__
    return (name[:-len("Config")] if name.endswith("Config") and name != "Config" else name).lower()


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
        if type(None) in typing.get_args(tp):
            return None
        # `max_iters:` with nothing after it reads as null in YAML
        raise ValueError(f"{source}: {name} must be {getattr(base, '__name__', base)}, "
                         "got an empty value")
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
        raise ValueError(f"{source}: {name} must be {getattr(base, '__name__', base)}, "
                         f"got {value!r}") from None


def build_parser(description: str, *classes, defaults: dict | None = None
                 ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML file of defaults")
    seen: dict[str, str] = {}
    for cls in classes:
        group = parser.add_argument_group(f"{cls.__name__} (YAML section {section_name(cls)}:)")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise TypeError(f"flag --{f.name} defined by both {seen[f.name]} and {cls.__name__}")
            seen[f.name] = cls.__name__
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            default = (defaults or {}).get(f.name, default)
            helptext = f.metadata.get("help", "")
            if _base_type(hints[f.name]) is bool:
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=f"{helptext} (default {default})")
            else:
                group.add_argument(f"--{f.name}", type=str, default=argparse.SUPPRESS,
                                   metavar=_base_type(hints[f.name]).__name__.upper(),
                                   help=f"{helptext} (default {default})")
    return parser


def load_yaml(path: str | Path, classes: Sequence[type]) -> dict:
    """A YAML file -> {flag: value}. Sections must hold only their own dataclass's keys;
    top-level keys may name any field (a flat file)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    owner = {f.name: section_name(cls) for cls in classes for f in dataclasses.fields(cls)}
    sections = {section_name(cls) for cls in classes}
    flat: dict = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            flat[key] = value
            continue
        if key not in sections:
            raise ValueError(f"{p}: unknown section {key!r} (this command reads "
                             f"{', '.join(sorted(sections))})")
        for name, v in value.items():
            if owner.get(name) != key:
                where = f"it belongs in section {owner[name]!r}" if name in owner else "no such option"
                raise ValueError(f"{p}: section {key!r} has no key {name!r} ({where})")
            flat[name] = v
    return flat


def build(classes: Sequence[type], values: dict, source: str = "config") -> tuple:
    """Instantiate each dataclass from a flat dict; unknown keys are an error; path fields
    are expanded."""
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}")
    out = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value = _coerce(values[f.name], hints[f.name], f.name, source)
            kwargs[f.name] = expand(value) if f.metadata.get("path") and value else value
        out.append(cls(**kwargs))
    return tuple(out)


def parse(classes: Sequence[type], argv: Sequence[str] | None = None, description: str = "",
          parser: argparse.ArgumentParser | None = None, defaults: dict | None = None) -> tuple:
    """Command line -> one instance per dataclass in ``classes``. ``defaults`` (a recipe's
    own, e.g. fine-tuning's TrainConfig) sit between the dataclasses' and the YAML file's."""
    parser = parser or build_parser(description, *classes, defaults=defaults)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        values = {**(defaults or {}), **(load_yaml(args.config, classes) if args.config else {})}
        source = f"config {args.config}" if args.config else "config"
        build(classes, values, source)  # report a bad file value against the file
        cli = {k: v for k, v in vars(args).items() if k != "config"}
        return build(classes, {**values, **cli}, "command line")
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
