"""MB/s of the shards stage vs `tar -cf` of the same member files, one run, same machine.

The stage reads each clip's .npy artifacts, builds the sample (beats arrays, provenance JSON),
writes the tar (tarfile headers; the batch laid out by the caller, written by a second thread and
hashed by a third), fsyncs it and renames it into place, then rewrites index.parquet; `tar` only
archives member files already laid out on disk and does not fsync — the floor of what writing a
shard costs. `tar -cf` + an fsync of
its output is timed too: the baseline with the same durability. The corpus defaults to 2000 clips
(~330 MB), one full shard at the default `max_samples`, so per-call fixed costs (shard scan, index,
fsync) weigh what they weigh in a real run. The stage runs twice per round: as configured by default
(fsync) and with `shards.fsync=false`, the durability `tar` has. Rounds rotate which goes first;
best and median are shown, and CPU seconds (all the stage's threads; tar's own), which other load
on the machine disturbs much less than wall time.

A second row: the stage with `run.shard_root` on an S3 bucket (moto's server on 127.0.0.1, the real
s3fs client) vs s3fs `put` of the same tar bytes to the same server, in the same run. The stage
streams each shard to its key as a multipart upload (completed once the tar is whole) while it
builds it, then uploads its sidecar and the index; `put` only uploads finished tars — the floor of
getting the bytes into the bucket.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
from machine import describe, record  # noqa: E402 - bench/ is the script's folder

from pipeline.options import RunConfig  # noqa: E402
from stages.shards import Shards, ShardsConfig  # noqa: E402

CLIPS = int(os.environ.get("BENCH_CLIPS", "2000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "9"))
S3_ROUNDS = int(os.environ.get("BENCH_S3_ROUNDS", "3"))


def make_rows(folder: Path, clips: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        key = f"yt_bench{i:06d}_000"
        tokens, feats = folder / f"{key}.t.npy", folder / f"{key}.h.npy"
        np.save(tokens, rng.integers(0, 2048, (4, 500)).astype(np.int16))
        np.save(feats, rng.standard_normal((96, 768)).astype(np.float16))
        beats = (np.arange(500) % 25 == 0).astype(int).tolist()
        rows.append({"key": key, "video_key": key[:-4], "artist": f"a{i % 50}", "title": "bench",
                     "start_s": 0.0, "end_s": 10.0, "tokens_path": str(tokens), "features_path": str(feats),
                     "music_beats": beats, "video_beats": beats, "beat_weights": [1.0 + b for b in beats]})
    return rows


@contextlib.contextmanager
def fsync_timer() -> Iterator[list[float]]:
    """Wrap os.fsync to add up the seconds spent in it (the stage's durability cost)."""
    spent, real_fsync = [0.0], os.fsync

    def timed(fd: int) -> None:
        started = time.perf_counter()
        real_fsync(fd)
        spent[0] += time.perf_counter() - started

    os.fsync = timed
    try:
        yield spent
    finally:
        os.fsync = real_fsync


def tar_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def bench_stage(rows: list[dict], out: Path, fsync: bool = True) -> tuple[float, float, int, float]:
    """(seconds, CPU seconds, tar bytes, seconds in fsync) of one process() call over all but 2 rows."""
    stage = Shards(ShardsConfig(fsync=fsync), RunConfig(shard_root=str(out)))
    stage.setup()
    stage.process(rows[:2])  # warm-up: first-use imports (pyarrow's pandas bridge for the index)
    before = tar_bytes(out)
    with fsync_timer() as fsync_s:
        cpu, started = time.process_time(), time.perf_counter()
        results = stage.process(rows[2:])
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert all(r.status == "ok" for r in results), [r.reason for r in results if r.status != "ok"][:3]
    return seconds, cpu, tar_bytes(out) - before, fsync_s[0]


def lay_out_members(shards: Path, members: Path) -> list[str]:
    """The very members of the stage's shards as plain files, for `tar` (untimed)."""
    import tarfile

    members.mkdir()
    for shard in shards.glob("*.tar"):
        with tarfile.open(shard) as tar:
            tar.extractall(members, filter="data")
    return sorted(os.listdir(members))


def bench_tar(members: Path, names: list[str], out: Path) -> tuple[float, float, float, int]:
    """(seconds of `tar -cf`, its CPU seconds, seconds of its output's fsync, bytes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(members), *names], check=True)
    tar_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return tar_s, cpu, time.perf_counter() - started - tar_s, out.stat().st_size


def run_rounds(rows: list[dict], work: Path) -> dict[str, list[float]]:
    """Per round: MB/s and MB per CPU second of each contender, and the stage's fsync share."""
    bench_stage(rows, work / "layout")
    names = lay_out_members(work / "layout", work / "members")
    shutil.rmtree(work / "layout")
    figures: dict[str, list[float]] = {k: [] for k in ("stage", "stage_nofsync", "tar", "tar_fsync", "stage_cpu",
                                                       "stage_nofsync_cpu", "tar_cpu", "fsync_share")}
    contenders = ["stage", "stage_nofsync", "tar"]
    for i in range(ROUNDS):
        for which in contenders[i % 3:] + contenders[:i % 3]:  # each goes first in turn
            os.sync()  # untimed: nobody starts with the one before's dirty pages
            if which.startswith("stage"):
                seconds, cpu, size, fsync_s = bench_stage(rows, work / "out", fsync=which == "stage")
                figures[which].append(size / 1e6 / seconds)
                figures[f"{which}_cpu"].append(size / 1e6 / cpu)
                if which == "stage":
                    figures["fsync_share"].append(fsync_s / seconds)
                shutil.rmtree(work / "out")
            else:
                seconds, cpu, sync_s, size = bench_tar(work / "members", names, work / "plain.tar")
                figures["tar"].append(size / 1e6 / seconds)
                figures["tar_cpu"].append(size / 1e6 / cpu)
                figures["tar_fsync"].append(size / 1e6 / (seconds + sync_s))
                (work / "plain.tar").unlink()
    return figures


def bucket_rounds(rows: list[dict], work: Path) -> dict[str, list[float]]:
    """Per round, MB/s: the stage writing to a bucket, and s3fs `put` of the same tars (turns rotate)."""
    import s3fs

    from pipeline.tools.s3server import MotoServer

    figures: dict[str, list[float]] = {"stage": [], "put": []}
    with MotoServer() as server:
        fs = s3fs.S3FileSystem()
        for i in range(S3_ROUNDS):
            url = server.bucket(f"bench-shards-{i}")
            for which in (["stage", "put"] if i % 2 == 0 else ["put", "stage"]):
                if which == "stage":
                    stage = Shards(ShardsConfig(), RunConfig(shard_root=f"{url}/stage"))
                    stage.setup()
                    stage.process(rows[:2])  # warm-up, as bench_stage
                    before = sum(fs.size(p) for p in fs.glob(f"{url}/stage/*.tar"))
                    started = time.perf_counter()
                    results = stage.process(rows[2:])
                    seconds = time.perf_counter() - started
                    assert all(r.status == "ok" for r in results)
                    fs.invalidate_cache()
                    size = sum(fs.size(p) for p in fs.glob(f"{url}/stage/*.tar")) - before
                else:
                    local = work / "put"
                    if not local.exists():  # the same tar bytes, made once (untimed)
                        bench_stage(rows, local)
                    tars = sorted(local.glob("*.tar"))
                    size = sum(p.stat().st_size for p in tars)
                    started = time.perf_counter()
                    fs.put([str(p) for p in tars], f"{url}/put/")
                    seconds = time.perf_counter() - started
                figures[which].append(size / 1e6 / seconds)
            fs.rm(url, recursive=True)  # moto keeps objects in memory
    return figures


def main() -> None:
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "art").mkdir()
        rows = make_rows(work / "art", CLIPS)
        megabytes = sum(Path(r[c]).stat().st_size for r in rows for c in ("tokens_path", "features_path")) / 1e6
        figures = run_rounds(rows, work)
        bucket = bucket_rounds(rows, work)
    best = {name: max(values) for name, values in figures.items()}
    med = {name: statistics.median(values) for name, values in figures.items()}
    print(f"{CLIPS} clips (tokens 4×500 int16 + hiera 96×768 float16 + beats + json; {megabytes:.0f} MB of .npy), "
          f"{ROUNDS} rounds; MB/s of tar bytes written, best / median of the rounds\n")
    print("| shards | MB/s best | MB/s median | vs tar (best) | vs tar (median) |")
    print("|---|---|---|---|---|")
    print(f"| discomv shards stage (read .npy, build, tar + sha256, fsync, rename, index) | {best['stage']:.0f} "
          f"| {med['stage']:.0f} | {best['stage'] / best['tar']:.0%} | {med['stage'] / med['tar']:.0%} |")
    print(f"| the same stage with `shards.fsync=false` (durability of `tar`) | {best['stage_nofsync']:.0f} "
          f"| {med['stage_nofsync']:.0f} | {best['stage_nofsync'] / best['tar']:.0%} "
          f"| {med['stage_nofsync'] / med['tar']:.0%} |")
    print(f"| `tar -cf` of the same member files (no fsync) | {best['tar']:.0f} | {med['tar']:.0f} | 100% | 100% |")
    print(f"| `tar -cf` + fsync of its output | {best['tar_fsync']:.0f} | {med['tar_fsync']:.0f} "
          f"| {best['tar_fsync'] / best['tar']:.0%} | {med['tar_fsync'] / med['tar']:.0%} |")
    print(f"\nstage vs `tar -cf` + fsync (median): {med['stage'] / med['tar_fsync']:.0%}. MB per CPU second (median): "
          f"stage {med['stage_cpu']:.0f} (both threads), tar {med['tar_cpu']:.0f} — "
          f"{med['stage_cpu'] / med['tar_cpu']:.0%} of tar's CPU efficiency (fsync=false: "
          f"{med['stage_nofsync_cpu'] / med['tar_cpu']:.0%}). The stage's wait for fsync: "
          f"{med['fsync_share']:.0%} of its time (median).")
    print(f"per round, MB/s: stage {', '.join(f'{v:.0f}' for v in figures['stage'])}; fsync=false "
          f"{', '.join(f'{v:.0f}' for v in figures['stage_nofsync'])}; "
          f"tar {', '.join(f'{v:.0f}' for v in figures['tar'])}")
    record("shards", f"{med['stage']:.0f} MB/s", f"`tar -cf` {med['tar']:.0f} MB/s", round(med["stage"] / med["tar"], 3),
           f"median of {ROUNDS} rotating rounds, {CLIPS} clips; the stage fsyncs, tar does not (vs tar + fsync "
           f"{med['stage'] / med['tar_fsync']:.0%}; with shards.fsync=false {med['stage_nofsync'] / med['tar']:.0%} "
           f"of tar); best-of ratio {best['stage'] / best['tar']:.0%}; "
           f"MB per CPU second {med['stage_cpu'] / med['tar_cpu']:.0%} of tar's")
    stage_s3, put_s3 = statistics.median(bucket["stage"]), statistics.median(bucket["put"])
    print(f"\nto an S3 bucket (moto on 127.0.0.1), MB/s per round: stage {', '.join(f'{v:.0f}' for v in bucket['stage'])}; "
          f"s3fs put {', '.join(f'{v:.0f}' for v in bucket['put'])}")
    record("shards to s3://", f"{stage_s3:.0f} MB/s", f"s3fs `put` {put_s3:.0f} MB/s", round(stage_s3 / put_s3, 3),
           f"median of {S3_ROUNDS} rounds, {CLIPS} clips, moto's S3 server on 127.0.0.1 (both bound by it); the stage "
           "streams each shard as a multipart upload while building it, then sidecar and index; put uploads finished tars")

if __name__ == "__main__":
    main()
