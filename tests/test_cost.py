from datetime import datetime, timezone
from pathlib import Path

from pipeline.manifest import ManifestStore, full_schema
from pipeline.tools.cost import estimate
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
