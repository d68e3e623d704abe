"""`discomv run` as one Ray Data streaming pipeline: every chosen stage a map operator with its own
resources (CPU tasks, CPU or GPU actor pools), all alive at once, rows flowing from stage to stage
under Ray Data's backpressure.

- Plan (pipeline/plan.py plan_stream): a row enters at the first stage it is pending at; the rows
  are written a window at a time to Parquet files in a driver-local temp folder, read back by Ray
  Data in small blocks (read tasks pinned to the driver's node), so the driver never holds the corpus.
- Each stage (pipeline/worker.py StreamWorker) works on its own rows, passes the others on, and hands
  its results to one recorder actor (pipeline/recorder.py) that appends each stage's manifest.
- The recorder also removes media no later stage needs, as soon as the last stage reading them has
  passed the video's rows on, and holds the media window that keeps downloads from running ahead
  (pipeline/janitor.py); rows leave the stream at the driver, which only drains them.
A source stage (ingest) runs first, as a single stage does: its rows come from input files.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import fleet
from pipeline.config import Config
from pipeline.manifest import ManifestStore, full_schema
from pipeline.placement import check_gpus_exist, check_prepare_fits, fit_stream
from pipeline.plan import StreamPlan, plan_stream
from pipeline.recorder import ManifestRecorder
from pipeline.runner import RunSummary, ensure_ray, run_stage, stage_params_hash
from pipeline.stage import AUTO, SourceStage, Stage
from pipeline.worker import (
    MediaRole,
    StreamWorker,
    as_batch,
    pack_row,
    stream_in_task,
    stream_prepare_in_task,
)

log = logging.getLogger("discomv")
REPORT_SECONDS = 30.0  # a progress line this often when no progress bars are shown


def run_pipeline(names: list[str], cfg: Config, progress: bool = True) -> list[RunSummary]:
    """`discomv run`: the stages in order — a source stage (ingest) on its own first, then the rest as
    one streaming pipeline; with run.executor=stages, each stage over every row, then the next."""
    if cfg.run.executor == "stages":
        return [run_stage(name, cfg, progress=progress) for name in names]
    sources = [n for n in names if issubclass(cfg.registry[n], SourceStage)]
    rest = [n for n in names if n not in sources]
    summaries = [run_stage(name, cfg, progress=progress) for name in sources]
    return summaries + (run_stream(rest, cfg, progress) if rest else [])


def run_stream(names: list[str], cfg: Config, progress: bool = True) -> list[RunSummary]:
    """The stages `names` (pipeline order, no source stage) as one streaming pipeline."""
    stages = [cfg.registry[name](cfg.stage(name), cfg.run) for name in names]
    store = ManifestStore(cfg.run.manifest_root)
    phashes = [stage_params_hash(stage) for stage in stages]
    plan = plan_stream(stages, store, cfg.registry, phashes, retry_failed=cfg.run.retry_failed)
    summaries = [RunSummary(stage=n, total=t, already_done=t - p, streamed=True) for n, t, p in
                 zip(names, plan.totals, plan.pending, strict=True)]
    if not plan.rows:
        for summary in summaries:
            log.info(summary.line())
        return summaries
    log.info("stream: %s", ", ".join(f"{n} {e}" for n, e in zip(names, plan.entering, strict=True) if e)
             + " rows enter")
    ensure_ray(cfg.run.num_cpus)
    for stage in stages:
        fleet.start(stage)  # the download governor actor, before the workers (no-op for other stages)
    run_id = uuid.uuid4().hex[:12]
    entries = Path(tempfile.mkdtemp(prefix=f"discomv-stream-{run_id}-"))
    roles, janitor = media_plan(cfg, stages)
    recorder = _start_recorder(cfg, stages, janitor)
    started = time.perf_counter()
    try:
        files = _write_entries(plan, entries)
        ds, workers = _pipeline(cfg, stages, phashes, run_id, recorder, files, plan, roles)
        with _Progress(names, plan, recorder, progress):
            for _ in ds.iter_batches(batch_size=None, batch_format="numpy"):
                pass  # rows leave here: every result is already with the recorder
        _ray_get(recorder.close.remote())
    except BaseException:  # a stage bug, a full disk, Ctrl-C: what was taken is still recorded
        _record_what_was_taken(recorder)
        raise
    finally:
        shutil.rmtree(entries, ignore_errors=True)
    seconds = time.perf_counter() - started
    stats = _ray_get(recorder.summary.remote())
    for summary, n in zip(summaries, workers, strict=True):
        _fill(summary, stats[summary.stage], seconds, n)
        log.info(summary.line())
    _log_media(_ray_get(recorder.media.remote()))
    return summaries


def media_plan(cfg: Config, stages: list[Stage]) -> tuple[list[MediaRole], dict[str, Any]]:
    """Each stage's part in the run's bounded disk, and the janitor's arguments: which media are
    removed after which stage, and the media window (the most videos past the stage that makes the
    media and not yet through the last stage that reads them).

    The window holds at least every row the batches in between can wait for (a map operator waits
    for a full batch; fewer places than that could leave every stage waiting for rows the window
    holds back), plus the media stage's workers."""
    media = {c: k for s in cfg.registry.values() for c, k in s.media.items()}
    removable = set(media.values()) - set(cfg.run.keep_media)
    readers = [k for k, s in enumerate(stages) if s.reads_media() & removable]
    makers = [k for k, s in enumerate(stages) if set(type(s).media.values()) & removable]
    roles = [MediaRole() for _ in stages]
    janitor: dict[str, Any] = {"media": media, "keep": cfg.run.keep_media, "final_stage": None, "window": None}
    if not readers:
        return roles, janitor
    last = readers[-1]
    roles[last] = MediaRole(sees=True, columns=tuple(media))
    if stages[-1].name != list(cfg.registry)[-1]:  # a later run's stages still read these media
        return roles, janitor
    janitor["final_stage"] = stages[last].name
    if makers and makers[0] < last:
        maker = makers[0]
        waiting = sum(s.resources.batch_size * (2 if _prepares(s) else 1) for s in stages[maker + 1:last + 1])
        least = waiting + max(1, stages[maker].resources.concurrency or 1)
        asked = cfg.run.media_window
        if asked and asked < least:
            log.info("run.media_window %d is below the %d rows this run's batches between %s and %s wait for: "
                     "using %d", asked, least, stages[maker].name, stages[last].name, least)
        janitor["window"] = max(asked, least)
        roles[maker] = MediaRole(admits=True)
        log.info("media window: at most %d videos past %s and not yet through %s", janitor["window"],
                 stages[maker].name, stages[last].name)
    return roles, janitor


