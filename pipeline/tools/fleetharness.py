"""Download workers on Ray as the spine builds them (pipeline/worker.py build_stage + StageWorker, with
pipeline/fleet.py attach), and a dispatcher that hands each free worker the next row as Ray Data does:
the fleet tests (tests/test_fleet_ray.py) and bench/download.py drive a fleet with these."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline import fleet
from pipeline.worker import StageWorker, build_stage


class FleetWorker:
    """One download worker: the stage built from the run's config, the fleet governor attached."""

    def __init__(self, config_json: str, stage_cls: type) -> None:
        stage = build_stage(stage_cls, "download", config_json)
        fleet.attach(stage)
        self.worker = StageWorker(stage)

    def one(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.worker.process_safely([row])[0]


def start_workers(n: int, config_json: str, stage_cls: type) -> list[Any]:
    import ray

    actor = ray.remote(num_cpus=0)(FleetWorker)
    return [actor.remote(config_json, stage_cls) for _ in range(n)]


def dispatch(actors: list[Any], rows: list[dict[str, Any]],
             on_result: Callable[[list[dict[str, Any]]], None] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """(results, keys re-queued): each free actor gets the next row; a row whose actor died goes back
    in the queue for the others."""
    import ray

    queue, results, requeued = list(rows), [], []
    running: dict[Any, tuple[Any, dict[str, Any]]] = {}
    alive = list(actors)
    while queue or running:
        busy = {actor for actor, _ in running.values()}
        for actor in alive:
            if queue and actor not in busy:
                row = queue.pop(0)
                running[actor.one.remote(row)] = (actor, row)
        if not running:
            raise RuntimeError("every worker died")
        done, _ = ray.wait(list(running), num_returns=1, timeout=120)
        if not done:
            raise RuntimeError("no worker finished a row within two minutes")
        actor, row = running.pop(done[0])
        try:
            results.append(ray.get(done[0]))
        except ray.exceptions.RayActorError:
            alive.remove(actor)
            queue.insert(0, row)
            requeued.append(row["key"])
        if on_result:
            on_result(results)
    return results, requeued


def windows(times: list[float], width: float) -> list[int]:
    """Requests in each window of `width` seconds that starts at a request (`times` sorted)."""
    counts, end = [], 0
    for i, t in enumerate(times):
        while end < len(times) and times[end] < t + width:
            end += 1
        counts.append(end - i)
    return counts
