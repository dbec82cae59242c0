"""Config dataclasses -> one command line, with ``--config FILE.yaml`` and flag overrides.

Each concern is a dataclass (``ModelConfig``, ``DataConfig``, ``TrainConfig``, ``OutputConfig``,
...) and owns one YAML section, named after it (``ModelConfig`` -> ``model:``). A job composes
several; their field names become flat flags named as in the original sentiment-discovery tool
(``--rnn_size``, ``--batch_size``). Precedence: dataclass default < YAML file < command line.
A key in the wrong section, an unknown section or an unknown key is an error naming the file,
the section and the key; so are a key repeated within one mapping, a section that is not a
mapping (a section whose keys are all commented out, ``model:``, is empty), and a value of the
wrong YAML type (``true`` for a number, a list or mapping for a string; a field marked
``comma``, such as ``label_key``, takes a YAML list and joins it with commas). Fields marked
``path`` expand environment variables (``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``~``; an unset
one is an error naming the key); ``$SENTDISC_DATA`` defaults to ``default_data_dir()``.
A parser's ``prog`` is the command typed (``sentdisc pretrain``); a recipe may reword a flag's
help or refuse a flag it does not use (``build_parser``).
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


def _coerce(value: Any, tp, name: str, source: str, comma: bool = False) -> Any:
    """A YAML or command-line value as the field's type, or a ValueError naming ``source``
    and ``name``. YAML's own types are held to the field: a boolean is no number, a list or a
    mapping no string, except that a comma-list field (metadata ``comma``) takes a YAML list
    of scalars and joins it with commas."""
    base = _base_type(tp)
    if value is None:
        if type(None) in typing.get_args(tp):
            return None
        # `max_iters:` with nothing after it reads as null in YAML
        raise ValueError(f"{source}: {name} must be {getattr(base, '__name__', base)}, "
                         "got an empty value")
    if base in (int, float) and isinstance(value, bool):
        raise ValueError(f"{source}: {name} must be {base.__name__}, got the boolean {value}")
    if base is str and isinstance(value, (list, tuple)) and comma:
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{source}: {name} must be a list of names, got {value!r}")
        value = ",".join(str(v) for v in value)
    if base is str and isinstance(value, (list, tuple, dict)):
        kind = "a mapping" if isinstance(value, dict) else "a list"
        raise ValueError(f"{source}: {name} must be str, got {kind} {value!r}")
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


def build_parser(description: str, *classes, defaults: dict | None = None,
                 helps: dict | None = None, refused: dict | None = None,
                 prog: str | None = None) -> argparse.ArgumentParser:
    """One flag per dataclass field. A recipe may reword a field's help (``helps``: {name:
    text}) and refuse fields it does not use (``refused``: {name: what it uses instead}): such a
    flag is left out of ``--help``, and ``parse`` stops on it, from the command line or YAML,
    rather than ignore it. ``prog``: the command in usage lines and errors (``sentdisc
    pretrain``; default: the script's name)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.refused = dict(refused or {})
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
            helptext = (helps or {}).get(f.name, f.metadata.get("help", ""))
            shown = argparse.SUPPRESS if f.name in parser.refused else \
                f"{helptext} (default {default})"
            if _base_type(hints[f.name]) is bool:
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=shown)
            else:
                group.add_argument(f"--{f.name}", type=str, default=argparse.SUPPRESS,
                                   metavar=_base_type(hints[f.name]).__name__.upper(),
                                   help=shown)
    return parser


class _RepeatedKey(yaml.YAMLError):
    def __init__(self, key, line: int):
        super().__init__(f"key {key!r} repeated at line {line}")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated within one mapping is an error (PyYAML
    keeps the last silently, so the first value would be ignored without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _RepeatedKey(key, key_node.start_mark.line + 1)
                    seen.add(key)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    pass
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, classes: Sequence[type]) -> dict:
    """A YAML file -> {flag: value}. Sections must hold only their own dataclass's keys;
    top-level keys may name any field (a flat file)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
    except _RepeatedKey as e:
        raise ValueError(f"{p}: line {e.line}: key {e.key!r} appears twice in one mapping "
                         f"(keep one)") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    owner = {f.name: section_name(cls) for cls in classes for f in dataclasses.fields(cls)}
    sections = {section_name(cls) for cls in classes}
    flat: dict = {}
    for key, value in data.items():
        if key in sections and value is None:  # `model:` with every key commented out
            continue
        if key in sections and key not in owner and not isinstance(value, dict):
            raise ValueError(f"{p}: section {key!r} must be a mapping of option: value, got "
                             f"{type(value).__name__} {value!r}")
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
            value = _coerce(values[f.name], hints[f.name], f.name, source,
                            comma=f.metadata.get("comma", False))
            try:
                kwargs[f.name] = expand(value) if f.metadata.get("path") and value else value
            except ValueError as e:  # an unset ${VAR}: say where it was written
                raise ValueError(f"{source}: {f.name}: {e}") from None
        out.append(cls(**kwargs))
    return tuple(out)


def parse(classes: Sequence[type], argv: Sequence[str] | None = None, description: str = "",
          parser: argparse.ArgumentParser | None = None, defaults: dict | None = None,
          helps: dict | None = None, refused: dict | None = None,
          prog: str | None = None) -> tuple:
    """Command line -> one instance per dataclass in ``classes``. ``defaults`` (a recipe's
    own, e.g. fine-tuning's TrainConfig) sit between the dataclasses' and the YAML file's;
    ``helps``, ``refused`` and ``prog`` are ``build_parser``'s."""
    parser = parser or build_parser(description, *classes, defaults=defaults, helps=helps,
                                    refused=refused, prog=prog)
    refused = {**getattr(parser, "refused", {}), **(refused or {})}
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        yaml_values = load_yaml(args.config, classes) if args.config else {}
        values = {**(defaults or {}), **yaml_values}
        source = f"config {args.config}" if args.config else "config"
        cli = {k: v for k, v in vars(args).items() if k != "config"}
        for name, why in refused.items():
            if name in cli or name in yaml_values:
                where = f"--{name}" if name in cli else f"{source}: {name}"
                raise ValueError(f"{where}: {parser.prog} does not use it: {why}")
        build(classes, values, source)  # report a bad file value against the file
        return build(classes, {**values, **cli}, "command line")
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
