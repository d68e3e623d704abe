"""Stage registry, in pipeline order, and the config loaders bound to it. Stage modules import their
heavy dependencies lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import config as _config
from pipeline.stage import Stage
from stages.beats import Beats
from stages.clips import Clips
from stages.download import Download
from stages.features import Features
from stages.filter import Filter
from stages.ingest import Ingest
from stages.separate import Separate
from stages.shards import Shards
from stages.tokens import Tokens

PIPELINE = (Ingest, Download, Filter, Separate, Clips, Beats, Tokens, Features, Shards)
STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in PIPELINE}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> _config.Config:
    """The run's config over this registry: YAML file + `section.key=value` overrides."""
    return _config.load_config(STAGES, path, overrides)


def load_config_dict(raw: dict[str, Any]) -> _config.Config:
    return _config.load_config_dict(STAGES, raw)


__all__ = ["PIPELINE", "STAGES", "load_config", "load_config_dict"]
