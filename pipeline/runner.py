"""Runs one Stage over its pending rows on Ray Data and appends results durably to its manifest.

pending = rows ok in the upstream manifest − keys whose latest row here has the same stage
version and params hash. Results stream back to the driver and are written as atomic part files
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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.manifest import ManifestStore, full_schema, params_hash
from pipeline.plan import plan_stage, upstream_chain  # noqa: F401  (upstream_chain: moved, re-exported)
from pipeline.stage import AUTO, STATUSES, Resources, Row, SourceStage, Stage
from pipeline.worker import StageWorker, prepare_in_task, process_in_task

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


def input_rows(stage: Stage, store: ManifestStore, registry: Mapping[str, type[Stage]]) -> list[Row]:
    """Rows a stage works on: its source files, or upstream-ok keys with every upstream stage's
    own columns merged (the upstream chain). Every row at once: for tests and small corpora;
    `run_stage` takes them a window at a time (pipeline/plan.py)."""
    if isinstance(stage, SourceStage):
        return stage.source_rows()
    plan = plan_stage(stage, store, registry, phash="", retry_failed=False)
    return [row for window in plan.windows() for row in window]


def run_stage(name: str, cfg: Config, stage_cls: type[Stage] | None = None, progress: bool = True) -> RunSummary:
    stage_cls = stage_cls or cfg.registry[name]
    stage = stage_cls(cfg.stage(name), cfg.run)
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
    buffer: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    bar = _progress(plan.pending, name, progress)
    # Flush only between batches: a fan-out stage's rows for one input are then never split
    # across parts, so an input is either wholly recorded or wholly redone.
    for batch in (b for window in plan.windows() for b in _execute(stage_cls, cfg, name, window)):
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
            prepare_in_task, fn_args=(stage_cls, name, config_json), batch_size=res.batch_size,
            num_cpus=res.prepare_cpus, max_calls=0,
        )
    # A worker or actor that dies mid-batch is retried by Ray Data's defaults (actors restart,
    # their tasks retry); a row is recorded only when its batch's results reach the driver.
    common = dict(batch_size=res.batch_size, num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
                  memory=res.memory_bytes or None)
    if res.concurrency is not None:
        ds = ds.map_batches(
            StageWorker.from_wire,
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


