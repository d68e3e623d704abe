"""Can the manifest recorder keep up? A streaming run's workers hand every result to one recorder actor
(pipeline/recorder.py), which appends each stage's part files. This feeds it download-shaped results
(the stage with the most rows and the smallest batches: one row per call) from several Ray tasks at
once and measures rows/s taken and appended, against the rate the pipeline could ever need.

    python bench/recorder.py [--rows 200000] [--callers 4] [--batch 1]

Baseline: the same rows appended by ManifestStore.append in one process, no actor (what the recorder
does underneath), in the same run. The figure to compare with is the fleet's download rate:
DISCO-MV's 15.3M candidates in, say, 30 days is ~6 rows/s; a 64-node fleet at 10 downloads/s per node
is 640 rows/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import describe, record  # noqa: E402 - bench/ is the script's folder


def results(n: int, start: int = 0) -> list[dict]:
    now = datetime.now(timezone.utc).isoformat()
    return [{"key": f"yt_{i:011d}", "status": "ok", "reason": "", "stage_version": "1", "params_hash": "0" * 16,
             "run_id": "bench", "weights": "none", "finished_at": now, "elapsed_s": 3.2, "node": "local",
             "video_path": f"/media/video/yt_{i:011d}.mp4", "file_bytes": 5_000_000, "media_duration_s": 212.0,
             "width": 640, "height": 360, "fps": 25.0, "vcodec": "h264", "acodec": "aac",
             "audio_sample_rate": 44100, "audio_channels": 2, "attempts": 1, "reused": False}
            for i in range(start, start + n)]


def feed(recorder, blobs: list[str]) -> int:
    import ray

    return sum(ray.get(recorder.add.remote("download", blob)) for blob in blobs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--callers", type=int, default=4, help="Ray tasks handing results at once")
    parser.add_argument("--batch", type=int, default=1, help="results per call (download: 1)")
    args = parser.parse_args()
    import pyarrow.parquet as pq
    import ray

    from pipeline.manifest import ManifestStore, full_schema
    from pipeline.recorder import ManifestRecorder
    from stages.download import Download

    header = describe("at the start")
    schema = full_schema(Download.schema)
    rows = results(args.rows)
    for row in rows:
        row["finished_at"] = datetime.fromisoformat(row["finished_at"])
    with tempfile.TemporaryDirectory() as tmp:
        store = ManifestStore(Path(tmp) / "plain")
        started = time.perf_counter()
        for i in range(0, len(rows), 16):  # run.flush_rows: what the single-stage runner appends at once
            store.append("download", schema, rows[i:i + 16])
        plain_s = time.perf_counter() - started

        ray.init(num_cpus=args.callers + 1, logging_level="ERROR", include_dashboard=False)
        actor = ray.remote(ManifestRecorder).options(num_cpus=0)
        recorder = actor.remote(str(Path(tmp) / "recorded"), [("download", schema.serialize().to_pybytes())], 16)
        blobs = [json.dumps(results(args.batch, i)) for i in range(0, args.rows, args.batch)]
        per_caller = [blobs[c::args.callers] for c in range(args.callers)]
        task = ray.remote(feed).options(num_cpus=1)
        started = time.perf_counter()
        taken = sum(ray.get([task.remote(recorder, part) for part in per_caller]))
        taken_s = time.perf_counter() - started
        ray.get(recorder.close.remote())
        recorded_s = time.perf_counter() - started
        stored = ManifestStore(Path(tmp) / "recorded")
        written = sum(pq.read_metadata(p).num_rows for p in stored.parts("download"))
        parts = len(stored.parts("download"))
        ray.shutdown()
    assert taken == written == args.rows, (taken, written, args.rows)
    print(f"\n### manifest recorder: {args.rows:,} download results, {args.callers} callers, {args.batch} per call\n")
    print(f"recorder actor: {args.rows / taken_s:,.0f} rows/s taken ({taken_s:.1f} s), all appended after "
          f"{recorded_s:.1f} s ({args.rows / recorded_s:,.0f} rows/s; {parts} part files after merging)")
    print(f"ManifestStore.append in one process, 16 rows at a time (no actor): {args.rows / plain_s:,.0f} rows/s "
          f"({plain_s:.1f} s)\nmachine: {header}")
    record("manifest recorder", f"{args.rows / recorded_s:,.0f} download rows/s recorded from {args.callers} Ray tasks, "
           f"{args.batch} per call", f"ManifestStore.append, one process, 16 rows a part: {args.rows / plain_s:,.0f} rows/s",
           plain_s / recorded_s, "a 64-node fleet at 10 downloads/s per node needs 640 rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
