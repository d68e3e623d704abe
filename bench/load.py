"""Load: N candidates (default 1,000 small synthetic videos, every 20th broken) through every stage
(`discomv run`, ingest → shards) on this machine, sampling once a second the resident memory and
open file descriptors of the driver and of every process it started (Ray's raylet, GCS and
workers). Prints rows/s per stage (from the run's own summary lines), peak RSS of the driver and of
the workers, and open descriptors early vs late in the run (growth would be a leak).

    python bench/load.py [--candidates 1000] [--out build/load]

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
from machine import record  # noqa: E402

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
SUMMARY = re.compile(r"discomv: (\w+): processed (\d+) rows \((.*?)\) in ([\d.]+)s \[([\d.]+) rows/s\]")


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

    def __init__(self, driver: int) -> None:
        super().__init__(daemon=True)
        self.driver, self.samples, self.stop = driver, [], threading.Event()

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
            })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--out", default="build/load")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    for sub in ("manifests", "media", "shards"):
        shutil.rmtree(out / sub, ignore_errors=True)
    names = synth.make_copies_corpus(out / "source", args.candidates, broken_every=20)
    with LocalServer(out / "source") as server:
        (out / "urls.txt").write_text("".join(f"{server.url}/{n}?n={i}\n" for i, n in enumerate(names)))
        config = {"run": {"manifest_root": str(out / "manifests"), "media_root": str(out / "media"),
                          "shard_root": str(out / "shards"), "weights": "random"},
                  "ingest": {"inputs": [str(out / "urls.txt")]}, **SETTINGS}
        (out / "config.yaml").write_text(yaml.safe_dump(config))
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.tools.cli", "run", "-c", str(out / "config.yaml"),
                                 "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        log = proc.communicate()[0]
        wall = time.monotonic() - started
        sampler.stop.set()
        sampler.join()
    (out / "run.log").write_text(log)
    if proc.returncode != 0:
        print(log[-4000:])
        return 1
    report(args.candidates, wall, log, sampler.samples)
    return 0


def report(n: int, wall: float, log: str, samples: list[dict]) -> None:
    print(f"\n### load: {n} candidates through ingest → shards in {wall / 60:.1f} min "
          f"({n / wall:.2f} candidates/s end to end)\n")
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
    record("load (1,000 candidates)" if n == 1000 else f"load ({n} candidates)",
           f"{n / wall:.2f} candidates/s end to end; driver peak RSS {peak['driver_rss']:.0f} MB",
           "", None, note=f"driver fds {max(s['driver_fds'] for s in early)} → {max(s['driver_fds'] for s in late)}")


if __name__ == "__main__":
    raise SystemExit(main())
