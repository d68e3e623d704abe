"""Worker faults: a Ray actor or task process SIGKILLed mid-batch is retried by Ray Data (actors
restart, tasks retry — Ray Data's defaults, which the runner keeps), and the row is neither lost
nor recorded twice."""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
import ray.cloudpickle

from pipeline.manifest import ManifestStore
from pipeline.runner import run_stage
from pipeline.stage import Resources, Result, Row
from stages.download import Download

N = 12
VICTIMS = ("k=003", "k=009")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers can't import tests/


class DieMidBatch(Download):
    """Download, but the first worker to reach a batch holding a victim key downloads the batch's
    first row and then SIGKILLs its own process before returning anything."""

    mode = "actors"

    @property
    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=4, concurrency=2 if self.mode == "actors" else None)

    def process(self, rows: list[Row]) -> list[Result]:
        markers = Path(self.run.media_root) / "kills"
        for row in rows:
            marker = markers / row["key"]
            if row["url"].endswith(VICTIMS) and not marker.exists():
                markers.mkdir(parents=True, exist_ok=True)
                super().process(rows[:1])
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        return super().process(rows)


class DieMidBatchInTasks(DieMidBatch):
    mode = "tasks"


@pytest.mark.parametrize("stage_cls", [DieMidBatch, DieMidBatchInTasks], ids=["actor", "task"])
def test_killed_worker_is_retried_and_rows_recorded_once(stage_cls, tmp_path: Path, media_dir: Path, server,
                                                         ray_local, make_config, write_lines, copy_many):
    names = copy_many(media_dir / "moving.mp4", media_dir / "faults", N)
    urls = write_lines(tmp_path / "urls.txt", [f"{server.url}/{n}?k={i:03d}" for i, n in enumerate(names)])
    cfg = make_config(tmp_path, [urls])
    run_stage("ingest", cfg, progress=False)
    ingested = ManifestStore(cfg.run.manifest_root).latest("ingest").to_pylist()
    keys = [r["key"] for r in ingested]
    victims = [r["key"] for r in ingested if r["url"].endswith(VICTIMS)]
    assert len(victims) == 2, ingested

    summary = run_stage("download", cfg, stage_cls=stage_cls, progress=False)

    kills = sorted(p.name for p in (tmp_path / "media" / "kills").iterdir())
    assert kills == sorted(victims), "each victim's first worker was killed"
    rows = ManifestStore(cfg.run.manifest_root).read("download").to_pylist()
    per_key = Counter(r["key"] for r in rows)
    assert set(per_key) == set(keys) and set(per_key.values()) == {1}, "every row once, none lost"
    assert {r["status"] for r in rows} == {"ok"} and summary.processed == N
    killed_pids = {int(p.read_text()) for p in (tmp_path / "media" / "kills").iterdir()}
    assert all(not _alive(pid) for pid in killed_pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
