"""Bounded disk for a streaming run: the media a stage made for later stages (Stage.media: a
video's download, its stems) are removed as soon as the row that last needs them is recorded, and
the removal is recorded in the `media` manifest (key = video key: what was removed, how many bytes,
why), so audit and lineage still say where every file went.

A video's media go when its journey in this run is final: dropped at any stage (no later stage
reads it), or every clip of it sharded or dropped when the run ends with the shards stage. Failed
rows keep their media (a retry reads them), as do the kinds `run.keep_media` names. A video whose
clips entered the run one by one (a re-run after a kill mid-video) keeps its media: this run cannot
see all its clips.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.manifest import ManifestStore, full_schema
from pipeline.stage import DROPPED, OK, Row

log = logging.getLogger("discomv")
SWEEP_SECONDS = 2.0
MEDIA_STAGE = "media"
SCHEMA = full_schema(pa.schema([("removed", pa.list_(pa.string())), ("removed_bytes", pa.int64()),
                                ("removed_kinds", pa.list_(pa.string()))]))


@dataclass
class _Video:
    seen: int = 0
    final: bool = True
    paths: dict[str, str] = field(default_factory=dict)  # path → kind


class MediaJanitor:
    def __init__(self, media: dict[str, str], keep: list[str], final_stage: str | None, store: ManifestStore,
                 recorded: Callable[[], Any]) -> None:
        """media: column → kind over the run's stages; final_stage: the stage after which a clip's
        sources are no longer needed (None: the run stops before it, so only drops free media);
        recorded(): makes every result taken so far durable (the recorder's flush)."""
        self.media = {column: kind for column, kind in media.items() if kind not in keep}
        self.final_stage, self.store, self.recorded = final_stage, store, recorded
        self.videos: dict[str, _Video] = {}
        self.queued: list[tuple[str, dict[str, str], str]] = []  # (video key, path → kind, why)
        self.last_sweep = time.monotonic()
        self.removed_bytes = 0

    def see(self, row: Row) -> None:
        """A row leaving the stream (any status)."""
        if not self.media:
            return
        if "_siblings" not in row:  # left before the fan-out, or entered after it
            if row["_status"] == DROPPED and "video_key" not in row:
                self.queued.append((row["key"], self._paths(row), f"dropped at {row['_stage']}"))
            return
        video = self.videos.setdefault(row["video_key"], _Video())
        video.seen += 1
        video.final &= row["_status"] == DROPPED or (row["_status"] == OK and row["_stage"] == self.final_stage)
        video.paths.update(self._paths(row))
        if video.seen == row["_siblings"]:
            del self.videos[row["video_key"]]
            if video.final:
                why = f"dropped at {row['_stage']}" if row["_status"] == DROPPED and row["_siblings"] == 1 else "sharded"
                self.queued.append((row["video_key"], video.paths, why))

    def _paths(self, row: Row) -> dict[str, str]:
        return {row[c]: kind for c, kind in self.media.items() if row.get(c)}

    def sweep(self, force: bool = False) -> None:
        """Every SWEEP_SECONDS (or now): make the rows seen durable, then remove their media and
        record what went."""
        if not self.queued or not (force or time.monotonic() - self.last_sweep > SWEEP_SECONDS):
            return
        self.recorded()
        queued, self.queued, self.last_sweep = self.queued, [], time.monotonic()
        now = datetime.now(timezone.utc)
        rows, doomed = [], []
        for key, paths, why in queued:
            sizes = {path: _size(path) for path in paths}
            present = [path for path, size in sizes.items() if size is not None]
            if present:
                rows.append({"key": key, "status": OK, "reason": why, "removed": present,
                             "removed_bytes": sum(sizes[p] for p in present),
                             "removed_kinds": sorted({paths[p] for p in present}), "finished_at": now})
                doomed += present
        # recorded first: a kill in between leaves a file the manifest calls removed, never a
        # missing file the manifests still point to
        self.store.append(MEDIA_STAGE, SCHEMA, rows)
        for path in doomed:
            try:
                Path(path).unlink()
            except FileNotFoundError:
                continue
            except OSError as e:  # kept, and said: the run goes on
                log.warning("media: could not remove %s: %s", path, e)
        self.removed_bytes += sum(r["removed_bytes"] for r in rows)


def _size(path: str) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:
        return None
