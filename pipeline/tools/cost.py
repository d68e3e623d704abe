"""`discomv cost`: extrapolate measured per-stage CPU- and GPU-seconds to DISCO-MV scale.

Model (docs/cost.md): for each stage, the manifests of a real run give worker seconds per row
(`elapsed_s`) and the hours of media those rows cover. Resource-seconds = elapsed × the CPUs / GPUs
the stage reserves per worker. Cost per media-hour × the media-hours that stage sees at full scale
= the stage's CPU-hours and GPU-hours. Stages up to `filter` see every candidate; later stages see
only kept videos (47k hours at DISCO-MV scale).
"""

from __future__ import annotations

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
