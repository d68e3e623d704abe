"""Runs one Stage over its pending rows on Ray Data and appends results durably to its manifest.

pending = rows ok in the upstream manifest − keys whose latest row here has the same stage
version and params hash. Results stream back to the driver and are written as atomic part files
every `run.flush_rows` rows (or few seconds), so a kill loses at most the in-flight rows and a
re-run redoes only those.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.manifest import COMMON_NAMES, ManifestStore, full_schema, params_hash
from pipeline.stage import AUTO, STATUSES, Resources, Result, Row, SourceStage, Stage

log = logging.getLogger("discomv")
FLUSH_SECONDS = 3.0


@dataclass
class RunSummary:
    stage: str
    total: int = 0
    already_done: int = 0
    processed: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)

    def line(self) -> str:
        if self.processed == 0:
            return (
                f"{self.stage}: nothing to do — {self.already_done} of {self.total} rows already "
                "done with this stage version and params"
            )
        counts = ", ".join(f"{s}={self.statuses[s]}" for s in STATUSES if self.statuses[s])
        rate = self.processed / self.seconds if self.seconds else 0.0
        return (
            f"{self.stage}: processed {self.processed} rows ({counts}) in {self.seconds:.1f}s "
            f"[{rate:.2f} rows/s]; {self.already_done} already done"
        )


def stage_params_hash(stage: Stage) -> str:
    return params_hash({"stage": stage.name, "version": stage.version, **stage.params()})


def upstream_chain(stage_cls: type[Stage]) -> list[str]:
    from stages import STAGES

    chain: list[str] = []
    up = stage_cls.upstream
    while up:
        chain.insert(0, up)
        up = STAGES[up].upstream
    return chain


def input_rows(stage: Stage, store: ManifestStore) -> list[Row]:
    """Rows a stage works on: its source files, or upstream-ok keys with every upstream stage's
    own columns merged (the upstream chain)."""
    if isinstance(stage, SourceStage):
        stage.map_batches = partial(map_source_batches, ray_cpus=stage.run.num_cpus)
        return stage.source_rows()
    from stages import STAGES

    chain = upstream_chain(type(stage))
    latest = {name: store.latest_rows(name) for name in chain}
    fan_out = next((i for i, name in enumerate(chain) if STAGES[name].fans_out), len(chain))
    rows = []
    for key in store.ok_keys(chain[-1]):
        row: Row = {"key": key}
        for name in reversed(chain):  # clip-level stages first: they name the clip's video
            lookup = key if chain.index(name) >= fan_out else row.get("video_key", key)
            prev = latest[name].get(lookup)
            if prev:
                row.update({k: v for k, v in prev.items() if k not in COMMON_NAMES and k not in row})
                row.setdefault("upstream_weights", {})[name] = prev.get("weights")
        rows.append(row)
    return rows


def map_source_batches(
    fn: Callable[[Any], Any], batches: list[Any], parallel: int, num_cpus: float = 1.0, ray_cpus: int | None = None
) -> Iterator[Any]:
    """A source stage's hook for I/O-bound work done before its rows exist (YouTube-8M id lookups):
    fn(batch) for each batch, yielded as each finishes. One batch runs inline (no Ray start for a
    small input); several run as Ray tasks, at most `parallel` at once, each retried if its worker dies."""
    if len(batches) <= 1:
        yield from (fn(batch) for batch in batches)
        return
    import ray

    ensure_ray(ray_cpus)
    task = ray.remote(_call).options(num_cpus=num_cpus, max_retries=3)
    queue, running = list(batches), []
    while queue or running:
        while queue and len(running) < parallel:
            running.append(task.remote(fn, queue.pop(0)))
        done, running = ray.wait(running, num_returns=1)
        yield ray.get(done[0])


def _call(fn: Callable[[Any], Any], batch: Any) -> Any:
    return fn(batch)


def run_stage(name: str, cfg: Config, stage_cls: type[Stage] | None = None, progress: bool = True) -> RunSummary:
    from stages import STAGES

    stage_cls = stage_cls or STAGES[name]
    stage = stage_cls(cfg.stage(name), cfg.run)
    store = ManifestStore(cfg.run.manifest_root)
    phash = stage_params_hash(stage)
    rows = input_rows(stage, store)
    done = store.done_keys(
        name, stage.version, phash, retry_failed=cfg.run.retry_failed, by="video_key" if stage.fans_out else "key"
    )
    pending = [r for r in rows if r["key"] not in done]
    summary = RunSummary(stage=name, total=len(rows), already_done=len(rows) - len(pending))
    if not pending:
        log.info(summary.line())
        return summary

    stage.preflight()
    schema = full_schema(stage.schema)
    run_id = uuid.uuid4().hex[:12]
    started = time.perf_counter()
    buffer: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    bar = _progress(len(pending), name, progress)
    # Flush only between batches: a fan-out stage's rows for one input are then never split
    # across parts, so an input is either wholly recorded or wholly redone.
    for batch in _execute(stage_cls, cfg, name, pending):
        inputs = {r.get("video_key", r["key"]) if stage.fans_out else r["key"] for r in batch}
        for result in batch:
            result.update(stage_version=stage.version, params_hash=phash, run_id=run_id)
            summary.statuses[result["status"]] += 1
            if result["status"] != "ok":
                summary.reasons[f"{result['status']}: {reason_class(result['reason'])}"] += 1
        buffer.extend(batch)
        bar.update(len(inputs))
        if len(buffer) >= cfg.run.flush_rows or time.monotonic() - last_flush > FLUSH_SECONDS:
            store.append(name, schema, buffer)
            buffer, last_flush = [], time.monotonic()
    store.append(name, schema, buffer)
    bar.close()
    summary.processed = sum(summary.statuses.values())
    summary.seconds = time.perf_counter() - started
    log.info(summary.line())
    return summary


def reason_class(reason: str | None) -> str:
    """`class: message` reasons group by their class."""
    return (reason or "").split(":", 1)[0]


def _progress(total: int, name: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="row", disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------- Ray execution


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    context = ray.init(
        address=address or None,
        num_cpus=None if address else num_cpus,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    url = getattr(context, "dashboard_url", None)
    where = f"cluster {address}" if address else "embedded Ray on this machine"
    log.info("ray: %s%s", where, f"; dashboard http://{url}" if url else "")
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.execution_options.preserve_order = False


def _execute(stage_cls: type[Stage], cfg: Config, name: str, pending: list[Row]):
    import ray.data

    ensure_ray(cfg.run.num_cpus)
    stage = stage_cls(cfg.stage(name), cfg.run)
    res = stage.resources
    items = [{"row": json.dumps(r, default=str)} for r in pending]
    blocks = max(1, min(len(items), -(-len(items) // res.batch_size)))
    _check_gpus_exist(name, res)
    if res.concurrency == AUTO:
        actors = _actors_that_fit(res, blocks)
        res = replace(res, concurrency=actors, num_cpus=_cpus_each(res, actors))
        log.info("%s: %d actors × %g CPUs (%s.concurrency=0: as many as the cluster holds)",
                 name, actors, res.num_cpus, name)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    config_json = json.dumps(cfg.as_dict())
    if res.prepare_cpus and stage_cls.has_prepare():
        _check_prepare_fits(name, res)
        # Separate CPU tasks, streamed into the workers below while those run. Ray Data fuses a task
        # map into the next (actor) map when their remote args are equal, which would put the
        # prepare step back inside the actors; an explicit max_calls=0 (Ray's default for CPU tasks:
        # workers are reused, as _PREPARERS assumes) keeps them apart. tests/test_runner_prepare.py
        # checks that the two run in different processes.
        ds = ds.map_batches(
            _prepare_in_task, fn_args=(stage_cls, name, config_json), batch_size=res.batch_size,
            num_cpus=res.prepare_cpus, max_calls=0,
        )
    # A worker or actor that dies mid-batch is retried by Ray Data's defaults (actors restart,
    # their tasks retry); a row is recorded only when its batch's results reach the driver.
    common = dict(batch_size=res.batch_size, num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
                  memory=res.memory_bytes or None)
    if res.concurrency is not None:
        ds = ds.map_batches(
            StageWorker,
            fn_constructor_args=(stage_cls, name, config_json),
            compute=ray.data.ActorPoolStrategy(size=res.concurrency),
            **common,
        )
    else:
        ds = ds.map_batches(_process_in_task, fn_args=(stage_cls, name, config_json), **common)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        results = [json.loads(blob) for blob in batch["result"]]
        for result in results:
            result["finished_at"] = datetime.fromisoformat(result["finished_at"])
        yield results


class StageWorker:
    """Runs inside a Ray task or actor: builds the stage once, then processes batches."""

    def __init__(self, stage_cls: type[Stage], name: str, config_json: str) -> None:
        from pipeline.config import load_config_dict

        cfg = load_config_dict(json.loads(config_json))
        self.stage = stage_cls(cfg.stage(name), cfg.run)
        self.stage.setup()
        self.allowed = set(stage_cls.schema.names)
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


_WORKERS: dict[tuple[int, str, str], StageWorker] = {}
_PREPARERS: dict[tuple[int, str, str], Stage] = {}


def _check_gpus_exist(name: str, res: Resources) -> None:
    """A stage asking for GPUs on a cluster without any would wait for them forever."""
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    if res.num_gpus and have < res.num_gpus:
        raise ConfigError(
            f"{name}.num_gpus={res.num_gpus:g} but the Ray cluster has {have:g} GPUs: set {name}.num_gpus=0 "
            "to run on CPU, or start Ray on a machine with a GPU"
        )


def _actors_that_fit(res: Resources, batches: int) -> int:
    """How many actors of these resources the cluster holds at once (GPUs for a GPU stage, else
    CPUs beside the prepare tasks), at most one per batch. Stages run one after another, so on a
    laptop this gives a model stage every core instead of one actor's single torch thread."""
    import ray

    total = ray.cluster_resources()
    if res.num_gpus:
        fit = total.get("GPU", 0.0) // res.num_gpus
    else:
        fit = (total.get("CPU", 1.0) - (res.prepare_cpus or 0.0)) // max(res.num_cpus, 0.01)
    if res.memory_bytes:
        fit = min(fit, total.get("memory", 0.0) // res.memory_bytes)
    return int(max(1, min(fit, batches)))


def _cpus_each(res: Resources, actors: int) -> float:
    """CPUs per auto-sized CPU actor: the free CPUs shared out, so fewer batches than cores still
    use every core (Ray gives an actor as many torch/OpenMP threads as CPUs). GPU actors keep theirs."""
    import ray

    if res.num_gpus:
        return res.num_cpus
    free = ray.cluster_resources().get("CPU", 1.0) - (res.prepare_cpus or 0.0)
    largest_node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
    return max(res.num_cpus, float(int(min(free // actors, largest_node))))


def _check_prepare_fits(name: str, res: Any) -> None:
    """Actors hold their CPUs for the whole run: when they take every CPU, the prepare tasks
    upstream of them could never be scheduled and the run would hang."""
    import ray

    if not res.concurrency:
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    needed = res.concurrency * res.num_cpus + res.prepare_cpus
    if needed > total:
        raise ConfigError(
            f"{name}: {res.concurrency} actors × {name}.num_cpus={res.num_cpus:g} plus {res.prepare_cpus:g} CPUs "
            f"for its prepare tasks need {needed:g} CPUs, the Ray cluster has {total:g}: lower "
            f"{name}.concurrency or {name}.num_cpus, or the stage's prepare CPUs option"
        )


def _prepare_in_task(batch: dict[str, Any], stage_cls: type[Stage], name: str, config_json: str) -> dict[str, Any]:
    """The stage's prepare step in a plain CPU task: the stage is built (no models loaded) once
    per worker process."""
    key = (id(stage_cls), name, config_json)
    if key not in _PREPARERS:
        from pipeline.config import load_config_dict

        cfg = load_config_dict(json.loads(config_json))
        _PREPARERS[key] = stage_cls(cfg.stage(name), cfg.run)
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


def _process_in_task(batch: dict[str, Any], stage_cls: type[Stage], name: str, config_json: str) -> dict[str, Any]:
    # Ray reuses worker processes, so a stage built once per process is reused across tasks.
    key = (id(stage_cls), name, config_json)
    if key not in _WORKERS:
        _WORKERS[key] = StageWorker(stage_cls, name, config_json)
    return _WORKERS[key](batch)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # outside Ray (unit tests of the worker)
        return "local"

