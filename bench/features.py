"""Throughput of the tokens (EnCodec) and features (Hiera) stages on this machine's CPU.

One run per batch size (clips per process() call, one forward pass each), real architectures with
random weights (the compute is the same as with the real weights), synthetic 10 s clips made with
ffmpeg. Decode-only rates (audio window read; frame sampling + resize) are measured alongside, to
show how much of a clip's time is the CPU decode the thread pool overlaps with the model.

    python bench/features.py [--tokens-batches 1,4,8] [--features-batches 1,2,4]
                             [--device cuda --precisions fp32,bf16]

With several `--precisions`, each stage is measured in each, and a row compares bf16 with fp32 at
the largest batch (bench/gpu.py runs it so on a GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe, record  # noqa: E402 - bench/ is the script's folder

from pipeline.options import RunConfig  # noqa: E402
from pipeline.tools import synth  # noqa: E402

CLIP_S = 10.0
SOURCE_CLIPS = 4  # distinct clips in the source video; batches cycle over them


def make_media(folder: Path, size: str = "480x360") -> tuple[Path, Path]:
    duration = CLIP_S * SOURCE_CLIPS
    video = synth.make_video(folder / "bench.mp4", "moving", duration_s=duration, seed=5, size=size)
    flac = folder / "bench32k.flac"
    synth.ffmpeg("-f", "lavfi", "-i", f"aevalsrc={synth.music_expr(5)}:s=32000:d={duration}", "-ac", "1",
                 "-c:a", "flac", str(flac))
    return video, flac


def clip_rows(video: Path, flac: Path, count: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        start = CLIP_S * (i % SOURCE_CLIPS)
        rows.append({"key": f"bench_{i:03d}", "video_key": "bench", "clip_index": i, "start_s": start,
                     "end_s": start + CLIP_S, "padded_s": 0.0, "video_path": str(video),
                     "instrumental32k_path": str(flac), "media_duration_s": CLIP_S * SOURCE_CLIPS})
    return rows


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def bench_stage(stage: Any, rows: list[dict[str, Any]], batches: list[int], configure: Any) -> list[dict[str, Any]]:
    rows_out = []
    _, decode_s = timed(lambda: [stage.read_clip(row) for row in rows[:2]])
    for batch in batches:
        configure(stage, batch)
        results, elapsed = timed(stage.process, rows[:batch])
        failed = [r for r in results if r.status != "ok"]
        if failed:
            raise RuntimeError(f"{stage.name}: {failed[0].key} {failed[0].reason}")
        rows_out.append({"stage": stage.name, "precision": stage.precision, "device": str(stage.device),
                         "batch": batch, "clips": batch, "seconds": elapsed,
                         "clips_per_s": batch / elapsed, "decode_clips_per_s": 2 / decode_s})
    return rows_out


def bench_tokens(root: Path, rows: list[dict[str, Any]], batches: list[int], model: str = "encodec_32khz",
                 **options: str) -> list[dict[str, Any]]:
    import numpy as np

    from pipeline.models.encodec import encode
    from stages.tokens import Tokens, TokensConfig

    stage = Tokens(TokensConfig(model=model, **options), RunConfig(media_root=str(root), weights="random"))
    stage.setup()
    encode(stage.codec, np.zeros((1, 32000), np.float32), stage.device, stage.precision)  # warm-up

    def configure(s: Any, batch: int) -> None:
        s.config.batch_size = batch

    return bench_stage(stage, rows, batches, configure)


def bench_features(root: Path, rows: list[dict[str, Any]], batches: list[int], model: str,
                   **options: str) -> list[dict[str, Any]]:
    from pipeline.models.hiera import extract
    from stages.features import Features, FeaturesConfig

    stage = Features(FeaturesConfig(model=model, **options), RunConfig(media_root=str(root), weights="random"))
    stage.setup()
    warm = stage.read_clip(rows[0]).frames[None, :16]
    extract(stage.hiera, warm, -1, "spatial_mean", stage.device, stage.precision)  # one window: warm-up

    def configure(s: Any, batch: int) -> None:
        s.config.batch_size = batch
        s.config.windows_per_pass = batch * (s.config.frames // 16)

    return bench_stage(stage, rows, batches, configure)



def table(results: list[dict[str, Any]], models: dict[str, str]) -> str:
    lines = [
        "| stage | model (random init) | batch (clips) | seconds | clips/s | decode-only clips/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['stage']} | {models[r['stage']]}, {r['precision']} | {r['batch']} | {r['seconds']:.1f} | "
                     f"{r['clips_per_s']:.3f} | {r['decode_clips_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-batches", default="1,4,8")
    parser.add_argument("--features-batches", default="1,2,4")
    parser.add_argument("--features-model", default="hiera_base_16x224")
    parser.add_argument("--tokens-model", default="encodec_32khz")
    parser.add_argument("--device", default="auto", help="the stages' device option: auto (CPU here) | cpu | cuda")
    parser.add_argument("--precisions", default="auto", help="comma-separated: auto (the stage's choice) | fp32 | bf16")
    parser.add_argument("--video-size", default="480x360", help="WxH of the synthetic source video")
    args = parser.parse_args()
    tokens_batches = [int(b) for b in args.tokens_batches.split(",") if b]
    features_batches = [int(b) for b in args.features_batches.split(",") if b]
    precisions = [p for p in args.precisions.split(",") if p]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="discomv-bench-features-") as scratch:
        root = Path(scratch)
        video, flac = make_media(root, args.video_size)
        rows = clip_rows(video, flac, max(tokens_batches + features_batches))
        header = describe("at the start")
        results: list[dict[str, Any]] = []
        for precision in precisions:
            media = root / ("media" if len(precisions) == 1 else f"media-{precision}")
            options = {"device": args.device, "precision": precision}
            if tokens_batches:
                results += bench_tokens(media, rows, tokens_batches, args.tokens_model, **options)
            if features_batches:
                results += bench_features(media, rows, features_batches, args.features_model, **options)
    print(f"Machine: {header}\n")
    print(table(results, {"tokens": args.tokens_model, "features": args.features_model}))
    print(f"\n10 s clips ({args.video_size.replace('x', '×')} H.264 at 25 fps, 32 kHz mono FLAC); one run per row; total "
          f"{time.perf_counter() - started:.0f} s including setup.")
    record_rows(results, {"tokens": args.tokens_model, "features": args.features_model})


def record_rows(results: list[dict[str, Any]], models: dict[str, str]) -> None:
    """One combined-table row per stage (and precision, when several ran): its largest batch against
    batch 1, same run; with fp32 and bf16 both run, one more row: bf16 against fp32 at that batch."""
    for stage in ("tokens", "features"):
        ran = [r for r in results if r["stage"] == stage]
        precisions = list(dict.fromkeys(r["precision"] for r in ran))
        best_of: dict[str, dict[str, Any]] = {}
        for precision in precisions:
            rows = sorted((r for r in ran if r["precision"] == precision), key=lambda r: r["batch"])
            best, single = rows[-1], rows[0]
            best_of[precision] = best
            name = stage if len(precisions) == 1 else f"{stage} ({precision}, {best['device']})"
            ours = (f"{best['clips_per_s']:.3f} clips/s (batch {best['batch']}, {models[stage]} random init, "
                    f"{precision}); decode alone {best['decode_clips_per_s']:.1f} clips/s")
            figures = {"precision": precision, "device": best["device"], "batch": best["batch"],
                       "clips_per_s": best["clips_per_s"], "batch1_clips_per_s": single["clips_per_s"]}
            if single["batch"] == best["batch"]:
                record(name, ours, "no baseline: one batch size run", None, figures=figures)
            else:
                record(name, ours, f"batch {single['batch']}: {single['clips_per_s']:.3f} clips/s",
                       best["clips_per_s"] / single["clips_per_s"], figures=figures)
        if "fp32" in best_of and "bf16" in best_of:
            fp32, bf16 = best_of["fp32"], best_of["bf16"]
            record(f"{stage} bf16 vs fp32 ({bf16['device']})",
                   f"bf16: {bf16['clips_per_s']:.3f} clips/s (batch {bf16['batch']})",
                   f"fp32: {fp32['clips_per_s']:.3f} clips/s (batch {fp32['batch']})",
                   bf16["clips_per_s"] / fp32["clips_per_s"],
                   figures={"bf16_over_fp32": bf16["clips_per_s"] / fp32["clips_per_s"]})


if __name__ == "__main__":
    main()
