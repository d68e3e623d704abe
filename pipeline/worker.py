"""What runs inside Ray: a stage's worker (one result per row, whatever the stage does), its
prepare step as a CPU task, and the wire format rows cross in (JSON for plain fields, .npz for arrays;
never pickle)."""

from __future__ import annotations

import io
import json
import logging
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from pipeline.config import load_section
from pipeline.stage import STATUSES, Result, Row, Stage

log = logging.getLogger("discomv")


def build_stage(stage_cls: type[Stage], name: str, config_json: str) -> Stage:
    run, options = load_section(name, stage_cls.Config, json.loads(config_json))
    return stage_cls(options, run)


class StageWorker:
    """Runs inside a Ray task or actor: sets the stage up once, then processes batches."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.stage.setup()
        self.allowed = set(type(stage).schema.names)
        self.node = _node_id()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = unpack_rows(batch)
        results = self.process_safely(rows)
        return {"result": [json.dumps(r, default=str) for r in results]}

    def process_safely(self, rows: list[Row]) -> list[dict[str, Any]]:
        """One result per row, whatever the stage does: a batch that raises is retried row by
        row, and a row that raises on its own is recorded as failed with the error."""
        started = time.perf_counter()
        try:
            results = self.stage.process(rows)
            per_row = (time.perf_counter() - started) / max(1, len(rows))
            return self._finish(rows, results, per_row)
        except Exception:
            if len(rows) == 1:
                err = traceback.format_exc(limit=3).strip().splitlines()[-1]
                log.warning("%s failed on %s: %s", self.stage.name, rows[0].get("key"), err)
                key = rows[0]["key"]
                fan_out = {"video_key": key} if self.stage.fans_out else {}
                return self._finish(rows, [Result.failed(key, f"error: {err}", **fan_out)], 0.0)
            return [r for row in rows for r in self.process_safely([row])]

    def _check_fan_out(self, expected: list[str], results: list[Result]) -> list[Result]:
        """Each result names its input in `video_key`; an input without results gets a failed row."""
        seen = {r.metrics.get("video_key") for r in results}
        if seen - set(expected):
            raise RuntimeError(f"stage {self.stage.name} returned rows for unknown inputs {seen - set(expected)}")
        missing = [Result.failed(k, "error: stage returned no result", video_key=k) for k in expected if k not in seen]
        return results + missing

    def _finish(self, rows: list[Row], results: list[Result], per_row: float) -> list[dict[str, Any]]:
        expected = [r["key"] for r in rows]
        if self.stage.fans_out:
            results = self._check_fan_out(expected, results)
        else:
            by_key = {r.key: r for r in results}
            if set(by_key) - set(expected):
                raise RuntimeError(f"stage {self.stage.name} returned unknown keys {set(by_key) - set(expected)}")
            results = [by_key.get(k) or Result.failed(k, "error: stage returned no result") for k in expected]
        now = datetime.now(timezone.utc).isoformat()
        out = []
        for result in results:
            unknown = set(result.metrics) - self.allowed - {"elapsed_s", "weights"}
            if unknown:
                raise RuntimeError(f"stage {self.stage.name} returned columns not in its schema: {unknown}")
            if result.status not in STATUSES:
                raise RuntimeError(f"stage {self.stage.name} returned status {result.status!r}")
            record = asdict(result)
            metrics = record.pop("metrics")
            record.update(metrics)
            record.setdefault("elapsed_s", per_row)
            record.setdefault("weights", getattr(self.stage, "weights_stamp", "none"))
            record["finished_at"] = now
            record["node"] = self.node
            out.append(record)
        return out


class WireStageWorker(StageWorker):
    """The worker as Ray builds it in an actor or task process: from the stage class and the run's
    config as JSON (plain data crosses to the worker, not objects)."""

    def __init__(self, stage_cls: type[Stage], name: str, config_json: str) -> None:
        super().__init__(build_stage(stage_cls, name, config_json))


_WORKERS: dict[tuple[int, str, str], WireStageWorker] = {}
_PREPARERS: dict[tuple[int, str, str], Stage] = {}


def prepare_in_task(batch: dict[str, Any], stage_cls: type[Stage], name: str, config_json: str) -> dict[str, Any]:
    """The stage's prepare step in a plain CPU task: the stage is built (no models loaded) once
    per worker process."""
    key = (id(stage_cls), name, config_json)
    if key not in _PREPARERS:
        _PREPARERS[key] = build_stage(stage_cls, name, config_json)
    packed = prepare_safely(_PREPARERS[key], [json.loads(r) for r in batch["row"]])
    return {"row": [row for row, _ in packed], "arrays": [arrays for _, arrays in packed]}


def prepare_safely(stage: Stage, rows: list[Row]) -> list[tuple[str, bytes]]:
    """Prepared rows, packed, one per input row. A batch whose prepare raises, answers with other
    keys or returns what cannot be packed is retried row by row; a row that still fails goes on
    un-prepared, so process() prepares it again and the failure is recorded against its key."""
    try:
        prepared = stage.prepare(rows)
        if [r.get("key") for r in prepared] != [r["key"] for r in rows]:
            raise RuntimeError(f"stage {stage.name}.prepare returned other keys than it was given")
        return [pack_row(row) for row in prepared]
    except Exception:
        if len(rows) != 1:
            return [packed for row in rows for packed in prepare_safely(stage, [row])]
        err = traceback.format_exc(limit=3).strip().splitlines()[-1]
        log.warning("%s: prepare failed on %s (process() will retry it): %s", stage.name, rows[0].get("key"), err)
        return [pack_row(rows[0])]


def pack_row(row: Row) -> tuple[str, bytes]:
    """A row → (JSON of its plain fields, .npz of its numpy array fields or b""): arrays of any
    shape and count cross Ray as one binary column, and load back without pickle."""
    import numpy as np

    arrays = {k: v for k, v in row.items() if isinstance(v, np.ndarray)}
    if any(a.dtype.hasobject for a in arrays.values()):
        raise ValueError("object arrays cannot cross without pickle")
    blob = b""
    if arrays:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        blob = buffer.getvalue()
    return json.dumps({k: v for k, v in row.items() if k not in arrays}, default=str), blob


def unpack_rows(batch: dict[str, Any]) -> list[Row]:
    import numpy as np

    rows = [json.loads(r) for r in batch["row"]]
    for row, blob in zip(rows, batch.get("arrays", ()), strict=False):
        if len(blob):
            with np.load(io.BytesIO(bytes(blob)), allow_pickle=False) as arrays:
                row.update({name: arrays[name] for name in arrays.files})
    return rows


def process_in_task(batch: dict[str, Any], stage_cls: type[Stage], name: str, config_json: str) -> dict[str, Any]:
    # Ray reuses worker processes, so a stage built once per process is reused across tasks.
    key = (id(stage_cls), name, config_json)
    if key not in _WORKERS:
        _WORKERS[key] = WireStageWorker(stage_cls, name, config_json)
    return _WORKERS[key](batch)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # outside Ray (unit tests of the worker)
        return "local"

