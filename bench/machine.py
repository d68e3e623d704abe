"""The machine line every benchmark prints beside its figures."""

from __future__ import annotations

import os
import platform
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
