"""`discomv cost`: extrapolate measured per-stage CPU- and GPU-seconds to DISCO-MV scale.

Model (docs/cost.md): for each stage, the manifests of a real run give worker seconds per row
(`elapsed_s`) and the hours of media those rows cover. Resource-seconds = elapsed × the CPUs / GPUs
the stage reserves per worker. Cost per media-hour × the media-hours that stage sees at full scale
= the stage's CPU-hours and GPU-hours. Stages up to `filter` see every candidate; later stages see
only kept videos (47k hours at DISCO-MV scale).

With a cluster shape (`--cluster 32cpu:8,8gpu+64cpu:4`), the makespan of the whole build is modelled
two ways from the same per-stage work: stage after stage (each stage alone on the cluster, bounded by
its busier resource, the stage times summed) and streaming (every stage at once, sharing the cluster:
bounded by whichever resource the whole pipeline needs most). docs/cost.md states the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.manifest import ManifestStore

# DISCO-MV (VMAs paper): 15.3M candidates, 2.2M kept, 47k hours kept.
CANDIDATES = 15_300_000
KEPT_VIDEOS = 2_200_000
KEPT_HOURS = 47_000
CANDIDATE_STAGES = ("ingest", "download", "filter")


@dataclass
class StageCost:
    stage: str
    rows: int
    media_hours: float
    cpu_s_per_hour: float
    gpu_s_per_hour: float
    scale_hours: float

    @property
    def cpu_hours(self) -> float:
        return self.cpu_s_per_hour * self.scale_hours / 3600

    @property
    def gpu_hours(self) -> float:
        return self.gpu_s_per_hour * self.scale_hours / 3600


def media_hours_by_key(store: ManifestStore) -> dict[str, float]:
    """Hours of media per key: clip windows, else the downloaded duration, else the listed one."""
    hours: dict[str, float] = {}
    for key, row in store.latest_rows("clips").items():
        hours[key] = (row["end_s"] - row["start_s"]) / 3600 if row.get("end_s") is not None else 0.0
    for name, column in (("download", "media_duration_s"), ("ingest", "duration_s")):
        for key, row in store.latest_rows(name).items():
            if row.get(column):
                hours.setdefault(key, row[column] / 3600)
    return hours


def estimate(cfg: Config, candidate_hours: float | None = None) -> list[StageCost]:
    from stages import STAGES

    store = ManifestStore(cfg.run.manifest_root)
    hours_of = media_hours_by_key(store)
    mean_hours = sum(hours_of.values()) / max(1, len(hours_of))
    # DISCO-MV's kept videos average 47k h / 2.2M ≈ 77 s; candidates are assumed alike unless given.
    candidate_hours = candidate_hours or CANDIDATES * KEPT_HOURS / KEPT_VIDEOS
    costs = []
    for name, stage_cls in STAGES.items():
        rows = store.latest_rows(name)
        if not rows:
            continue
        res = stage_cls(cfg.stage(name), cfg.run).resources
        hours = sum(hours_of.get(key, mean_hours) for key in rows)
        seconds = sum(r.get("elapsed_s") or 0.0 for r in rows.values())
        per_hour = seconds / hours if hours else 0.0
        scale = candidate_hours if name in CANDIDATE_STAGES else KEPT_HOURS
        costs.append(StageCost(name, len(rows), hours, per_hour * res.num_cpus, per_hour * res.num_gpus, scale))
    return costs


def print_cost(costs: list[StageCost]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="discomv cost: measured here, extrapolated to DISCO-MV scale")
    for col in ("stage", "rows measured", "media h measured", "CPU-s / media-h", "GPU-s / media-h",
                "media h at scale", "CPU-hours", "GPU-hours"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for c in costs:
        table.add_row(c.stage, str(c.rows), f"{c.media_hours:.3f}", f"{c.cpu_s_per_hour:.0f}",
                      f"{c.gpu_s_per_hour:.0f}", f"{c.scale_hours:,.0f}", f"{c.cpu_hours:,.0f}", f"{c.gpu_hours:,.0f}")
    console = Console()
    console.print(table)
    if costs:
        top_cpu = max(costs, key=lambda c: c.cpu_hours)
        top_gpu = max(costs, key=lambda c: c.gpu_hours)
        console.print(f"dominant: {top_cpu.stage} ({top_cpu.cpu_hours:,.0f} CPU-hours)"
                      + (f"; on GPU {top_gpu.stage} ({top_gpu.gpu_hours:,.0f} GPU-hours)" if top_gpu.gpu_hours else ""))
        console.print("seconds are worker wall-seconds × reserved CPUs/GPUs, as recorded in the manifests; "
                      "timings from a CPU-only run price GPU stages at CPU speed (see docs/cost.md)")


@dataclass(frozen=True)
class ClusterShape:
    cpus: float
    gpus: float

    @classmethod
    def parse(cls, text: str) -> ClusterShape:
        """`32cpu:8,8gpu+64cpu:4` — comma-separated node groups, each `<resources>:<nodes>` where
        resources are `<n>cpu` and/or `<n>gpu` joined by `+`."""
        cpus = gpus = 0.0
        for group in filter(None, (g.strip() for g in text.split(","))):
            resources, _, count = group.partition(":")
            nodes = int(count) if count.strip().isdigit() else None
            parts = [re.fullmatch(r"(\d+(?:\.\d+)?)(cpu|gpu)", r.strip()) for r in resources.split("+")]
            if nodes is None or nodes < 1 or not all(parts):
                raise ValueError(f"--cluster: cannot read {group!r}; write node groups like 32cpu:8 or 8gpu+64cpu:4")
            for match in parts:
                amount = float(match.group(1)) * nodes
                cpus, gpus = (cpus + amount, gpus) if match.group(2) == "cpu" else (cpus, gpus + amount)
        if cpus <= 0:
            raise ValueError("--cluster: the cluster needs CPUs (e.g. 32cpu:8)")
        return cls(cpus, gpus)


@dataclass
class Makespan:
    stage_after_stage_h: float
    streaming_h: float
    bound: str  # the resource that bounds the streaming run
    stage_hours: dict[str, float]  # each stage alone on the cluster

    @property
    def speedup(self) -> float:
        return self.stage_after_stage_h / self.streaming_h if self.streaming_h else 0.0


def makespan(costs: list[StageCost], cluster: ClusterShape) -> Makespan:
    """Hours to build the set on `cluster`. A stage's work is its CPU-hours and GPU-hours at scale;
    on a cluster without GPUs, GPU work runs on the CPUs at the measured rate (a CPU-only measurement
    already prices it so). Stage after stage: each stage takes max(CPU work / CPUs, GPU work / GPUs)
    and the stages add up. Streaming: all stages share the cluster at once, so the run takes as long
    as its busiest resource needs: max(Σ CPU work / CPUs, Σ GPU work / GPUs) — the bound a perfect
    streaming executor reaches; pipeline fill and drain are negligible at millions of rows."""
    def split(c: StageCost) -> tuple[float, float]:
        if cluster.gpus:
            return c.cpu_hours, c.gpu_hours
        return c.cpu_hours + c.gpu_hours, 0.0

    stage_hours = {}
    for c in costs:
        cpu, gpu = split(c)
        stage_hours[c.stage] = max(cpu / cluster.cpus, gpu / cluster.gpus if cluster.gpus else 0.0)
    cpu_total = sum(split(c)[0] for c in costs) / cluster.cpus
    gpu_total = sum(split(c)[1] for c in costs) / cluster.gpus if cluster.gpus else 0.0
    return Makespan(sum(stage_hours.values()), max(cpu_total, gpu_total),
                    "GPUs" if gpu_total > cpu_total else "CPUs", stage_hours)


def print_makespan(result: Makespan, cluster: ClusterShape) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"makespan on {cluster.cpus:g} CPUs + {cluster.gpus:g} GPUs (model: docs/cost.md)")
    table.add_column("stage")
    table.add_column("hours alone on the cluster", justify="right")
    for stage, hours in result.stage_hours.items():
        table.add_row(stage, f"{hours:,.1f}")
    table.add_row("stage after stage", f"{result.stage_after_stage_h:,.1f}")
    table.add_row("streaming", f"{result.streaming_h:,.1f}")
    console = Console()
    console.print(table)
    console.print(f"streaming: {result.speedup:.2f}× stage after stage, bounded by the {result.bound}; "
                  f"add {result.bound} to go faster")
