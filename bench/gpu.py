"""GPU figures in one prepared run (issue #20): every GPU path of the project measured by the bench/*.py
scripts with GPU arguments, each in its own process under its own timeout, inside one overall budget,
with the GPU's busy fraction sampled while each runs. Called by bench/gpu.sh (which installs first).

    python bench/gpu.py [--budget-s 480] [--out build/gpu-bench] [--only filter,train] [--cpu-smoke]

Sections: filter (CLIP ViT-B-32 on CUDA) against its 16-frame decode alone; separate (htdemucs,
segments batched across tracks) against the `demucs` CLI per file on the same GPU; tokens (EnCodec)
and features (Hiera-Base) fp32 against bf16, batch 1 against batched; beats RAFT-small on the GPU
against Farneback on the CPU; the trainer's medium and 300m configs (samples/s, peak GPU memory); and
`discomv run` over the demo corpus with every GPU stage on the GPU, the busy fraction per stage.
Every model is random-init (run.weights=random): no model hub is reachable; the compute is the real
architectures'. A section that fails or runs out of time is a FAILED row with its last output line;
the others go on. Writes <out>/gpu.md (the README's table format, the targets met or missed, the
torch/CUDA versions and `nvidia-smi`), <out>/nvidia-smi.txt and <out>/logs/<section>.log.

`--cpu-smoke`: the same sections on the CPU with tiny inputs and small models, a stand-in sampler
instead of nvidia-smi (tests/test_gpu_bench.py runs it, so this script cannot rot unnoticed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from run_all import HEADER, ScriptRun, read_rows, table_rows  # noqa: E402 - bench/ is the script's folder

SMI_QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "200"]
# --cpu-smoke: prints what nvidia-smi would, so the sampling and attribution code runs without a GPU
STAND_IN_SAMPLER = [sys.executable, "-c", "import time\nwhile True:\n print('0, 0', flush=True); time.sleep(0.2)"]
FILTER_TARGET = 1.5  # the filter stage within 1.5× of its 16-frame decode alone
RANDOM_INIT = "random-init weights (run.weights=random: no model hub reachable)"


@dataclass
class Section:
    name: str
    script: str  # bench/<script>.py
    gpu: list[str]  # its arguments on a GPU machine
    smoke: list[str]  # its arguments for --cpu-smoke
    timeout_s: float
    expect: tuple[str, ...]  # stage names of the rows it must record (the smoke test checks them)


SECTIONS = [
    Section("filter", "filter", ["--videos", "24", "--duration", "20", "--set", "num_gpus=1", "--set", "batch_size=12",
                                 "--set", "decode_threads=12"],
            ["--videos", "2", "--duration", "3", "--set", "model=ViT-S-32"], 110, ("filter",)),
    Section("separate", "separate", ["--files", "6", "--seconds", "5.5", "--batch-size", "6", "--device", "cuda",
                                     "--tolerance", "1e-3"],
            ["--files", "1", "--seconds", "2", "--model", "tiny", "--device", "cpu"], 120, ("separate",)),
    Section("features", "features", ["--device", "cuda", "--precisions", "fp32,bf16", "--tokens-batches", "1,16",
                                     "--features-batches", "1,8"],
            ["--device", "cpu", "--precisions", "fp32,bf16", "--tokens-batches", "1,2", "--features-batches", "1,2",
             "--tokens-model", "encodec_32khz_test", "--features-model", "hiera_test_16x224", "--video-size", "160x120"],
            100,
            ("tokens (fp32", "tokens (bf16", "tokens bf16 vs fp32", "features (fp32", "features (bf16",
             "features bf16 vs fp32")),
    Section("beats", "beats", ["--device", "cuda", "--clips", "2"],
            ["--device", "cpu", "--clips", "1", "--size", "160x120", "--raft-iters", "2"], 90, ("beats",)),
    Section("train", "train", ["--configs", "medium,300m", "--steps", "10", "--warmup", "3", "--threads", "4"],
            ["--configs", "tiny", "--steps", "2", "--warmup", "1"], 90, ("train",)),
]
PIPELINE_TIMEOUT_S = 180
GPU_STAGES = ("filter", "separate", "beats", "tokens", "features")
# `discomv run` on the GPU: every GPU stage one actor with the whole GPU (stages run one after another)
PIPELINE_GPU = {
    "filter": {"embedder": "clip", "num_gpus": 1, "concurrency": 1},  # decode in CPU tasks (decode_cpus=1)
    "separate": {"num_gpus": 1},
    "beats": {"flow_method": "raft_small", "num_gpus": 1},
    "tokens": {"num_gpus": 1},
    "features": {"num_gpus": 1},
}


class Sampler:
    """nvidia-smi's utilization.gpu (the share of the last sample period a kernel ran) and memory.used
    every 200 ms, timestamped, for the whole run; each section reads its own window."""

    def __init__(self, command: list[str] | None) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        if command and shutil.which(command[0]):
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.monotonic(), util, mem))

    def window(self, start: float, end: float) -> str:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if self.proc is None:
            return "GPU busy not sampled (no nvidia-smi)"
        if not inside:
            return f"GPU busy: no sample in {end - start:.1f} s"
        busy = sum(s[1] for s in inside) / len(inside)
        return (f"GPU busy {busy:.0f}% (mean utilization.gpu, {len(inside)} samples over {end - start:.1f} s), "
                f"peak {max(s[2] for s in inside):.0f} MiB used")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def run_command(cmd: list[str], env: dict[str, str], timeout_s: float, log: Path,
                on_line: Callable[[str], None] | None = None) -> tuple[int, list[str]]:
    """Run in its own process group, output echoed and logged; past timeout_s the group is killed
    and the exit code is 124. Returns (exit code, last 20 lines)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=20)
    with log.open("w", encoding="utf-8") as out, subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            start_new_session=True) as proc:

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                out.write(line)
                tail.append(line.rstrip("\n"))
                if on_line:
                    on_line(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            code = 124
            tail.append(f"timed out after {timeout_s:.0f} s (its section's timeout or the budget)")
        reader.join(timeout=10)
    return code, list(tail)


def targets(name: str, rows: list[dict], smoke: bool) -> None:
    """Append each GPU target, met or missed with its figure, to the note of the row it is about."""
    cpu = " (CPU smoke: not a GPU figure)" if smoke else ""
    for row in rows:
        figures, stage = row.get("figures") or {}, row["stage"]
        verdict = None
        if name == "filter" and "stage_over_decode" in figures:
            x = figures["stage_over_decode"]
            verdict = (f"target filter within {FILTER_TARGET}× of its {figures['frames']}-frame decode alone "
                       f"({figures['device']}, {figures['precision']}): {'met' if x <= FILTER_TARGET else 'MISSED'} "
                       f"({x:.2f}×: {figures['stage_videos_per_s']:.2f} vs {figures['decode_videos_per_s']:.2f} videos/s)")
        elif name == "separate" and row.get("ratio") is not None:
            verdict = (f"target batched faster than the demucs CLI per file ({figures.get('device')}): "
                       f"{'met' if row['ratio'] > 1 else 'MISSED'} (×{row['ratio']:.2f})")
        elif "bf16_over_fp32" in figures:
            x = figures["bf16_over_fp32"]
            verdict = f"target bf16 faster than fp32: {'met' if x > 1 else 'MISSED'} (×{x:.2f})"
        elif name == "beats" and "raft_s" in figures:
            cores = os.cpu_count() or 1
            verdict = (f"RAFT-small ({figures['device']}) takes {figures['raft_s'] / figures['farneback_s']:.2f}× "
                       f"Farneback's time on one CPU process; Farneback on all {cores} cores ≈ {cores}× its rate "
                       f"(estimate), so RAFT on the GPU ÷ Farneback on the CPUs ≈ "
                       f"{figures['farneback_s'] / figures['raft_s'] / cores:.2f} (no target: reported)")
        elif name == "train" and stage == "train":
            verdict = "no target: samples/s and peak GPU memory reported"
        if verdict:
            row["note"] = "; ".join(filter(None, [row.get("note", ""), verdict + cpu]))
            row["target"] = f"{stage}: {verdict}{cpu}"


def run_section(section: Section, smoke: bool, env: dict[str, str], timeout_s: float, out: Path,
                sampler: Sampler) -> ScriptRun:
    argv = list(section.smoke if smoke else section.gpu)
    work = out / "work" / section.name
    if section.name == "filter":
        argv += ["--media", str(work / "media")]
    elif section.name == "separate":
        argv += ["--work", str(work)]
    results = out / "results" / f"{section.name}.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    print(f"== {section.name}: bench/{section.script}.py {' '.join(argv)} (timeout {timeout_s:.0f} s)", flush=True)
    started = time.monotonic()
    code, tail = run_command([sys.executable, str(BENCH / f"{section.script}.py"), *argv],
                             {**env, "BENCH_RESULTS": str(results)}, timeout_s, out / "logs" / f"{section.name}.log")
    ended = time.monotonic()
    rows = read_rows(results)
    busy = sampler.window(started, ended)
    targets(section.name, rows, smoke)
    for row in rows:
        row["note"] = "; ".join(filter(None, [row.get("note", ""), busy]))
    missing = [e for e in section.expect if not any(r["stage"].startswith(e) for r in rows)]
    if code == 0 and missing:
        tail.append(f"rows missing: {', '.join(missing)}")
        code = 1
    return ScriptRun(section.script, code, rows, tail, ended - started)


def run_pipeline(smoke: bool, env: dict[str, str], timeout_s: float, out: Path, sampler: Sampler) -> ScriptRun:
    """`discomv run` over the demo corpus, the GPU stages on the GPU; each stage's window runs from the
    previous stage's summary line to its own, and the sampler's samples in it give its busy fraction."""
    import yaml
    from e2e import write_run_config

    from pipeline.tools.demo import make_corpus, write_disco_parquet
    from pipeline.tools.localserver import LocalServer
    from stages import STAGES

    work = out / "work" / "pipeline"
    shutil.rmtree(work, ignore_errors=True)
    print(f"== pipeline: `discomv run` over the demo corpus (timeout {timeout_s:.0f} s)", flush=True)
    started = time.monotonic()
    ends: dict[str, tuple[float, str]] = {}
    summary = re.compile(r"discomv: (\w+): (.*)")

    def on_line(line: str) -> None:
        match = summary.search(line)
        if match and match.group(1) in STAGES and match.group(1) not in ends:
            ends[match.group(1)] = (time.monotonic(), match.group(2).strip())

    entries = make_corpus(work / "source", 2 if smoke else 6, duration_s=12.0 if smoke else 20.0)
    with LocalServer(work / "source") as server:
        parquet = write_disco_parquet(work / "disco10m.parquet", server.url, entries)
        config_path = write_run_config(work / "run", [f"disco10m={parquet}"], fast=smoke)
        config = yaml.safe_load(config_path.read_text())
        for section, values in ({} if smoke else PIPELINE_GPU).items():
            config.setdefault(section, {}).update(values)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "pipeline.tools.cli", "run", "-c", str(config_path), "--no-progress"]
        remaining = timeout_s - (time.monotonic() - started)
        code, tail = run_command(cmd, env, remaining, out / "logs" / "pipeline.log", on_line)
    rows, previous = [], started
    for name in STAGES:
        if name not in ends:
            break
        end, line = ends[name]
        if name in GPU_STAGES:
            where = "CPU smoke, small models" if smoke else "GPU: " + json.dumps(PIPELINE_GPU[name])
            rows.append({"stage": f"{name} in `discomv run`", "ours": sampler.window(previous, end),
                         "baseline": "no baseline", "ratio": None, "note": f"{line}; {where}; {RANDOM_INIT}",
                         "machine": machine_line()})
        previous = end
    missing = [n for n in GPU_STAGES if not any(r["stage"].startswith(n) for r in rows)]
    if code == 0 and missing:
        code, tail = 1, [*tail, f"no summary line for: {', '.join(missing)}"]
    return ScriptRun("gpu", code, rows, tail, time.monotonic() - started)


