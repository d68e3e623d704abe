"""Benchmark the separate stage against the `demucs` CLI run once per file, same run.

Both load the same randomly initialised model from one local folder in Demucs' `--repo` layout
(real htdemucs architecture by default) with the same settings: two stems (vocals / no_vocals),
shifts=0 (the shift offsets are random, so >0 would not compare), overlap 0.25, the model's segment.
Inputs are float32 WAVs (music from ffmpeg + an espeak-ng voice), so both decode the same samples.
Our stage runs with its residual-vocal check and instrumental probe off, i.e. the same work as the
CLI. Equality is checked on the instrumental: the CLI's float32 no_vocals.wav vs our 24-bit FLAC
(quantisation step 6e-8, far below the 1e-4 tolerance).

    python bench/separate.py [--files 10] [--seconds 5.5] [--model htdemucs|tiny] [--device cpu|cuda]

`--device cuda` runs both (the stage and the CLI's `-d`) on the GPU; bench/gpu.py uses it.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import describe, record  # noqa: E402 - bench/ is the script's folder

from pipeline.models.demucs import build_random_htdemucs, save_repo_model  # noqa: E402
from pipeline.tools import synth  # noqa: E402
from stages.separate import Separate, SeparateConfig  # noqa: E402

MODEL_NAME = "htdemucs"
SIGNATURE = "5eed0001"


def make_inputs(folder: Path, count: int, seconds: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        voice = folder / f"voice{i:02d}.wav"
        if shutil.which("espeak-ng"):
            synth._voice(voice, seed=i)
        else:  # a machine without espeak-ng (no apt): a sung-vowel stand-in, the model cannot tell
            synth.ffmpeg("-f", "lavfi", "-i", f"aevalsrc='0.3*sin(2*PI*({180 + 20 * i}+20*sin(2*PI*3*t))*t)"
                         f"*(0.6+0.4*sin(2*PI*2*t))':s=22050:d=4", str(voice))
        path = folder / f"track{i:02d}.wav"
        synth.ffmpeg(
            "-f", "lavfi", "-i", f"aevalsrc={synth.music_expr(i)}:s=44100:c=stereo:d={seconds}", "-i", str(voice),
            "-filter_complex",
            "[1:a]aresample=44100,adelay=500|500,volume=2[vo];[0:a][vo]amix=inputs=2:duration=first,volume=0.6",
            "-c:a", "pcm_f32le", str(path),
        )
        voice.unlink()
        paths.append(path)
    return paths


def duration_s(path: Path) -> float:
    import soundfile as sf

    info = sf.info(str(path))
    return info.frames / info.samplerate


def run_stage(models: Path, media: Path, inputs: list[Path], batch_size: int, batch_segments: int,
              device: str = "cpu") -> float:
    started = time.perf_counter()
    run = SimpleNamespace(media_root=str(media), models_root=str(models), weights="pretrained")
    config = SeparateConfig(shifts=0, overlap=0.25, skip_instrumental=False, residual_segments=0,
                            batch_size=batch_size, batch_segments=batch_segments, device=device)
    stage = Separate(config, run)
    stage.setup()
    rows = [{"key": p.stem, "video_path": str(p)} for p in inputs]
    for first in range(0, len(rows), batch_size):  # the runner hands an actor batch_size rows at a time
        for result in stage.process(rows[first:first + batch_size]):
            if result.status != "ok":
                raise SystemExit(f"stage failed on {result.key}: {result.reason}")
    return time.perf_counter() - started


def run_cli(repo: Path, out: Path, inputs: list[Path], device: str = "cpu") -> float:
    started = time.perf_counter()
    for path in inputs:
        cmd = [
            sys.executable, "-m", "demucs", "-n", MODEL_NAME, "--repo", str(repo), "--two-stems", "vocals",
            "--shifts", "0", "--overlap", "0.25", "--float32", "--clip-mode", "none", "-d", device,
            "-o", str(out), str(path),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"demucs CLI failed on {path.name}: {proc.stderr[-1500:]}")
    return time.perf_counter() - started


def segment_frames(model: object) -> int:
    return int(float(model.segment) * model.samplerate)


def model_seconds_per_segment(model: object, passes: int = 3, device: str = "cpu") -> float:
    """Seconds of the fastest of `passes` bare forward passes over one segment (after a warm-up):
    the floor of any runner's cost per segment at these settings on this machine."""
    import torch

    model = model.to(device)
    segment = torch.randn(1, 2, segment_frames(model)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        model(segment)
        for _ in range(passes):
            sync()
            started = time.perf_counter()
            model(segment)
            sync()
            times.append(time.perf_counter() - started)
    return min(times)


def segments_of(path: Path, model: object, overlap: float = 0.25) -> int:
    """Model calls Demucs' split makes for this file: one per stride, each a whole segment."""
    import soundfile as sf

    stride = int((1 - overlap) * segment_frames(model))
    return math.ceil(sf.info(str(path)).frames / stride)


def max_difference(media: Path, cli_out: Path, inputs: list[Path]) -> float:
    import numpy as np
    import soundfile as sf

    worst = 0.0
    for path in inputs:
        ours, _ = sf.read(str(media / "instrumental" / f"{path.stem}.flac"), dtype="float32")
        theirs, _ = sf.read(str(cli_out / MODEL_NAME / path.stem / "no_vocals.wav"), dtype="float32")
        if ours.shape != theirs.shape:
            raise SystemExit(f"{path.name}: shapes differ, ours {ours.shape} vs CLI {theirs.shape}")
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.5, help="per file (≤ 5.85 s = one segment)")
    parser.add_argument("--model", choices=["htdemucs", "tiny"], default="htdemucs",
                        help="random-init architecture: the real htdemucs, or a small one for a quick check")
    parser.add_argument("--batch-size", type=int, default=4, help="tracks per process() call")
    parser.add_argument("--batch-segments", type=int, default=0, help="segments per model call (0 = the stage's auto)")
    parser.add_argument("--work", type=Path, default=None, help="keep inputs and outputs here")
    parser.add_argument("--device", default="cpu", help="torch device of both runners: cpu | cuda")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max |ours − CLI| on the instrumental (on a GPU, TF32 convolutions differ more)")
    args = parser.parse_args()

    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-separate-"))
    inputs = make_inputs(work / "inputs", args.files, args.seconds)
    audio_s = sum(duration_s(p) for p in inputs)
    torch.manual_seed(0)
    repo = work / "models" / "demucs" / MODEL_NAME
    model = build_random_htdemucs(args.model).eval()
    save_repo_model(model, repo, MODEL_NAME, SIGNATURE, fmt="th")

    stage_s = run_stage(work / "models", work / "media", inputs, args.batch_size, args.batch_segments, args.device)
    cli_s = run_cli(repo, work / "cli", inputs, args.device)
    segments = sum(segments_of(p, model) for p in inputs)
    floor_s = segments * model_seconds_per_segment(model, device=args.device)
    difference = max_difference(work / "media", work / "cli", inputs)

    print(f"\n### separate: {args.files} files × {args.seconds:g} s, random-init {args.model} "
          f"({'real architecture' if args.model == 'htdemucs' else 'small'}), shifts=0, overlap=0.25\n")
    print("| runner | wall s | audio-s per wall-s |")
    print("|---|---:|---:|")
    print(f"| `python -m demucs --two-stems vocals`, once per file | {cli_s:.1f} | {audio_s / cli_s:.3f} |")
    batching = f"{args.batch_segments} segments per call" if args.batch_segments else "auto batch"
    print(f"| separate stage (model loaded once, {batching}, decode ahead) | {stage_s:.1f} | "
          f"{audio_s / stage_s:.3f} |")
    print(f"| bare model forward passes only, {segments} segments × the fastest of 3 (floor of any runner) "
          f"| {floor_s:.1f} | "
          f"{audio_s / floor_s:.3f} |")
    print(f"\nspeed-up ×{cli_s / stage_s:.2f}; instrumental max |ours − CLI| = {difference:.2e} "
          f"({'within' if difference <= args.tolerance else 'OVER'} {args.tolerance:g}); audio {audio_s:.1f} s")
    print(f"ceiling at these settings: the CLI's time over the bare forward passes = ×{cli_s / floor_s:.2f} "
          f"(what a runner with zero overhead would reach)")
    print(f"machine: {describe('at the end')}")
    if difference > args.tolerance:
        raise SystemExit(1)
    on = "" if args.device == "cpu" else f", {args.device}"
    record("separate", f"{audio_s / stage_s:.3f} audio-s/s (model once, {batching}; "
           f"{args.files} × {args.seconds:g} s, random-init {args.model}{on})",
           f"`python -m demucs --two-stems vocals` per file{on}: {audio_s / cli_s:.3f} audio-s/s", cli_s / stage_s,
           f"instrumental max |ours − CLI| = {difference:.1e}; zero-overhead ceiling ×{cli_s / floor_s:.2f}",
           figures={"stage_s": stage_s, "cli_s": cli_s, "floor_s": floor_s, "device": args.device})


if __name__ == "__main__":
    main()
