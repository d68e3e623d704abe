"""Config: one dataclass per stage (declared in the stage module) + `run`, loaded from YAML and
`--set a.b=c` overrides. Unknown or ill-typed keys fail fast, naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (shown by `discomv <stage> --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class RunConfig:
    manifest_root: str = option("manifests", "where stage manifests (Parquet part files) go")
    media_root: str = option("media", "where downloaded and derived media go")
    shard_root: str = option("shards", "where WebDataset shards go")
    models_root: str = option("models", "local weights folder (also $DISCOMV_MODELS)")
    weights: str = option(
        "pretrained",
        "pretrained: real weights (local folder, cache, or download) | "
        "random: same architectures randomly initialised, outputs stamped weights=random-init",
    )
    flush_rows: int = option(16, "results appended to the manifest every N rows (durability unit)")
    retry_failed: bool = option(False, "also redo rows whose last status is failed")
    num_cpus: int | None = option(None, "CPUs for the embedded Ray (None = all)")


@dataclass
class Config:
    run: RunConfig
    stages: dict[str, Any]

    def stage(self, name: str) -> Any:
        return self.stages[name]

    def as_dict(self) -> dict[str, Any]:
        out = {"run": dataclasses.asdict(self.run)}
        out.update({n: dataclasses.asdict(c) for n, c in self.stages.items()})
        return out


def _sections() -> dict[str, type]:
    from stages import STAGES

    return {"run": RunConfig, **{name: cls.Config for name, cls in STAGES.items()}}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
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
    return load_config_dict(raw)


def load_config_dict(raw: dict[str, Any]) -> Config:
    sections = _sections()
    for name in raw:
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}'{_hint(name, sections)}")
    built = {name: _build(name, cls, raw.get(name) or {}) for name, cls in sections.items()}
    run = built.pop("run")
    return Config(run=run, stages=built)


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
    return cls(**kwargs)


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
        rows.append((f.name, type_name, default, f.metadata.get("help", "")))
    return rows
