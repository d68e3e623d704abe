"""MB/s of the shards stage vs `tar -cf` of the same member files, one run, same machine.

The stage reads each clip's .npy artifacts, builds the sample (beats arrays, provenance JSON),
writes the tar through webdataset's TarWriter while hashing it, and renames it into place; `tar`
only archives member files already laid out on disk — the floor of what writing a shard costs.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import RunConfig  # noqa: E402
from stages.shards import Shards, ShardsConfig  # noqa: E402

CLIPS = int(os.environ.get("BENCH_CLIPS", "600"))


def make_rows(folder: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(CLIPS):
        key = f"yt_bench{i:06d}_000"
        tokens, feats = folder / f"{key}.t.npy", folder / f"{key}.h.npy"
        np.save(tokens, rng.integers(0, 2048, (4, 500)).astype(np.int16))
        np.save(feats, rng.standard_normal((96, 768)).astype(np.float16))
        beats = (np.arange(500) % 25 == 0).astype(int).tolist()
        rows.append({"key": key, "video_key": key[:-4], "artist": f"a{i % 50}", "title": "bench",
                     "start_s": 0.0, "end_s": 10.0, "tokens_path": str(tokens), "features_path": str(feats),
                     "music_beats": beats, "video_beats": beats, "beat_weights": [1.0 + b for b in beats]})
    return rows


def bench_stage(rows: list[dict], out: Path) -> tuple[float, int]:
    stage = Shards(ShardsConfig(max_samples=CLIPS), RunConfig(shard_root=str(out)))
    stage.setup()  # imports webdataset (~4 s here, once per worker), like a model load: not throughput
    stage.process(rows[:2])  # warm-up: first-use imports (pyarrow's pandas bridge for the index)
    rows = rows[2:]
    started = time.perf_counter()
    results = stage.process(rows)
    seconds = time.perf_counter() - started
    assert all(r.status == "ok" for r in results)
    return seconds, sum(p.stat().st_size for p in out.glob("*.tar"))


def bench_tar(rows: list[dict], stage_out: Path, work: Path) -> tuple[float, int]:
    """Lay the very same members out as files (untimed), then time `tar -cf` over them."""
    import tarfile

    members = work / "members"
    members.mkdir()
    for shard in stage_out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            tar.extractall(members, filter="data")
    names = sorted(os.listdir(members))
    started = time.perf_counter()
    subprocess.run(["tar", "-cf", str(work / "plain.tar"), "-C", str(members), *names], check=True)
    seconds = time.perf_counter() - started
    return seconds, (work / "plain.tar").stat().st_size


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "art").mkdir()
        rows = make_rows(work / "art")
        stage_s, stage_bytes = bench_stage(rows, work / "shards")
        tar_s, tar_bytes = bench_tar(rows, work / "shards", work)
        shutil.rmtree(work / "art")
    stage_mbs, tar_mbs = stage_bytes / 1e6 / stage_s, tar_bytes / 1e6 / tar_s
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; {CLIPS} clips "
          f"(tokens 4×500 int16 + hiera 96×768 float16 + beats + json), {stage_bytes / 1e6:.0f} MB\n")
    print("| shards | MB/s | seconds | vs tar |")
    print("|---|---|---|---|")
    print(f"| discomv shards stage (read .npy, build, TarWriter + sha256, rename) | {stage_mbs:.0f} | {stage_s:.2f} "
          f"| {stage_mbs / tar_mbs:.0%} |")
    print(f"| `tar -cf` of the same member files | {tar_mbs:.0f} | {tar_s:.2f} | 100% |")


if __name__ == "__main__":
    main()
