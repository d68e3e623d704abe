"""Ray's console settings for our users: what `ensure_ray` applies around `ray.init`.

Each setting silences one Ray message that says nothing to someone running discomv, at its source
(an environment setting Ray reads, the level of the one Ray logger that says it, or a filter on the
one message); Ray's errors and every warning not named here still show. Measured on `discomv demo
--videos 4` (docs/browse.md).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

AUTH_MODE = "RAY_AUTH_MODE"
# Ray Data's own loggers whose WARNINGs are about display only (their errors still show)
QUIET_LOGGERS = {
    # "Progress bars disabled. To enable, set ...enable_progress_bars = True": we show our own bar per stage
    "ray.data._internal.progress": logging.ERROR,
}
# A UserWarning Ray Data raises (warnings.warn) for each actor stage with fewer batches than actors:
# a small run has few batches by design, and the actors simply start as the batches come.
ACTOR_POOL_WARNING = r"The minimum number of concurrent actors for .* is set to"


def before_init(address: str | None) -> None:
    """Environment Ray reads in `ray.init`. Ray 2.60 turns token authentication on for a new local
    cluster and warns that it did ("Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to
    opt out"); asking for token mode explicitly keeps authentication on and the warning off. Joining
    a cluster (`RAY_ADDRESS`), Ray's own choice stands: a token file left on this machine by an
    embedded run says nothing about how that cluster was started (forcing token mode there hung every
    task of a cluster started without it)."""
    if AUTH_MODE in os.environ or address:
        return  # the user's own choice, or the cluster's
    os.environ[AUTH_MODE] = "token"
    from ray._raylet import Config

    Config.initialize("")  # Ray caches its config when imported: re-read it, as Ray does when it sets the mode


def after_init() -> None:
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", message=ACTOR_POOL_WARNING, category=UserWarning,
                            module=r"ray\.data\._internal\.execution\.operators\.actor_pool_map_operator")


def quiet_data_context(data_context: Any) -> None:
    """Ray Data's high-memory issue detector ("Operator 'MapBatches(WireStageWorker)' used up to 4.1GiB
    of memory per worker ... set `memory=...`", then "Found 1 issues. To disable issue detection ...")
    advises the code that declares an actor's memory (a stage's `resources`), which our users do not
    write; the other detectors stay on."""
    config = data_context.issue_detectors_config
    config.detectors = [d for d in config.detectors if d.__name__ != "HighMemoryIssueDetector"]


def describe(context: Any, address: str | None) -> str:
    """The line a run starts with: where Ray runs, its CPUs/GPUs, and the dashboard's URL (or why none)."""
    import ray

    resources = ray.cluster_resources()
    where = f"cluster {address}" if address else "embedded Ray on this machine"
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    size = f"{cpus:g} CPU{'s' * (cpus != 1)}" + (f", {gpus:g} GPU{'s' * (gpus != 1)}" if gpus else "")
    url = getattr(context, "dashboard_url", None)
    if url:  # a cluster's own dashboard, or ours where `ray[default]` is installed
        dashboard = f"dashboard http://{url}"
    elif address:
        dashboard = "no dashboard (the cluster runs without one)"
    else:  # our pin, ray[data], has none: a dashboard costs each run seconds and memory (docs/browse.md)
        dashboard = "no dashboard (`pip install 'discomv[dashboard]'` adds one)"
    return f"ray: {where} ({size}); {dashboard}"
