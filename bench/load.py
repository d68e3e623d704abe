"""Load: N candidates (default 1,000 small synthetic videos, every 20th broken) through every stage
(`discomv run`, ingest → shards) on this machine, sampling once a second the resident memory and
open file descriptors of the driver and of every process it started (Ray's raylet, GCS and
workers). Prints rows/s per stage (from the run's own summary lines), peak RSS of the driver and of
the workers, and open descriptors early vs late in the run (growth would be a leak).

    python bench/load.py [--candidates 1000] [--out build/load] [--executor both|stream|stages]

By default the corpus runs twice, one run after the other: the streaming `discomv run`, then
`run.executor=stages` (stage after stage); it prints both, their wall-time ratio, the peak bytes of
media on disk during each (sampled once a second), each run's busy CPU (the whole machine) with the
ceiling stage after stage's sets for streaming, and whether every stage's statuses and the shard
samples are the same (exit 1 if not).

Small models through the real code paths (as tests/test_crash.py): the figure is about the spine
(memory, descriptors, bookkeeping at 1,000 rows), not model throughput.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import CpuMeter, record  # noqa: E402

from pipeline.tools import synth  # noqa: E402
from pipeline.tools.demo import SMALL_MODELS  # noqa: E402
from pipeline.tools.localserver import LocalServer  # noqa: E402

SETTINGS = {
    **SMALL_MODELS,
    "download": {"allow_private_hosts": True, "concurrency": 2, "retries": 1, "backoff_s": 0.05},
    "clips": {"max_clips": 1},
    "beats": {"frame_size": "128x72"},
    "shards": {"max_samples": 200},
}
SUMMARY = re.compile(r"discomv: (\w+): processed (\d+) rows \((.*?)\) in ([\d.]+)s \[([\d.]+) rows/s")


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except (OSError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Sampler(threading.Thread):
    """Once a second: driver RSS, the largest worker RSS, all workers' RSS summed, descriptors."""

    def __init__(self, driver: int, media: Path) -> None:
        super().__init__(daemon=True)
        self.driver, self.media, self.samples, self.stop = driver, media, [], threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(1.0):
            others = [p for p in descendants(self.driver) if p != self.driver]
            worker_rss = [rss_mb(p) for p in others]
            self.samples.append({
                "t": time.monotonic() - started,
                "driver_rss": rss_mb(self.driver),
                "worker_rss_max": max(worker_rss, default=0.0),
                "worker_rss_sum": sum(worker_rss),
                "driver_fds": open_fds(self.driver),
                "all_fds": open_fds(self.driver) + sum(open_fds(p) for p in others),
                "processes": len(others) + 1,
                "media_bytes": media_bytes(self.media),
            })


MEDIA_FOLDERS = ("video", "instrumental", "instrumental32k")  # downloads and stems; clip artifacts stay