def _prepares(stage: Stage) -> bool:
    return bool(stage.resources.prepare_cpus) and type(stage).has_prepare()


def _log_media(media: dict[str, Any]) -> None:
    if media["removed_bytes"]:
        log.info("media: removed %.1f MB no later stage needs (run.keep_media keeps them)", media["removed_bytes"] / 1e6)
    if media["window"]:
        log.info("media window: at most %d of %d videos in flight at once%s", media["peak_held"], media["window"],
                 f"; {media['stalls']} stalls let one more in" if media["stalls"] else "")


def _record_what_was_taken(recorder: Any) -> None:
    try:
        rows = _ray_get(recorder.close.remote())
        log.info("stream stopped: the %d results taken since the last flush are recorded; a re-run goes on from there",
                 rows)
    except Exception as e:  # the recorder itself failed (its error is the one raised)
        log.error("stream stopped: results taken since the last flush could not be recorded (%s)", e)


def _ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def _start_recorder(cfg: Config, stages: list[Stage], janitor: dict[str, Any]) -> Any:
    """The recorder actor, on the driver's node (where the manifests are written from), no CPU held."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    schemas = [(s.name, full_schema(s.schema).serialize().to_pybytes()) for s in stages]
    here = NodeAffinitySchedulingStrategy(_driver_node(), soft=False)
    actor = ray.remote(ManifestRecorder).options(num_cpus=0, scheduling_strategy=here, max_restarts=0)
    return actor.remote(str(cfg.run.manifest_root), schemas, cfg.run.flush_rows, janitor=janitor)


def _write_entries(plan: StreamPlan, folder: Path) -> list[tuple[str, int]]:
    """The entering rows, packed as they cross Ray (JSON + .npz), one Parquet file per window."""
    files = []
    for i, (k, rows) in enumerate(plan.windows()):
        packed = [pack_row({**row, "_enter": k, "_status": "ok"}) for row in rows]
        path = folder / f"entries-{i:06d}.parquet"
        batch = as_batch(packed)
        pq.write_table(pa.table({"row": pa.array(batch["row"], pa.string()),
                                 "arrays": pa.array(batch["arrays"], pa.binary())}), path)
        files.append((str(path), len(rows)))
    return files


def _pipeline(cfg: Config, stages: list[Stage], phashes: list[str], run_id: str, recorder: Any,
              files: list[tuple[str, int]], plan: StreamPlan, roles: list[MediaRole]) -> tuple[Any, list[int]]:
    import ray.data

    resources, pools, factor = fit_stream([s.name for s in stages], [s.resources for s in stages])
    if factor < 1:
        log.info("stream: %d stages share %g CPUs: each stage's CPU request × %.2f (the OS shares the cores)",
                 len(stages), ray.cluster_resources().get("CPU", 0), factor)
    first = next(k for k, e in enumerate(plan.entering) if e)
    # One batch of the first stage per block: a map task's output moves on only when its whole input
    # block is done, so a block of many downloads would hold the next stage back. The blocks are cut
    # by the read tasks in the workers, never put one by one from the driver.
    block_rows = max(1, stages[first].resources.batch_size)
    ds = ray.data.read_datasource(_entries_source(files), override_num_blocks=max(1, -(-plan.rows // block_rows)),
                                  num_cpus=0.01, label_selector=_on_driver_node())
    config_json = json.dumps(cfg.as_dict())
    workers = []
    largest_node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
    for k, (stage, res, pool, role) in enumerate(zip(stages, resources, pools, roles, strict=True)):
        # threads: what the stage asked for, or every core of a node for an auto-sized pool (the
        # stage-after-stage runner gives such a stage every core too; busy stages share them)
        asked = stage.resources
        threads = int(largest_node) if asked.concurrency == AUTO and not asked.num_gpus else max(1, int(asked.num_cpus))
        if asked.concurrency == AUTO and not asked.num_gpus:  # as many such actors as the cores hold, no more
            pool = (1, max(1, int(ray.cluster_resources().get("CPU", 1.0) // (threads * max(asked.num_cpus, 0.01)))))
        check_gpus_exist(stage.name, res)
        stamp = {"stage_version": stage.version, "params_hash": phashes[k], "run_id": run_id}
        stage_cls, name = type(stage), stage.name
        if res.prepare_cpus and stage_cls.has_prepare():
            check_prepare_fits(name, res)
            ds = ds.map_batches(stream_prepare_in_task, fn_args=(stage_cls, name, config_json, k),
                                batch_size=res.batch_size, num_cpus=res.prepare_cpus, max_calls=0)
        common = dict(batch_size=res.batch_size, num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
                      memory=res.memory_bytes or None)
        if pool is None:
            ds = ds.map_batches(stream_in_task, fn_args=(stage_cls, name, config_json, k, stamp, recorder, threads, role),
                                **common)
            workers.append(1)
        else:
            named = type(f"{stage_cls.__name__}Worker", (StreamWorker,), {})  # Ray's op and process names
            ds = ds.map_batches(named, fn_constructor_args=(stage_cls, name, config_json, k, stamp, recorder, threads, role),
                                compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]), **common)
            workers.append(pool[1])
    return ds, workers


def _on_driver_node() -> dict[str, str]:
    """The entry files are in a temp folder on the driver's node: their read tasks run there."""
    return {"ray.io/node-id": _driver_node()}


