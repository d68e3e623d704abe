"""What runs inside Ray: a stage's worker (one result per row, whatever the stage does), its
prepare step as a CPU task, and the wire format rows cross in (JSON for plain fields, .npz for arrays;
never pickle)."""

from __future__ import annotations

import io
import json
import logging
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline import fleet
from pipeline.config import load_section
from pipeline.janitor import SEEN_FIELDS
from pipeline.stage import STATUSES, Result, Row, Stage

log = logging.getLogger("discomv")
ADMIT_POLL_SECONDS = 0.5  # a stage waiting for a place in the media window asks again this often


def build_stage(stage_cls: type[Stage], name: str, config_json: str) -> Stage:
    run, options = load_section(name, stage_cls.Config, json.loads(config_json))
    stage = stage_cls(options, run)
    fleet.attach(stage)  # the download governor's client (no-op for other stages, and outside Ray)
    return stage


class StageWorker:
    """Runs inside a Ray task or actor: sets the stage up once, then processes batches."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.stage.setup()
        self.allowed = set(type(stage).schema.names)
        self.node = node_id()

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
            # not dataclasses.asdict: it deep-copies every metric (a third of ingest's time at 15M rows)
            record = {"key": result.key, "status": result.status, "reason": result.reason, **result.metrics}
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
    return as_batch(packed)


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


def as_batch(packed: list[tuple[str, bytes]]) -> dict[str, list[Any]]:
    """Packed rows (pack_row) as the two columns a batch crosses Ray in."""
    return {"row": [row for row, _ in packed], "arrays": [arrays for _, arrays in packed]}


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


def node_id() -> str:
    import ray

    if not ray.is_initialized():  # outside Ray (unit tests, bench/scale.py): asking would start Ray
        return "local"
    return ray.get_runtime_context().get_node_id()[:12]


# ---------------------------------------------------------------- streaming run (pipeline/stream.py)

# Fields a row carries through a streaming run beside its columns: the stage index it entered at,
# its status so far, the stage that set it, how many rows its input fanned out into, the fields a
# prepare task added (dropped again once the stage has used them), and the number lists that travel
# as arrays (a stage gets them back as lists, as from a manifest).
STREAM_FIELDS = ("_enter", "_status", "_stage", "_siblings", "_prepared", "_arrays")


def is_mine(row: Row, index: int) -> bool:
    """Whether stage `index` of the stream works on this row: still ok, and entered at or before it."""
    return row["_status"] == "ok" and row["_enter"] <= index


class StreamWorker:
    """One stage of a streaming run, as a Ray Data map: works on the rows that are its own (is_mine),
    hands each result to the run's manifest recorder (and waits for it to be taken, so a row is
    recorded here before a later stage can record it), merges the result's columns into the row and
    passes every row on; a row not ok passes through the rest of the stream untouched."""

    def __init__(self, stage_cls: type[Stage], name: str, config_json: str, index: int, stamp: dict[str, str],
                 recorder: Any, threads: int = 1, media: MediaRole | None = None) -> None:
        use_threads(threads)
        self.worker = WireStageWorker(stage_cls, name, config_json)
        self.index, self.stamp, self.recorder = index, stamp, recorder
        self.media = media or MediaRole()
        self.schema = stage_cls.schema
        self.arrays = {f.name: f.type.value_type.to_pandas_dtype() for f in stage_cls.schema
                       if _is_number_list(f.type)}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import ray

        rows = unpack_rows(batch)
        mine = [row for row in rows if is_mine(row, self.index)]
        out = [row for row in rows if not is_mine(row, self.index)]
        for admitted in self._admitted(mine):
            # rows left pending (the run's download budget spent) get no result: they leave the stream
            results = fleet.recorded(self.worker.process_safely([_stage_view(row) for row in admitted]))
            for result in results:
                result.update(self.stamp)
            ray.get(self.recorder.add.remote(self.worker.stage.name, json.dumps(results, default=str)))
            out += self.merge(admitted, results)
            if self.media.admits and len(results) < len(admitted):
                answered = {r["key"] for r in results}
                ray.get(self.recorder.release.remote([r["key"] for r in admitted if r["key"] not in answered]))
        if self.media.sees:
            self._show(out)
        return as_batch([pack_row(row) for row in out])

    def _admitted(self, rows: list[Row]) -> Iterator[list[Row]]:
        """The rows, in groups as the run's media window lets them start (all at once when this stage
        does not make the media the window counts)."""
        import ray

        while rows:
            if not self.media.admits:
                yield rows
                return
            granted = set(ray.get(self.recorder.admit.remote([row["key"] for row in rows])))
            if granted:
                yield [row for row in rows if row["key"] in granted]
                rows = [row for row in rows if row["key"] not in granted]
            else:
                time.sleep(ADMIT_POLL_SECONDS)

    def _show(self, rows: list[Row]) -> None:
        """The last stage reading media shows the janitor every row it passes on (not those that
        entered after it): what they hold and whether their video's journey is over."""
        import ray

        fields = (*SEEN_FIELDS, *self.media.columns)
        seen = [{f: row[f] for f in fields if f in row} for row in rows if row["_enter"] <= self.index]
        if seen:
            ray.get(self.recorder.see.remote(json.dumps(seen, default=str)))

    def merge(self, rows: list[Row], results: list[dict[str, Any]]) -> list[Row]:
        """Each input row with its result's columns (fan-out: one row per result, keyed by it);
        number lists become arrays, so they travel as binary, not JSON."""
        import numpy as np
        import pyarrow as pa

        name = self.worker.stage.name
        # the values as the manifest holds them (its column types), as a later stage would read them
        typed = pa.Table.from_pylist([{c: r.get(c) for c in self.schema.names} for r in results],
                                     schema=self.schema).to_pylist()
        by_input: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
        for result, values in zip(results, typed, strict=True):
            by_input.setdefault(result.get("video_key") or result["key"] if self.worker.stage.fans_out
                                else result["key"], []).append((result, values))
        merged = []
        for row in rows:
            siblings = by_input.get(row["key"], [])
            for result, values in siblings:
                new = {k: v for k, v in row.items() if k not in (row.get("_prepared") or ()) and k != "_prepared"}
                new["upstream_weights"] = {**(row.get("upstream_weights") or {}), name: result.get("weights")}
                new["key"] = result["key"]
                for column, value in values.items():
                    if column in self.arrays and isinstance(value, list):
                        value = np.asarray(value, dtype=self.arrays[column])
                        new["_arrays"] = [*new.get("_arrays", ()), column]
                    new[column] = value
                new.update(_status=result["status"], _stage=name)
                if self.worker.stage.fans_out:
                    new["_siblings"] = len(siblings)
                merged.append(new)
        return merged


