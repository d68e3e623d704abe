"""Stage registry, in pipeline order. Stage modules import their heavy dependencies lazily."""

from __future__ import annotations

from pipeline.stage import Stage
from stages.download import Download
from stages.ingest import Ingest

STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (Ingest, Download)}

__all__ = ["STAGES"]
