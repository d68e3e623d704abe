"""The manifest recorder of a streaming run: every stage's results go through it into that stage's
manifest (pipeline/manifest.py), so workers on any node never write manifests and the driver never
holds them.

One Ray actor per run (pipeline/stream.py makes it; nothing here imports Ray). A worker hands it a
batch of results and waits only until they are taken (in memory); they are appended as part files
every `flush_rows` rows per stage or FLUSH_SECONDS, by a thread, in pipeline order: a row recorded
at a stage is therefore never on disk before its row at an upstream stage. A kill loses what was
taken but not yet appended (seconds of work), which a re-run redoes.

It also hosts the run's MediaJanitor (pipeline/janitor.py): the last stage reading media shows it the
rows it passes on (`see`), the stage making media asks it for places in the window (`admit`), and the
flush thread removes the media no later stage needs right after the rows that free them are written.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime
from typing import Any

import pyarrow as pa

from pipeline.janitor import MediaJanitor
from pipeline.manifest import ManifestStore
from pipeline.runner import RunSummary

log = logging.getLogger("discomv")
FLUSH_SECONDS = 3.0


class ManifestRecorder:
    def __init__(self, root: str, schemas: list[tuple[str, bytes]], flush_rows: int,
                 flush_seconds: float = FLUSH_SECONDS, janitor: dict[str, Any] | None = None) -> None:
        """janitor: MediaJanitor's arguments (media, keep, final_stage, window), or None."""
        self.store = ManifestStore(root)
        self.schemas = {name: pa.ipc.read_schema(pa.py_buffer(blob)) for name, blob in schemas}
        self.order = [name for name, _ in schemas]
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.buffers: dict[str, list[dict[str, Any]]] = {name: [] for name in self.order}
        self.stats = {name: RunSummary(stage=name) for name in self.order}
        self.taking = threading.Lock()  # held while buffers are swapped
        self.writing = threading.Lock()  # one flush at a time
        self.error: str | None = None
        self.stopped, self.wake = threading.Event(), threading.Event()
        self.janitor = MediaJanitor(store=self.store, recorded=self.flush, **(janitor or {"media": {}, "keep": [],
                                                                                   "final_stage": None}))
        self.tidying = threading.Lock()  # the janitor's state: actor calls and the flush thread
        self.waiting = False  # the window turned a video away since the last sweep
        threading.Thread(target=self._flush_every, daemon=True).start()

    def add(self, stage: str, results_json: str) -> int:
        """Take a batch of one stage's results (JSON: the workers' records); returns how many."""
        if self.error:
            raise RuntimeError(f"the manifest recorder could not write: {self.error}")
        results = json.loads(results_json)
        for result in results:
            result["finished_at"] = datetime.fromisoformat(result["finished_at"])
        with self.taking:
            self.buffers[stage].extend(results)
            self.stats[stage].count(results)
            full = len(self.buffers[stage]) >= self.flush_rows
        if full:
            self.wake.set()  # the thread writes it: the worker is not kept waiting on the disk
        return len(results)

    def flush(self) -> int:
        """Append everything taken so far, stage by stage in pipeline order; returns the rows written."""
        with self.writing:
            with self.taking:
                taken, self.buffers = self.buffers, {name: [] for name in self.order}
            written = 0
            for name in self.order:
                if taken[name]:
                    try:
                        self.store.append(name, self.schemas[name], taken[name])
                    except Exception as e:  # the disk is full or gone: stop the run, say where
                        self.error = f"{self.store.stage_dir(name)}: {e}"
                        raise
                    written += len(taken[name])
            return written

    def see(self, rows_json: str) -> None:
        """Rows through the last stage reading media (janitor.SEEN_FIELDS and the media columns)."""
        with self.tidying:
            for row in json.loads(rows_json):
                self.janitor.see(row)
            if self.waiting and self.janitor.queued:
                self.wake.set()  # a download waits for the place these rows free

    def admit(self, keys: list[str]) -> list[str]:
        """Of these videos, the ones that may be downloaded now (the media window)."""
        with self.tidying:
            granted = self.janitor.admit(keys)
            self.waiting = len(granted) < len(keys)
            return granted

    def release(self, keys: list[str]) -> None:
        """Videos admitted that left the stream without a result (a download budget spent)."""
        with self.tidying:
            for key in keys:
                self.janitor.release(key)

    def media(self) -> dict[str, Any]:
        """What the janitor did: bytes removed, most videos in flight at once, window stalls."""
        with self.tidying:
            j = self.janitor
            return {"removed_bytes": j.removed_bytes, "peak_held": j.peak_held, "window": j.window,
                    "stalls": j.stalls}

    def _flush_every(self) -> None:
        while not self.stopped.is_set():
            self.wake.wait(self.flush_seconds)
            self.wake.clear()
            try:
                self.flush()
                self._sweep()
            except Exception:
                log.exception("manifest recorder: flush failed")

    def _sweep(self) -> None:
        with self.tidying:
            self.janitor.sweep()

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per stage, what was taken so far: statuses, reason classes, busy seconds."""
        with self.taking:
            return {name: {"statuses": dict(c.statuses), "reasons": dict(c.reasons), "busy_s": c.busy_s}
                    for name, c in self.stats.items()}

    def close(self) -> int:
        """Stop the thread, write everything taken, then remove the media it frees."""
        self.stopped.set()
        written = self.flush()
        self._sweep()
        return written
