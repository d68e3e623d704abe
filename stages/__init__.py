"""Stage registry, in pipeline order. Stage modules import their heavy dependencies lazily."""

from __future__ import annotations

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

__all__ = ["STAGES"]
