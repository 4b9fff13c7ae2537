"""Typed run configs: plain YAML + ``key=value`` overrides, validated before any Ray work starts.

Every job declares one pydantic model. Field docstrings are the documentation: they feed ``--help``
and the error messages, so a config knob is described exactly once.
"""

from __future__ import annotations

import sys
import textwrap
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from recfound.io import exists, expand

C = TypeVar("C", bound="Config")
T = TypeVar("T")
OVERRIDES = "command line"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and where it came from."""


class Config(BaseModel):
    """Base of every typed config: unknown keys are errors, field docstrings are the docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def comma_list(value: Any) -> Any:
    """A list key as the command line gives it: ``a,b``, ``[a,b]`` (YAML's flow form, as overrides take) or
    ``--key a,b --key c`` -> ``[a, b, c]``, parts stripped and empty ones dropped. Anything else (a YAML list of
    numbers, None) passes on to the field's own validation."""
    parts = [value] if isinstance(value, str) else value
    if isinstance(parts, list) and all(isinstance(v, str) for v in parts):
        flat = (part.strip()[1:-1] if part.strip()[:1] + part.strip()[-1:] == "[]" else part for part in parts)
        return [v.strip() for part in flat for v in part.split(",") if v.strip()]
    return value


CommaList = Annotated[list[T], BeforeValidator(comma_list)]
"""A list key that also takes the command line's forms (``comma_list``): ``CommaList[str]``, ``CommaList[int]``."""


def _must_exist(url: str) -> str:
    if not exists(url):
        raise ValueError(f"no such file or directory: {url}")
    return url


InputURL = Annotated[str, AfterValidator(_must_exist)]
"""A local path or fsspec URL that must exist when the config is validated."""


def _must_name_files(spec: str) -> str:
    expand(spec)  # raises NoInputFiles (a ValueError) naming the part that matches nothing
    return spec


InputFiles = Annotated[str, AfterValidator(_must_name_files)]
"""One or more input files: a path or fsspec URL, a directory, a glob, or a comma list of these
(``recfound.io.expand``), each part naming at least one file when the config is validated. The config keeps the
spec as given; the files it names are listed where they are read (a build's manifest)."""


def _parse_value(raw: str) -> Any:
    # Scalars stay strings so pydantic coerces them to the declared type ("007" stays a str field's "007").
    if raw.strip()[:1] in "[{":
        return yaml.safe_load(raw)
    if raw in ("null", "None", "~"):
        return None
    return raw


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` items into a nested dict (in place) and return it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{OVERRIDES}: expected key=value, got {item!r}")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{OVERRIDES}: {key}: {part} is not a section")
            node = child
        node[leaf] = _parse_value(raw)
    return tree


def _read_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(tree).__name__}")
    return tree


def _source(loc: str, overrides: list[str], path: str | None) -> str:
    keys = {item.partition("=")[0] for item in overrides}
    if any(loc == key or loc.startswith(key + ".") or key.startswith(loc + ".") for key in keys):
        return OVERRIDES
    return path or "defaults"


def load_config(cls: type[C], path: str | None = None, overrides: list[str] | None = None) -> C:
    """Validate YAML at ``path`` (optional) plus overrides into ``cls``; raise ConfigError naming each bad key."""
    overrides = overrides or []
    tree = apply_overrides(_read_yaml(path) if path else {}, overrides)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "<root>"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"{_source(loc, overrides, path)}: {loc}: {msg}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "|".join(str(m.value) for m in annotation)
    if isinstance(annotation, type):
        return annotation.__name__
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    return str(annotation).replace("typing.", "")


def describe(cls: type[Config], prefix: str = "", values: Config | None = None) -> list[str]:
    """One help entry per leaf key, recursing into sub-configs, from the field docstrings.

    ``values`` (a loaded config) shows a job's effective defaults, e.g. those of its default YAML.
    """
    lines: list[str] = []
    for name, field in cls.model_fields.items():
        key = prefix + name
        annotation = field.annotation
        current = getattr(values, name) if values is not None else None
        if isinstance(annotation, type) and issubclass(annotation, Config):
            lines.extend(describe(annotation, key + ".", current))
            continue
        if values is None and field.is_required():
            default = "required"
        else:
            value = current if values is not None else field.get_default(call_default_factory=True)
            default = f"default: {value.value if isinstance(value, Enum) else value!r}"
        lines.append(f"  {key} ({_type_name(annotation)}; {default})")
        doc = field.description or ""
        lines.extend(textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      "))
    return lines


def cli(cls: type[C], argv: list[str] | None, usage: str, default_config: str | None = None) -> C:
    """Parse ``[--config FILE] key=value ...`` for a job; ``--help`` prints usage plus every key's doc.

    ``default_config`` is the YAML used when no ``--config`` is given (a job's embedded default run).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(textwrap.dedent(usage).strip() + "\n\nKeys (set in --config YAML or as key=value):")
        print("\n".join(describe(cls, values=load_config(cls, default_config) if default_config else None)))
        raise SystemExit(0)
    path = default_config
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit("--config needs a file")
        path = argv[i + 1]
        del argv[i : i + 2]
    try:
        return load_config(cls, path, argv)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
