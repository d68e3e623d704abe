"""How a stage's workers fit the Ray cluster: checked and sized on the driver before any starts, so a
run that could never be scheduled fails at once naming the option to change."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pipeline.options import ConfigError
from pipeline.stage import AUTO, Resources


def check_gpus_exist(name: str, res: Resources) -> None:
    """A stage asking for GPUs on a cluster without any would wait for them forever."""
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    if res.num_gpus and have < res.num_gpus:
        raise ConfigError(
            f"{name}.num_gpus={res.num_gpus:g} but the Ray cluster has {have:g} GPUs: set {name}.num_gpus=0 "
            "to run on CPU, or start Ray on a machine with a GPU"
        )


def actors_that_fit(res: Resources, batches: int) -> int:
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


def cpus_each(res: Resources, actors: int) -> float:
    """CPUs per auto-sized CPU actor: the free CPUs shared out, so fewer batches than cores still
    use every core (Ray gives an actor as many torch/OpenMP threads as CPUs). GPU actors keep theirs."""
    import ray

    if res.num_gpus:
        return res.num_cpus
    free = ray.cluster_resources().get("CPU", 1.0) - (res.prepare_cpus or 0.0)
    largest_node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
    return max(res.num_cpus, float(int(min(free // actors, largest_node))))


def check_prepare_fits(name: str, res: Any) -> None:
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


def task_slots(res: Resources, batches: int) -> int:
    """How many of a task stage's tasks run at once: the cluster's CPUs (GPUs) over what one needs."""
    import ray

    total = ray.cluster_resources()
    fit = total.get("GPU", 0.0) // res.num_gpus if res.num_gpus else total.get("CPU", 1.0) // max(res.num_cpus, 0.01)
    return int(max(1, min(fit, batches)))


def fit_stream(names: list[str], resources: list[Resources]) -> tuple[list[Resources], list[tuple[int, int] | None], float]:
    """Every stage of a streaming run alive at once: each gets at least one worker (one actor, or one
    task slot, plus its prepare task), and when those minimums ask for more CPUs than the cluster has,
    every stage's CPU request is scaled down by one factor (Ray's CPUs are logical: the OS shares the
    cores; a stage asking for CPUs it never gets would stall the whole stream). Returns the resources
    to request, each stage's actor pool (min, max) or None for tasks, and the factor. GPUs are not
    scaled: a GPU stage needs its GPUs to exist (check_gpus_exist)."""
    import ray

    total = ray.cluster_resources()
    cpus, memory = total.get("CPU", 1.0), total.get("memory", 0.0)
    demand = sum(r.num_cpus * max(1, r.concurrency or 1) + (r.prepare_cpus or 0.0) for r in resources)
    factor = min(1.0, cpus / demand) if demand else 1.0
    needed_memory = sum(r.memory_bytes * max(1, r.concurrency or 1) for r in resources)
    if memory and needed_memory > memory:
        raise ConfigError(
            f"the stages of this run need {needed_memory / 2**30:.1f} GiB of memory at once (one worker each: "
            + ", ".join(f"{n} {r.memory_bytes / 2**30:.1f}" for n, r in zip(names, resources, strict=True) if r.memory_bytes)
            + f"), the Ray cluster has {memory / 2**30:.1f}: run fewer stages at once (--from/--to), lower their "
            "batch or window options, or run.executor=stages")
    fitted, pools = [], []
    for res in resources:
        scaled = replace(res, num_cpus=round(res.num_cpus * factor, 4),
                         prepare_cpus=None if res.prepare_cpus is None else round(res.prepare_cpus * factor, 4))
        fitted.append(scaled)
        if res.concurrency is None:
            pools.append(None)
        elif res.concurrency == AUTO:
            room = total.get("GPU", 0.0) // res.num_gpus if res.num_gpus else cpus // max(scaled.num_cpus, 0.01)
            pools.append((1, int(max(1, room))))
        else:
            pools.append((res.concurrency, res.concurrency))
    return fitted, pools, factor