@dataclass(frozen=True)
class MediaRole:
    """A stage's part in the run's bounded disk: `admits` (it makes the media the window counts: it
    asks the recorder before starting a video), `sees` (the last stage reading media: it shows the
    recorder every row it passes on), `columns` (the media columns, for `sees`)."""

    admits: bool = False
    sees: bool = False
    columns: tuple[str, ...] = ()


def use_threads(threads: int) -> None:
    """Math-library threads for this worker process. Ray sets OMP_NUM_THREADS to a worker's whole
    CPUs (1 for the fractional CPUs a streaming run hands out); a model stage alone at the end of a
    stream would then leave cores idle. Set before the stage imports torch (stages import it lazily)."""
    import os
    import sys

    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _stage_view(row: Row) -> Row:
    view = {k: v for k, v in row.items() if k not in STREAM_FIELDS}
    for column in row.get("_arrays", ()):
        view[column] = view[column].tolist()
    return view


def _is_number_list(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(arrow_type) and (pa.types.is_integer(arrow_type.value_type)
                                             or pa.types.is_floating(arrow_type.value_type))


_STREAMERS: dict[tuple[int, str, str, int], StreamWorker] = {}


def stream_in_task(batch: dict[str, Any], stage_cls: type[Stage], name: str, config_json: str, index: int,
                   stamp: dict[str, str], recorder: Any, threads: int = 1, media: MediaRole | None = None,
                   ) -> dict[str, Any]:
    """A task stage of the stream: the StreamWorker built once per worker process."""
    key = (id(stage_cls), name, config_json, index)
    if key not in _STREAMERS:
        _STREAMERS[key] = StreamWorker(stage_cls, name, config_json, index, stamp, recorder, threads, media)
    return _STREAMERS[key](batch)


def stream_prepare_in_task(batch: dict[str, Any], stage_cls: type[Stage], name: str, config_json: str,
                           index: int) -> dict[str, Any]:
    """The stage's prepare step on the rows that are its own; the others pass as they came."""
    key = (id(stage_cls), name, config_json)
    if key not in _PREPARERS:
        _PREPARERS[key] = build_stage(stage_cls, name, config_json)
    rows = unpack_rows(batch)
    mine = [row for row in rows if is_mine(row, index)]
    prepared = [unpack_one(packed) for packed in prepare_safely(_PREPARERS[key], [_stage_view(r) for r in mine])]
    for row, done in zip(mine, prepared, strict=True):
        added = [k for k in done if k not in row]
        row.update(done)
        row["_prepared"] = added
    return as_batch([pack_row(row) for row in rows])


def unpack_one(packed: tuple[str, bytes]) -> Row:
    return unpack_rows({"row": [packed[0]], "arrays": [packed[1]]})[0]
