"""The machine line every benchmark prints beside its figures."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path


def describe(when: str = "at the start") -> str:
    """CPU model, cores, torch build and threads, Python, and the 1-min load average `when`."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, 1-min load average {load:.1f} {when}")


def record(stage: str, ours: str, baseline: str, ratio: float | None, note: str = "", when: str = "at the end",
           figures: dict | None = None) -> dict:
    """One row of the combined Performance table: this project's throughput, the named baseline's
    measured in the same run, their ratio. Printed, and appended as a JSON line to $BENCH_RESULTS
    when set (`make bench` collects those lines into one Markdown table). `figures`: the raw numbers
    behind the row, for bench/gpu.py's targets (not shown in the table)."""
    import json

    row = {"stage": stage, "ours": ours, "baseline": baseline, "ratio": ratio, "note": note,
           "machine": describe(when)}
    if figures:
        row["figures"] = figures
    print("BENCH_RESULT " + json.dumps(row, ensure_ascii=False), flush=True)
    target = os.environ.get("BENCH_RESULTS")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return row


class CpuMeter:
    """The machine's busy CPU-seconds over a span (Linux /proc/stat: every process, this one's
    children and anything else running), for the ceiling a benchmark states: a runner that keeps
    a fraction `u` of the cores busy can be beaten by at most 1/u by any other runner doing at least
    its CPU work on the same machine.

        with CpuMeter() as cpu: ...
        cpu.busy_s, cpu.fraction, cpu.ceiling("the plain loop")
    """

    def __init__(self) -> None:
        self.busy_s = math.nan
        self.fraction = math.nan

    @property
    def measured(self) -> bool:
        return not math.isnan(self.fraction)

    def __enter__(self) -> CpuMeter:
        self._start = (_busy_ticks(), time.monotonic())
        return self

    def __exit__(self, *exc: object) -> None:
        ticks, now = _busy_ticks(), time.monotonic()
        if ticks is None or self._start[0] is None:
            return
        self.busy_s = (ticks - self._start[0]) / os.sysconf("SC_CLK_TCK")
        self.fraction = self.busy_s / max((now - self._start[1]) * (os.cpu_count() or 1), 1e-9)

    def describe(self) -> str:
        if not self.measured:
            return "CPU busy: not measured (Linux /proc/stat only)"
        return f"{self.busy_s:.0f} CPU-s, {self.fraction:.0%} of {os.cpu_count()} cores busy"

    def ceiling(self, runner: str) -> str:
        """The most any other runner doing at least this one's CPU work could gain on this machine."""
        if not self.measured:
            return f"ceiling: not measured ({self.describe()})"
        return (f"ceiling: {runner} kept {self.fraction:.0%} of the cores busy, so on this machine any runner "
                f"doing at least its CPU work is at most {1 / max(self.fraction, 1e-9):.2f}× it")


def _busy_ticks() -> int | None:
    """Ticks every core spent not idle since boot: user, nice, system, irq, softirq, steal."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return user + nice + system + irq + softirq + steal