def media_bytes(root: Path) -> int:
    """Bytes of downloads and stems on disk now (files being written included)."""
    total = 0
    for folder, _, files in (entry for sub in MEDIA_FOLDERS for entry in os.walk(root / sub)):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--out", default="build/load")
    parser.add_argument("--executor", choices=("both", "stream", "stages"), default="both",
                        help="both: the streaming run, then stage after stage, on the same corpus (default)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    names = synth.make_copies_corpus(out / "source", args.candidates, broken_every=20)
    executors = ["stream", "stages"] if args.executor == "both" else [args.executor]
    results = {}
    with LocalServer(out / "source") as server:
        (out / "urls.txt").write_text("".join(f"{server.url}/{n}?n={i}\n" for i, n in enumerate(names)))
        for executor in executors:
            results[executor] = run_one(out / executor, out / "urls.txt", executor)
            if results[executor] is None:
                return 1
    for executor, (wall, log, samples, _, cpu) in results.items():
        report(args.candidates, executor, wall, log, samples, cpu)
    return compare(args.candidates, results) if len(results) == 2 else 0


def run_one(work: Path, urls: Path, executor: str) -> tuple[float, str, list[dict], dict, CpuMeter] | None:
    for sub in ("manifests", "media", "shards"):
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    config = {"run": {"manifest_root": str(work / "manifests"), "media_root": str(work / "media"),
                      "shard_root": str(work / "shards"), "weights": "random", "executor": executor},
              "ingest": {"inputs": [str(urls)]}, **SETTINGS}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    with CpuMeter() as cpu:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.tools.cli", "run", "-c", str(work / "config.yaml"),
                                 "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = Sampler(proc.pid, work / "media")
        sampler.start()
        log = proc.communicate()[0]
        wall = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    (work / "run.log").write_text(log)
    if proc.returncode != 0:
        print(log[-4000:])
        return None
    return wall, log, sampler.samples, outcome(work), cpu


def outcome(work: Path) -> dict:
    """Latest status and reason per key per stage, and the shard sample keys."""
    from pipeline.manifest import ManifestStore
    from pipeline.webds.index import read_shards
    from stages import STAGES

    store = ManifestStore(work / "manifests")
    statuses = {name: {r["key"]: (r["status"], r["reason"]) for r in store.latest(name).to_pylist()}
                for name in STAGES if store.latest(name) is not None}
    return {"statuses": statuses, "samples": {k for info in read_shards(work / "shards").values() for k in info.keys}}


def report(n: int, executor: str, wall: float, log: str, samples: list[dict], cpu: CpuMeter) -> None:
    print(f"\n### load ({executor}): {n} candidates through ingest → shards in {wall / 60:.1f} min "
          f"({n / wall:.2f} candidates/s end to end; machine CPU over the run: {cpu.describe()})\n")
    print("| stage | rows | statuses | seconds | rows/s |")
    print("|---|---:|---|---:|---:|")
    for stage, rows, statuses, seconds, rate in SUMMARY.findall(log):
        print(f"| {stage} | {rows} | {statuses} | {float(seconds):.0f} | {rate} |")
    quarter = max(1, len(samples) // 4)
    early, late = samples[:quarter], samples[-quarter:]
    peak = {k: max(s[k] for s in samples) for k in ("driver_rss", "worker_rss_max", "worker_rss_sum", "processes")}
    print(f"\npeak RSS: driver {peak['driver_rss']:.0f} MB; largest single worker {peak['worker_rss_max']:.0f} MB; "
          f"all Ray processes together {peak['worker_rss_sum']:.0f} MB ({peak['processes']} processes at most)")
    print(f"open descriptors, driver: max {max(s['driver_fds'] for s in early)} in the first quarter of the run, "
          f"max {max(s['driver_fds'] for s in late)} in the last; all processes: "
          f"{max(s['all_fds'] for s in early)} → {max(s['all_fds'] for s in late)}")
    record(f"load, {executor} ({n:,} candidates)",
           f"{n / wall:.2f} candidates/s end to end; driver peak RSS {peak['driver_rss']:.0f} MB",
           "", None, note=f"driver fds {max(s['driver_fds'] for s in early)} → {max(s['driver_fds'] for s in late)}")


def compare(n: int, results: dict) -> int:
    (stream_s, _, stream_samples, ours, stream_cpu), (stages_s, _, stages_samples, theirs, stages_cpu) = (
        results["stream"], results["stages"])
    peak = {name: max((s["media_bytes"] for s in samples), default=0) / 1e6
            for name, samples in (("stream", stream_samples), ("stages", stages_samples))}
    print(f"\n### streaming vs stage after stage, {n} candidates, same corpus, one after the other\n")
    print(f"wall: streaming {stream_s / 60:.1f} min, stage after stage {stages_s / 60:.1f} min "
          f"({stages_s / stream_s:.2f}× in streaming's favour)")
    print(f"machine CPU: streaming {stream_cpu.describe()}; stage after stage {stages_cpu.describe()}")
    print(stages_cpu.ceiling("stage after stage"))
    print(f"peak media (downloads + stems) on disk: streaming {peak['stream']:.0f} MB, stage after stage "
          f"{peak['stages']:.0f} MB ({peak['stages'] / max(peak['stream'], 1e-9):.1f}×); at the end: streaming "
          f"{stream_samples[-1]['media_bytes'] / 1e6:.0f} MB, stage after stage {stages_samples[-1]['media_bytes'] / 1e6:.0f} MB")
    window = re.findall(r"media window: at most .*", results["stream"][1])
    print("streaming run: " + ("; ".join(window) if window else "no media window"))
    same = ours == theirs
    print("same statuses and reasons per key in every stage, same shard samples: " + ("yes" if same else "NO"))
    record(f"streaming vs stage after stage ({n:,} candidates)",
           f"streaming `discomv run`: {stream_s / 60:.1f} min, peak media on disk {peak['stream']:.0f} MB",
           f"run.executor=stages: {stages_s / 60:.1f} min, peak media on disk {peak['stages']:.0f} MB",
           stages_s / stream_s, ("same statuses and shard samples" if same else "OUTCOMES DIFFER")
           + f"; CPU busy: streaming {stream_cpu.fraction:.0%}, stage after stage {stages_cpu.fraction:.0%}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
