"""The download governor for a whole Ray cluster: one named actor (a GovernorCore, pipeline/governor.py)
that every download worker's GovernorClient asks before each request. The spine wires it:

- `start(stage)` on the driver, before the stage's workers start: creates the actor (or resets a
  running one's budget and caps for this run) when the stage declares `governor_settings()` and
  `governor` is on;
- `attach(stage)` in each worker, after the stage is built: hands the stage a client of that actor
  (or, with `governor: false`, of a governor of its own with an even share of the caps);
- `recorded(results)` on the driver, before results are written: drops rows the stage left
  pending (reason class `deferred`: the run's budget was spent), so the next run plans them again.

Stages never import this module (it imports Ray); they see only pipeline/governor.py."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from pipeline.governor import DEFERRED, GovernorClient, GovernorCore, GovernorSettings

log = logging.getLogger("discomv")


class GovernorActor:
    """Ray runs one call at a time (a plain actor): each call is a few microseconds of Python, and
    clients lease tokens in batches, so one actor serves thousands of requests per second."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.core = GovernorCore(GovernorSettings(**settings))

    def grant(self, *args: Any) -> dict[str, Any]:
        return self.core.grant(*args)

    def configure(self, settings: dict[str, Any]) -> None:
        """A new run: fresh caps and budget; egress health (who is banned) is kept."""
        egresses = self.core.egresses
        self.core = GovernorCore(GovernorSettings(**settings))
        for name, state in egresses.items():
            if name in self.core.egresses:
                self.core.egresses[name] = state

    def state(self) -> dict[str, Any]:
        return self.core.state()


def _settings(stage: Any) -> GovernorSettings | None:
    make = getattr(stage, "governor_settings", None)
    return make() if callable(make) else None


def _actor_class() -> Any:
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(GovernorActor)


def _named(settings: GovernorSettings) -> Any:
    """The run's governor actor, created if missing. Owned by its creator (the driver, through
    `start`), so it ends with the run; it restarts if its process dies."""
    return _actor_class().options(name=settings.name, get_if_exists=True).remote(asdict(settings))


class _ActorCall:
    """`grant` on the fleet actor; if the actor is gone for good (its owner died), look it up again."""

    def __init__(self, settings: GovernorSettings) -> None:
        self.settings, self.actor = settings, None

    def __call__(self, *args: Any) -> dict[str, Any]:
        import ray

        for _ in range(2):
            if self.actor is None:
                self.actor = _named(self.settings)
            try:
                return ray.get(self.actor.grant.remote(*args))
            except ray.exceptions.RayActorError:
                self.actor = None
        return ray.get(_named(self.settings).grant.remote(*args))


def start(stage: Any) -> Any:
    """Driver side (Ray initialised): the run's governor actor, created or reset; None when the stage
    has no governor or the user turned the fleet governor off."""
    settings = _settings(stage)
    if settings is None or not settings.fleet:
        return None
    import ray

    actor = _named(settings)
    ray.get(actor.configure.remote(asdict(settings)))
    log.info("%s: one governor for the fleet (%s): caps %s requests/s, %s bytes/s; %d egress(es)",
             stage.name, settings.name, settings.requests_per_s or "no cap", settings.bytes_per_s or "no cap",
             len(settings.egresses))
    return actor


def attach(stage: Any) -> None:
    """Worker side: give the stage its governor client. With the fleet governor on, the named actor
    (created here if the driver has not); off, a governor in this process with an even share of the
    caps (1/`concurrency` of them)."""
    settings = _settings(stage)
    if settings is None:
        return
    import ray

    if not ray.is_initialized():  # built in a plain process: it is the whole fleet (setup() governs it)
        return
    if not settings.fleet:
        from pipeline.governor import local

        stage.governor = local(settings.split(getattr(stage.config, "concurrency", 1) or 1))
        return
    stage.governor = GovernorClient(_ActorCall(settings), settings)


def recorded(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results to write: rows left pending (reason `deferred: ...`) are not recorded."""
    kept = [r for r in results if not (r.get("reason") or "").startswith(DEFERRED + ":")]
    if len(kept) < len(results):
        log.debug("%d row(s) left pending: %s", len(results) - len(kept), results[0].get("reason"))
    return kept


def state(stage: Any) -> dict[str, Any] | None:
    """The fleet governor's counters and egress health (bench, tests, a status line)."""
    settings = _settings(stage)
    if settings is None or not settings.fleet:
        return None
    import ray

    return ray.get(ray.get_actor(settings.name).state.remote())
