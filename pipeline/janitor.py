"""Bounded disk for a streaming run: the media a stage made for later stages (Stage.media: a
video's download, its stems) are removed as soon as the last stage reading them (Stage.reads_media)
has recorded the video's rows, and the removal is recorded in the `media` manifest (key = video
key: what was removed, how many bytes, why), so audit and lineage still say where every file went.

A video's media go when its journey past that stage is final: dropped at any stage, or every clip
of it recorded ok there, when the run goes on to the shards stage (which reads clip artifacts, not
media). Failed rows keep their media (a retry reads them), as do the kinds `run.keep_media` names. A
video whose clips entered the run one by one (a re-run after a kill mid-video) keeps its media:
this run cannot see all its clips. Paths are local paths or, with `run.media_root` on a bucket, object
URIs: both are sized and removed through pipeline/storage.py.

The janitor also holds the run's media window: the stage that makes media (download) admits a
video only while fewer than `window` videos are past it and not yet through the last reader
(`admit`), so the media on disk follow the window, not the corpus. Nothing here imports Ray: the
manifest recorder actor (pipeline/recorder.py) hosts it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.manifest import ManifestStore, full_schema
from pipeline.stage import DROPPED, OK, Row

log = logging.getLogger("discomv")
MEDIA_STAGE = "media"
# A full window that frees nothing for this long admits one video more (and says so): a stall
# the window's sizing did not foresee slows the run instead of hanging it.
STALL_SECONDS = 300.0
SCHEMA = full_schema(pa.schema([("removed", pa.list_(pa.string())), ("removed_bytes", pa.int64()),
                                ("removed_kinds", pa.list_(pa.string()))]))
# The fields of a row the janitor reads (what the last media reader sends it)
SEEN_FIELDS = ("key", "video_key", "_status", "_stage", "_siblings")


@dataclass
class _Video:
    seen: int = 0
    final: bool = True
    paths: dict[str, str] = field(default_factory=dict)  # path → kind


class MediaJanitor:
    def __init__(self, media: dict[str, str], keep: list[str], final_stage: str | None, store: ManifestStore,
                 recorded: Callable[[], Any], window: int | None = None) -> None:
        """media: column → kind over the run's stages; final_stage: the last stage reading media, when
        no later stage of any run needs them (None: only drops free media); recorded(): makes every
        result taken so far durable (the recorder's flush); window: most videos admitted and not yet
        through final_stage (None: no limit)."""
        self.media = {column: kind for column, kind in media.items() if kind not in keep}
        self.final_stage, self.store, self.recorded = final_stage, store, recorded
        self.window = window
        self.videos: dict[str, _Video] = {}
        self.queued: list[tuple[str, dict[str, str], str]] = []  # (video key, path → kind, why)
        self.held: set[str] = set()  # videos admitted and not yet through
        self.peak_held = 0
        self.last_release = time.monotonic()
        self.removed_bytes = 0
        self.stalls = 0

    # ------------------------------------------------------------------ the window
    def admit(self, keys: list[str]) -> list[str]:
        """Of these videos, the ones that may start now (one already admitted is admitted again:
        a batch retried after a worker died does not take a second place)."""
        granted = [key for key in keys if key in self.held]
        for key in keys:
            if key in self.held:
                continue
            if self.window is not None and len(self.held) >= self.window and not self._stalled():
                break
            self.held.add(key)
            granted.append(key)
        self.peak_held = max(self.peak_held, len(self.held))
        return granted

    def release(self, key: str) -> None:
        if key in self.held:
            self.held.discard(key)
            self.last_release = time.monotonic()

    def _stalled(self) -> bool:
        if time.monotonic() - self.last_release < STALL_SECONDS:
            return False
        self.stalls += 1
        self.last_release = time.monotonic()
        log.warning("media window: %d videos in flight and none through %s for %.0f s: admitting one more "
                    "(raise run.media_window if this repeats)", len(self.held), self.final_stage, STALL_SECONDS)
        return True

    # ------------------------------------------------------------------ the media
    def see(self, row: Row) -> None:
        """A row through the last stage reading media (any status)."""
        if "_siblings" not in row:  # left before the fan-out, or entered after it
            if row["_status"] == DROPPED and "video_key" not in row and self.media:
                self.queued.append((row["key"], self._paths(row), f"dropped at {row['_stage']}"))
            else:
                self.release(row["key"])
            return
        video = self.videos.setdefault(row["video_key"], _Video())
        video.seen += 1
        video.final &= row["_status"] == DROPPED or (row["_status"] == OK and row["_stage"] == self.final_stage)
        video.paths.update(self._paths(row))
        if video.seen == row["_siblings"]:
            del self.videos[row["video_key"]]
            if video.final and self.media:
                why = f"dropped at {row['_stage']}" if row["_status"] == DROPPED and row["_siblings"] == 1 else "sharded"
                self.queued.append((row["video_key"], video.paths, why))
            else:
                self.release(row["video_key"])

    def _paths(self, row: Row) -> dict[str, str]:
        return {row[c]: kind for c, kind in self.media.items() if row.get(c)}

    def sweep(self) -> None:
        """Make the rows seen durable, then remove their media, record what went and free their
        places in the window."""
        if not self.queued:
            return
        self.recorded()
        queued, self.queued = self.queued, []
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
                storage.remove_file(path)  # a local path, or an object's URI (media_root on a bucket)
            except OSError as e:  # kept, and said: the run goes on
                log.warning("media: could not remove %s: %s", path, e)
        self.removed_bytes += sum(r["removed_bytes"] for r in rows)
        for key, _, _ in queued:
            self.release(key)


def _size(path: str) -> int | None:
    try:
        return storage.file_size(path)
    except OSError:
        return None
