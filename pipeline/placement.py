"""How a stage's workers fit the Ray cluster: checked and sized on the driver before any starts, so a
run that could never be scheduled fails at once naming the option to change."""

from __future__ import annotations

from typing import Any

from pipeline.options import ConfigError
from pipeline.stage import Resources


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
