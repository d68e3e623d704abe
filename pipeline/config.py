"""Config: one options dataclass per stage (declared in the stage module) + `run`, loaded from YAML and
`--set a.b=c` overrides. Unknown or ill-typed keys, values outside an option's choices and options that
disagree with the key they restate fail fast, naming the key. The stage registry is passed in: the
spine never imports stages/."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage
from pipeline.options import ConfigError, RunConfig, check_choices, field_meta

__all__ = ["Config", "describe", "load_config", "load_config_dict", "load_section"]
Registry = Mapping[str, type]  # stage name → Stage class (with its `Config` options dataclass)


@dataclass
class Config:
    run: RunConfig
    stages: dict[str, Any]
    registry: Registry = field(default_factory=dict, repr=False, compare=False)

    def stage(self, name: str) -> Any:
        return self.stages[name]

    def as_dict(self) -> dict[str, Any]:
        out = {"run": dataclasses.asdict(self.run)}
        out.update({n: dataclasses.asdict(c) for n, c in self.stages.items()})
        return out


def load_config(registry: Registry, path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path}: top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return load_config_dict(registry, raw)


def load_config_dict(registry: Registry, raw: dict[str, Any]) -> Config:
    sections = {"run": RunConfig, **{name: cls.Config for name, cls in registry.items()}}
    for name in raw:
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}'{_hint(name, sections)}")
    built = {name: _build(name, cls, raw.get(name) or {}) for name, cls in sections.items()}
    run = built.pop("run")
    _check_roots(run)
    storage.configure(run.storage_options)
    _check_restated(built)
    return Config(run=run, stages=built, registry=dict(registry))


def load_section(name: str, cls: type, raw: dict[str, Any]) -> tuple[RunConfig, Any]:
    """`run` and one stage's options from a config dict: what a worker needs to build its stage."""
    run = _build("run", RunConfig, raw.get("run") or {})
    storage.configure(run.storage_options)
    return run, _build(name, cls, raw.get(name) or {})


def _check_roots(run: RunConfig) -> None:
    if run.media_cache_gb <= 0:
        raise ConfigError(f"config key 'run.media_cache_gb' must be > 0, got {run.media_cache_gb!r}")


def _check_restated(sections: dict[str, Any]) -> None:
    """An option that restates another section's key (`same_as`) must hold the same value."""
    for section, options in sections.items():
        for f in dataclasses.fields(options):
            other = field_meta(type(options), f.name).get("same_as")
            if not other:
                continue
            other_section, other_key = other.split(".", 1)
            if other_section not in sections:
                continue
            mine, theirs = getattr(options, f.name), getattr(sections[other_section], other_key)
            if mine != theirs:
                raise ConfigError(
                    f"config key '{section}.{f.name}' is {mine!r} but '{other}' is {theirs!r}: they "
                    f"describe the same thing; set both (e.g. --set {section}.{f.name}={theirs!r})"
                )


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set expects section.key=value, got '{item}'")
    dotted, value = item.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    sect = raw.setdefault(section, {})
    if not isinstance(sect, dict):
        raise ConfigError(f"config section '{section}' must be a mapping")
    sect[key] = parsed


def _hint(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build(section: str, cls: type, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{section}.{key}'{_hint(key, fields)}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    options = cls(**kwargs)
    check_choices(section, options)
    return options



def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{name}': bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key '{name}' must be a mapping of names to values, got {value!r}")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{name}' must be a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", item_type, v) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(f"config key '{name}': unsupported type {hint}")
    raise ConfigError(
        f"config key '{name}' must be {getattr(hint, '__name__', hint)}, got {value!r}"
    )


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of each option, for --help."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        type_name = str(hints[f.name]).replace("typing.", "")
        type_name = getattr(hints[f.name], "__name__", type_name)
        rows.append((f.name, type_name, default, field_meta(cls, f.name).get("help", "")))
    return rows