def _driver_node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _entries_source(files: list[tuple[str, int]]) -> Any:
    """A Ray Data datasource over the entry files: one read task per file."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Entries(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(Path(path).stat().st_size for path, _ in files)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            return [ReadTask(partial(_read_entries, path),
                             BlockMetadata(num_rows=rows, size_bytes=Path(path).stat().st_size, exec_stats=None,
                                           input_files=None))
                    for path, rows in files]

    return Entries()


def _read_entries(path: str) -> Iterator[pa.Table]:
    yield pq.read_table(path)


def _fill(summary: RunSummary, stats: dict[str, Any], seconds: float, workers: int) -> None:
    summary.statuses.update(stats["statuses"])
    summary.reasons.update(stats["reasons"])
    summary.busy_s = stats["busy_s"]
    summary.processed = sum(summary.statuses.values())
    summary.seconds = seconds if summary.processed else 0.0
    summary.workers = workers


class _Progress:
    """One progress bar per stage (rows recorded), from the recorder's counts; without bars, a
    line every REPORT_SECONDS."""

    def __init__(self, names: list[str], plan: StreamPlan, recorder: Any, enabled: bool) -> None:
        self.names, self.recorder, self.enabled = names, recorder, enabled
        self.reach = [sum(plan.entering[: k + 1]) for k in range(len(names))]  # most rows a stage can get
        self.stop = threading.Event()

    def __enter__(self) -> _Progress:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm import tqdm

        bars = [tqdm(total=reach, desc=name, unit="row", position=k, dynamic_ncols=True, leave=True)
                for k, (name, reach) in enumerate(zip(self.names, self.reach, strict=True))] if self.enabled else []
        last_line = time.monotonic()
        while not self.stop.wait(1.0):
            try:
                stats = _ray_get(self.recorder.summary.remote())
            except Exception:
                return
            done = [sum(stats[name]["statuses"].values()) for name in self.names]
            for bar, n in zip(bars, done, strict=False):
                bar.update(n - bar.n)
            if not bars and time.monotonic() - last_line > REPORT_SECONDS:
                log.info("stream: %s rows recorded", ", ".join(f"{n} {d}" for n, d in zip(self.names, done, strict=True)))
                last_line = time.monotonic()
        for bar in bars:
            bar.close()
