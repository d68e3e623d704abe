"""bench/gpu.sh, the one run that measures every GPU path (issue #20): its CPU smoke runs every
section's code for real with tiny inputs, so the script a GPU session gets a few minutes for cannot
rot unnoticed; plus its timeout and target logic on stand-ins."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def gpu(bench_module):
    return bench_module("gpu")


def test_a_hung_section_is_killed_at_its_timeout(gpu, tmp_path: Path):
    started = time.monotonic()
    code, tail = gpu.run_command(["bash", "-c", "echo begun; sleep 60 & wait"], dict(os.environ), 1,
                                 tmp_path / "hang.log")
    assert code == 124 and time.monotonic() - started < 15
    assert tail[0] == "begun" and "timed out after 1 s" in tail[-1]
    assert (tmp_path / "hang.log").read_text() == "begun\n"


def test_targets_are_stated_met_or_missed_with_their_figure(gpu):
    rows = [{"stage": "filter", "note": "n", "ratio": 3.0,
             "figures": {"stage_over_decode": 1.2, "frames": 16, "device": "cuda:0", "precision": "bf16",
                         "stage_videos_per_s": 5.0, "decode_videos_per_s": 6.0}}]
    gpu.targets("filter", rows, smoke=False)
    assert "target filter within 1.5× of its 16-frame decode alone (cuda:0, bf16): met (1.20×" in rows[0]["note"]
    rows = [{"stage": "tokens bf16 vs fp32 (cuda)", "ratio": 0.9, "figures": {"bf16_over_fp32": 0.9}},
            {"stage": "separate", "ratio": 0.5, "figures": {"device": "cuda"}}]
    gpu.targets("features", rows[:1], smoke=True)
    gpu.targets("separate", rows[1:], smoke=False)
    assert rows[0]["target"].endswith("bf16 faster than fp32: MISSED (×0.90) (CPU smoke: not a GPU figure)")
    assert "per file (cuda): MISSED (×0.50)" in rows[1]["note"]


def test_sampler_windows(gpu):
    sampler = gpu.Sampler(None)
    assert sampler.window(0, 1) == "GPU busy not sampled (no nvidia-smi)"
    sampler.proc = object()  # as if nvidia-smi ran
    sampler.samples = [(0.5, 10.0, 100.0), (1.0, 50.0, 300.0), (2.5, 90.0, 900.0)]
    assert sampler.window(0, 2).startswith("GPU busy 30% (mean utilization.gpu, 2 samples over 2.0 s), peak 300 MiB")


@pytest.mark.slow
def test_cpu_smoke_runs_every_section_and_writes_every_row(gpu, tmp_path: Path):
    out = tmp_path / "gpu-bench"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    # The smoke takes under 3 minutes on an idle 2-core machine; the budget allows for a loaded one.
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--cpu-smoke", "--out", str(out), "--budget-s", "1500",
                           "--timeout-scale", "5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1700, check=False)
    report = out / "gpu.md"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = report.read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert tuple(lines[:2]) == gpu.HEADER
    body = lines[2:]
    expected = [(e, s.script) for s in gpu.SECTIONS for e in s.expect]
    expected += [(f"{stage} in `discomv run`", "gpu") for stage in gpu.GPU_STAGES]
    for stage, script in expected:
        assert any(line.startswith(f"| {stage}") and f"`bench/{script}.py`, quick)" in line for line in body), stage
    assert not any("FAILED" in line for line in body)
    assert all(line.count(" | ") == 4 for line in body)
    for target in ("target filter within 1.5×", "target batched faster than the demucs CLI",
                   "tokens bf16 vs fp32 (cpu): target bf16 faster", "features bf16 vs fp32 (cpu): target bf16 faster",
                   "Farneback on all"):
        assert target in text.split("Targets:")[1], target
    assert "GPU busy 0% (mean utilization.gpu" in text  # the stand-in sampler's zeros, attributed per section
    assert "## torch and CUDA" in text and (out / "nvidia-smi.txt").exists() and (out / "versions.txt").exists()
    assert {p.name for p in (out / "logs").iterdir()} == {f"{s.name}.log" for s in gpu.SECTIONS} | {"pipeline.log"}
    assert not (out / "work").exists()
