from datetime import datetime, timezone
from pathlib import Path

import pytest

from pipeline.manifest import ManifestStore, full_schema
from pipeline.tools.cost import ClusterShape, StageCost, estimate, makespan
from stages import STAGES


def rows(stage: str, n: int, elapsed: float, **columns) -> list[dict]:
    now = datetime.now(timezone.utc)
    return [{"key": f"url_{i}", "status": "ok", "reason": "", "stage_version": "1", "params_hash": "p",
             "weights": "none", "run_id": "r", "finished_at": now, "elapsed_s": elapsed, "node": "n", **columns}
            for i in range(n)]


def test_cost_is_measured_seconds_per_media_hour_times_scale(tmp_path: Path, make_config):
    cfg = make_config(tmp_path, ["x"], download={"num_cpus": 0.5})
    store = ManifestStore(cfg.run.manifest_root)
    store.append("ingest", full_schema(STAGES["ingest"].schema), rows("ingest", 4, 0.0, duration_s=1800.0))
    store.append("download", full_schema(STAGES["download"].schema), rows("download", 4, 36.0, media_duration_s=3600.0))
    costs = {c.stage: c for c in estimate(cfg, candidate_hours=1000)}
    download = costs["download"]
    assert download.media_hours == 4.0
    assert download.cpu_s_per_hour == 36.0 * 0.5  # 36 s per media-hour on a 0.5-CPU worker
    assert download.cpu_hours == 18.0 * 1000 / 3600
    assert download.gpu_hours == 0


def cost(stage: str, cpu_hours: float, gpu_hours: float) -> StageCost:
    return StageCost(stage, 1, 1.0, cpu_hours * 3600, gpu_hours * 3600, 1.0)


def test_cluster_shapes_are_read_and_bad_ones_named():
    assert ClusterShape.parse("32cpu:8,8gpu+64cpu:4") == ClusterShape(cpus=32 * 8 + 64 * 4, gpus=32)
    for bad in ("32cpu", "32cores:2", "8gpu:2", "32cpu:0"):
        with pytest.raises(ValueError, match="--cluster"):
            ClusterShape.parse(bad)


def test_makespan_stage_after_stage_vs_streaming_by_hand():
    """download 1000 CPU-h, filter 200 CPU-h + 100 GPU-h, features 50 CPU-h + 400 GPU-h on 100 CPUs and
    10 GPUs: alone, the stages take 10, max(2, 10) = 10 and max(0.5, 40) = 40 h → 60 h one after another;
    streaming, the CPUs need 12.5 h and the GPUs 50 h → 50 h, GPU-bound."""
    costs = [cost("download", 1000, 0), cost("filter", 200, 100), cost("features", 50, 400)]
    result = makespan(costs, ClusterShape(cpus=100, gpus=10))
    assert result.stage_hours == {"download": 10.0, "filter": 10.0, "features": 40.0}
    assert result.stage_after_stage_h == 60.0 and result.streaming_h == 50.0 and result.bound == "GPUs"
    assert result.speedup == pytest.approx(1.2)
    cpu_only = makespan(costs, ClusterShape(cpus=100, gpus=0))  # GPU work runs on the CPUs
    assert cpu_only.streaming_h == pytest.approx((1250 + 500) / 100) == cpu_only.stage_after_stage_h
