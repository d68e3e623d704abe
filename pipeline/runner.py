"""Runs one Stage over its pending rows on Ray Data and appends results durably to its manifest.

pending = rows ok in the upstream manifest − keys whose latest row here has the same stage
version and params hash: an anti-join over the manifest parts, taken a window of rows at a time
(pipeline/plan.py), so the driver never holds the corpus as Python rows. Results stream back to the driver and are written as atomic part files
every `run.flush_rows` rows (or few seconds), so a kill loses at most the in-flight rows and a
re-run redoes only those.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from typing import Any

from pipeline import fleet
from pipeline.config import Config
from pipeline.manifest import ManifestStore, conform, full_schema, params_hash
from pipeline.placement import actors_that_fit, check_gpus_exist, check_prepare_fits, cpus_each, task_slots
from pipeline.plan import plan_stage
from pipeline.stage import AUTO, OK, STATUSES, Row, SourceStage, Stage
from pipeline.worker import WireStageWorker, node_id, prepare_in_task, process_in_task

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
    busy_s: float = 0.0  # worker seconds spent in process() (Σ elapsed_s of the results)
    workers: int = 0  # workers that could run at once: actors, or task slots the cluster holds
    streamed: bool = False  # ran in a streaming run, at the same time as the run's other stages

    def count(self, results: list[dict[str, Any]]) -> None:
        """Add recorded results to the counts: statuses, reason classes, busy seconds."""
        for result in results:
            self.busy_s += result.get("elapsed_s") or 0.0
            self.statuses[result["status"]] += 1
            if result["status"] != "ok":
                self.reasons[f"{result['status']}: {reason_class(result['reason'])}"] += 1

    def count_table(self, results: Any) -> None:
        """count() of recorded results as an Arrow table: the ok rows counted in Arrow."""
        import pyarrow.compute as pc

        ok = pc.equal(results.column("status"), OK)
        self.statuses[OK] += pc.sum(ok).as_py() or 0
        self.busy_s += pc.sum(results.filter(ok).column("elapsed_s")).as_py() or 0.0
        self.count(results.filter(pc.invert(ok)).select(["status", "reason", "elapsed_s"]).to_pylist())

    @property
    def rows_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0

    @property
    def busy(self) -> float | None:
        """How busy the stage's workers were: busy seconds over workers × wall seconds. Low: the stage
        waited on its input or on Ray; near 1: its workers bound it (add workers or GPUs there)."""
        return min(1.0, self.busy_s / (self.workers * self.seconds)) if self.workers and self.seconds else None

    def line(self) -> str:
        if self.processed == 0:
            return (
                f"{self.stage}: nothing to do — {self.already_done} of {self.total} rows already "
                "done with this stage version and params"
            )
        counts = ", ".join(f"{s}={self.statuses[s]}" for s in STATUSES if self.statuses[s])
        busy = f", {self.workers} workers {self.busy:.0%} busy" if self.busy is not None else ""
        return (
            f"{self.stage}: processed {self.processed} rows ({counts}) in {self.seconds:.1f}s "
            f"[{self.rows_per_s:.2f} rows/s{busy}]; {self.already_done} already done"
        )


def stage_params_hash(stage: Stage) -> str:
    return params_hash({"stage": stage.name, "version": stage.version, **stage.params()})


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
    stage_cls = stage_cls or cfg.registry[name]
    stage = stage_cls(cfg.stage(name), cfg.run)
    if isinstance(stage, SourceStage):  # its I/O-bound source work fans out as Ray tasks
        stage.map_batches = partial(map_source_batches, ray_cpus=cfg.run.num_cpus)
    store = ManifestStore(cfg.run.manifest_root)
    phash = stage_params_hash(stage)
    plan = plan_stage(stage, store, cfg.registry, phash, retry_failed=cfg.run.retry_failed)
    summary = RunSummary(stage=name, total=plan.total, already_done=plan.already_done)
    if not plan.pending:
        log.info(summary.line())
        return summary

    stage.preflight()
    schema = full_schema(stage.schema)
    run_id = uuid.uuid4().hex[:12]
    started = time.perf_counter()
    if plan.tables is not None and hasattr(stage, "process_table"):
        _record_tables(stage, plan.tables(), store, phash, run_id, summary, _progress(plan.pending, name, progress))
        summary.seconds = time.perf_counter() - started
        log.info(summary.line())
        return summary
    buffer: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    bar = _progress(plan.pending, name, progress)
    # Flush only between batches: a fan-out stage's rows for one input are then never split
    # across parts, so an input is either wholly recorded or wholly redone.
    for batch in (b for window in plan.windows() for b in _execute(stage_cls, cfg, name, window, summary)):
        batch = fleet.recorded(batch)  # rows left pending (the run's download budget spent) are not recorded
        inputs = {r.get("video_key", r["key"]) if stage.fans_out else r["key"] for r in batch}
        for result in batch:
            result.update(stage_version=stage.version, params_hash=phash, run_id=run_id)
        summary.count(batch)
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


def _record_tables(stage: Stage, tables: Iterator[Any], store: ManifestStore, phash: str, run_id: str,
                   summary: RunSummary, bar: Any) -> None:
    """A source stage's rows a table at a time in this process (no Ray): processed, stamped and
    appended as one manifest part per table."""
    import pyarrow as pa

    schema = full_schema(stage.schema)
    summary.workers, node = 1, node_id()
    started = time.perf_counter()  # a row's time includes reading it: the stage's work is mostly that
    for table in tables:
        results = stage.process_table(table)
        now, per_row = datetime.now(timezone.utc), (time.perf_counter() - started) / max(1, table.num_rows)
        stamps = dict(stage_version=stage.version, params_hash=phash, run_id=run_id, finished_at=now,
                      elapsed_s=per_row, weights=getattr(stage, "weights_stamp", "none"), node=node)
        for column in schema:
            if column.name in stamps:
                results = results.append_column(column, pa.repeat(pa.scalar(stamps[column.name], column.type),
                                                                  results.num_rows))
        store.append_table(stage.name, conform(results, schema))
        summary.count_table(results)
        summary.processed += results.num_rows
        bar.update(results.num_rows)
        started = time.perf_counter()
    bar.close()


def reason_class(reason: str | None) -> str:
    """`class: message` reasons group by their class."""
    return (reason or "").split(":", 1)[0]


def _progress(total: int, name: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="row", disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------- Ray execution


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) Ray with a quiet console (pipeline/rayconsole.py) and log
    one line: where it runs and the dashboard's URL."""
    import ray

    from pipeline import rayconsole

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    rayconsole.before_init(address)
    context = ray.init(
        address=address or "local",  # a new Ray of our own unless RAY_ADDRESS: never a stray `ray start` cluster here
        num_cpus=None if address else num_cpus,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rayconsole.after_init()
    log.info(rayconsole.describe(context, address))
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.execution_options.preserve_order = False
    rayconsole.quiet_data_context(data_context)


def _execute(stage_cls: type[Stage], cfg: Config, name: str, pending: list[Row], summary: RunSummary):
    import ray.data

    ensure_ray(cfg.run.num_cpus)
    stage = stage_cls(cfg.stage(name), cfg.run)
    fleet.start(stage)  # the download governor actor, before the workers (no-op for other stages)
    res = stage.resources
    items = [{"row": json.dumps(r, default=str)} for r in pending]
    blocks = max(1, min(len(items), -(-len(items) // res.batch_size)))
    check_gpus_exist(name, res)
    if res.concurrency == AUTO:
        actors = actors_that_fit(res, blocks)
        res = replace(res, concurrency=actors, num_cpus=cpus_each(res, actors))
        log.info("%s: %d actors × %g CPUs (%s.concurrency=0: as many as the cluster holds)",
                 name, actors, res.num_cpus, name)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    config_json = json.dumps(cfg.as_dict())
    if res.prepare_cpus and stage_cls.has_prepare():
        check_prepare_fits(name, res)
        # Separate CPU tasks, streamed into the workers below while those run. Ray Data fuses a task
        # map into the next (actor) map when their remote args are equal, which would put the
        # prepare step back inside the actors; an explicit max_calls=0 (Ray's default for CPU tasks:
        # workers are reused, as _PREPARERS assumes) keeps them apart. tests/test_runner_prepare.py
        # checks that the two run in different processes.
        ds = ds.map_batches(
            prepare_in_task, fn_args=(stage_cls, name, config_json), batch_size=res.batch_size,
            num_cpus=res.prepare_cpus, max_calls=0,
        )
    # A worker or actor that dies mid-batch is retried by Ray Data's defaults (actors restart,
    # their tasks retry); a row is recorded only when its batch's results reach the driver.
    common = dict(batch_size=res.batch_size, num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
                  memory=res.memory_bytes or None)
    summary.workers = res.concurrency if res.concurrency is not None else task_slots(res, blocks)
    if res.concurrency is not None:
        ds = ds.map_batches(
            WireStageWorker,
            fn_constructor_args=(stage_cls, name, config_json),
            compute=ray.data.ActorPoolStrategy(size=res.concurrency),
            **common,
        )
    else:
        ds = ds.map_batches(process_in_task, fn_args=(stage_cls, name, config_json), **common)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        results = [json.loads(blob) for blob in batch["result"]]
        for result in results:
            result["finished_at"] = datetime.fromisoformat(result["finished_at"])
        yield results