def machine_line() -> str:
    from machine import describe

    return describe("at the end")


def versions() -> str:
    import torch

    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
             f"Python {sys.version.split()[0]}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{props.major}.{props.minor}, {props.multi_processor_count} SMs; bf16 supported: "
                     f"{torch.cuda.is_bf16_supported()}")
    else:
        lines.append("GPU: none visible to torch")
    return "\n".join(lines)


def nvidia_smi() -> str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi: not on this machine"
    proc = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False, timeout=30)
    return proc.stdout + proc.stderr


def write_report(out: Path, runs: list[ScriptRun], smoke: bool, command: str, seconds: float, budget_s: float,
                 env_text: str, smi: str) -> Path:
    machine = machine_line()
    table = [*HEADER, *(line for run in runs for line in table_rows(run, smoke, machine))]
    goals = [row["target"] for run in runs for row in run.rows if "target" in row]
    mode = "CPU smoke (tiny inputs, small models: not GPU figures)" if smoke else "GPU"
    text = [
        "# GPU figures", "",
        f"Written by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {mode}, in {seconds:.0f} s "
        f"(budget {budget_s:.0f} s; " + ", ".join(f"{r.name} {r.seconds:.0f} s" for r in runs) + "). "
        f"Every model is random-init: {RANDOM_INIT}; the compute is the real architectures'.", "",
        *table, "", "Targets:", "", *(f"- {goal}" for goal in goals or ["(none measured)"]), "",
        "## torch and CUDA", "", "```", env_text, "```", "", "## nvidia-smi", "", "```", smi.rstrip(), "```", "",
    ]
    path = out / "gpu.md"
    path.write_text("\n".join(text), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=None, help="hard limit for all sections "
                        "(default 480; 170 with --cpu-smoke)")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "gpu-bench")
    parser.add_argument("--only", default="", help="comma-separated sections: "
                        + ",".join([s.name for s in SECTIONS] + ["pipeline"]))
    parser.add_argument("--cpu-smoke", action="store_true", help="on the CPU, tiny inputs: checks the script runs")
    parser.add_argument("--keep-work", action="store_true", help="keep <out>/work (media, outputs)")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply each section's timeout (a loaded machine; the budget still holds)")
    args = parser.parse_args(argv)
    budget_s = args.budget_s or (170.0 if args.cpu_smoke else 480.0)
    deadline = time.monotonic() + budget_s
    names = [s.name for s in SECTIONS] + ["pipeline"]
    only = [n for n in args.only.split(",") if n]
    if set(only) - set(names):
        raise SystemExit(f"--only: no section {', '.join(sorted(set(only) - set(names)))}; there are {', '.join(names)}")
    chosen = only or names
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA GPU visible to torch {torch.__version__}: run on a GPU machine, or --cpu-smoke")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded Ray, this machine
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke is the CPU path even where a GPU is there
    env_text, smi = versions(), ("(CPU smoke: nvidia-smi not run)" if args.cpu_smoke else nvidia_smi())
    (out / "nvidia-smi.txt").write_text(smi, encoding="utf-8")
    (out / "versions.txt").write_text(env_text + "\n", encoding="utf-8")
    print(env_text, flush=True)
    sampler = Sampler(STAND_IN_SAMPLER if args.cpu_smoke else SMI_QUERY)
    started = time.monotonic()
    runs: list[ScriptRun] = []
    try:
        for name in chosen:
            left = deadline - time.monotonic()
            section = next((s for s in SECTIONS if s.name == name), None)
            script = section.script if section else "gpu"
            if left < 15:
                runs.append(ScriptRun(script, 124, [], [f"skipped: the {budget_s:.0f} s budget is spent"]))
                continue
            try:
                if section:
                    timeout = min(section.timeout_s * args.timeout_scale, left)
                    runs.append(run_section(section, args.cpu_smoke, env, timeout, out, sampler))
                else:
                    timeout = min(PIPELINE_TIMEOUT_S * args.timeout_scale, left)
                    runs.append(run_pipeline(args.cpu_smoke, env, timeout, out, sampler))
            except Exception as e:  # the section's own setup failed: report it, go on with the rest
                runs.append(ScriptRun(script, 1, [], [f"{type(e).__name__}: {e}"]))
    finally:
        sampler.stop()
        if not args.keep_work:
            shutil.rmtree(out / "work", ignore_errors=True)
    command = " ".join(["bench/gpu.sh", *(sys.argv[1:] if argv is None else argv)])
    report = write_report(out, runs, args.cpu_smoke, command, time.monotonic() - started, budget_s, env_text, smi)
    print("\n" + report.read_text(encoding="utf-8") + f"\nwritten to {report}")
    failed = [r for r in runs if r.exit_code != 0 or not r.rows]
    if failed:
        print(f"{len(failed)} section(s) failed: " + ", ".join(f"{r.name} (exit {r.exit_code})" for r in failed),
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
