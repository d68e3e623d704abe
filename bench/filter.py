"""Benchmark the filter stage against a naive loop and against pure decoding, in one run.

    python bench/filter.py [--videos 32] [--duration 60] [--media build/bench_media] [--set frames=8 ...]

Same videos (half moving, a quarter looped stills, a quarter two-image slideshows; made once with
pipeline.synth and cached), same CLIP (ViT-B-32, random init: there are no weights offline; every
path builds it from the same seed), same 16 frame indices:

- naive: one video at a time, decode every frame, keep 16, CLIP (fp32) the 16 in one forward pass;
- stage: `Filter.process` on batches of `filter.batch_size` videos with its defaults (keyframe-aware
  seeking, parallel decode, static pre-check, one embedding per picture, early drop, forward
  passes shared across videos, `precision=auto`);
- stage, fp32: the same with `precision=fp32`, to show what bf16 adds and what it doesn't;
- decode only: the stage's frame reads alone, with the same parallelism (what the stage can't beat).

The paths run interleaved batch by batch, so load from other processes hits them alike. Prints a
Markdown table and the keep/drop agreement between naive and each stage path; exits 1 if any
decision differs.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe, record  # noqa: E402 - bench/ is the script's folder

from pipeline.media.frames import FrameReader, uniform_indices  # noqa: E402
from pipeline.models.similarity import frame_similarity  # noqa: E402
from pipeline.tools import synth  # noqa: E402
from stages import load_config_dict  # noqa: E402
from stages.filter import Filter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KINDS = ("moving", "moving", "still", "slideshow")  # half moving, half static or slideshow
NAIVE_FRAMES = 16
STAGE_PATHS = ("stage", "stage_fp32")


def make_corpus(folder: Path, n: int, duration_s: float) -> list[tuple[str, Path]]:
    """(kind, path) of n cached synthetic videos; missing ones are made two at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [(KINDS[i % len(KINDS)], folder / f"{KINDS[i % len(KINDS)]}_{i:03d}_{duration_s:g}s.mp4") for i in range(n)]

    def make(i: int) -> None:
        kind, path = wanted[i]
        if not path.exists():
            tmp = path.with_name("tmp_" + path.name)
            synth.make_video(tmp, kind, duration_s=duration_s, seed=i)
            tmp.rename(path)

    missing = [i for i, (_, path) in enumerate(wanted) if not path.exists()]
    if missing:
        print(f"making {len(missing)} synthetic {duration_s:g}s videos in {folder} (cached for next time)…", flush=True)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(make, missing))
    for _, path in wanted:
        path.read_bytes()  # warm the page cache, so no path pays the first read
    return wanted


def build_stage(**options: Any) -> Filter:
    cfg = load_config_dict({"run": {"weights": "random"}, "filter": {"embedder": "clip", **options}})
    return Filter(cfg.stage("filter"), cfg.run)


def parse_options(items: list[str]) -> dict[str, Any]:
    import yaml

    pairs = [item.split("=", 1) for item in items]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit("--set expects filter option=value, e.g. --set frames=8")
    return {key: yaml.safe_load(value) for key, value in pairs}


def naive_one(path: Path, stage: Filter, frames: int = NAIVE_FRAMES) -> tuple[float, bool]:
    """Decode every frame, keep 16 spread evenly (the stage's default indices), CLIP them in one
    forward pass."""
    import decord

    reader = decord.VideoReader(str(path))
    keep = set(uniform_indices(0, len(reader), frames))
    frames = []
    for index in range(len(reader)):
        frame = reader.next()
        if index in keep:
            frames.append(frame.asnumpy())
    similarity = frame_similarity(stage.embedder.embed(frames))
    return similarity, similarity > stage.config.threshold


def decode_only(paths: list[Path], frames: int, threads: int) -> None:
    def read(path: Path) -> None:
        reader = FrameReader(path)
        reader.read(uniform_indices(0, reader.frame_count, frames))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, paths))


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall seconds, CPU seconds of this process (all its threads), result."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per video")
    parser.add_argument("--media", default=str(REPO / "build" / "bench_media"), help="where generated videos are cached")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="filter option for the stage paths (the naive loop stays at 16 frames, fp32)")
    args = parser.parse_args()
    options = parse_options(args.set)
    machine_at_start = describe("at the start")

    corpus = make_corpus(Path(args.media), args.videos, args.duration)
    random.Random(0).shuffle(corpus)  # batches mix kinds, as a real stream would
    kind_of = {path.stem: kind for kind, path in corpus}

    stage = build_stage(**options)
    stage.setup()
    fp32 = build_stage(**{**options, "precision": "fp32"})
    fp32.setup()  # its CLIP is also the naive loop's: fp32, the same seed as the stage's
    picked = stage.identity["precision"]

    seconds: Counter = Counter()
    cpu_seconds: Counter = Counter()
    naive: dict[str, tuple[float, bool]] = {}
    decisions: dict[str, dict[str, Any]] = {name: {} for name in STAGE_PATHS}
    batch = stage.config.batch_size
    for start in range(0, len(corpus), batch):
        paths = [path for _, path in corpus[start : start + batch]]
        rows = [{"key": p.stem, "video_path": str(p)} for p in paths]
        runs = {
            "naive": lambda paths=paths: {p.stem: naive_one(p, fp32) for p in paths},
            "stage": lambda rows=rows: {r.key: r for r in stage.process(rows)},
            "stage_fp32": lambda rows=rows: {r.key: r for r in fp32.process(rows)},
            "decode": lambda paths=paths: decode_only(paths, stage.config.frames, stage.config.decode_threads),
        }
        for name, run in runs.items():
            wall, cpu, out = timed(run)
            seconds[name] += wall
            cpu_seconds[name] += cpu
            if name == "naive":
                naive.update(out)
            elif name in decisions:
                decisions[name].update(out)
        print(f"  {start + len(paths)}/{len(corpus)} videos", file=sys.stderr, flush=True)

    n = len(corpus)
    rate = {name: n / s for name, s in seconds.items()}
    described = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
    labels = {
        "naive": "naive loop: decode every frame, CLIP 16 (fp32), one video at a time",
        "stage": f"filter stage ({described}; precision=auto picked {picked})",
        "stage_fp32": f"filter stage ({described}, precision=fp32)",
        "decode": f"decode only: the stage's {stage.config.frames} frames per video (the limit)",
    }
    print(f"\n### filter: {n} videos × {args.duration:g} s, 320×240, 25 fps ({dict(Counter(kind_of.values()))})\n")
    print(
        f"machine: {machine_at_start}; decode_threads={stage.config.decode_threads}, batch_size={batch}; "
        f"CLIP {stage.embedder.model_name} weights={stage.weights_stamp}, stage precision {picked}\n"
    )
    print("| path | wall s | videos/s | × naive | CPU s per video | × naive (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("naive", "stage", "stage_fp32", "decode"):
        per_video = cpu_seconds[name] / n
        print(
            f"| {labels[name]} | {seconds[name]:.1f} | {rate[name]:.2f} | {rate[name] / rate['naive']:.2f}× "
            f"| {per_video:.3f} | {cpu_seconds['naive'] / cpu_seconds[name]:.2f}× |"
        )
    print(f"\nstage vs decode only: {seconds['stage'] / seconds['decode']:.2f}× the pure decode time")

    differ = sum(report_decisions(naive, decisions[name], kind_of, stage.config.threshold, labels[name])
                 for name in STAGE_PATHS)
    print(
        "\nrandom-init CLIP: the scores exercise the mechanics, not the semantics; with real weights "
        "the share of early drops (and so the stage's rate) will differ"
    )
    record(
        "filter",
        f"filter stage, precision={picked}: {rate['stage']:.2f} videos/s ({n} × {args.duration:g} s videos, "
        f"half moving; fp32 stage {rate['stage_fp32']:.2f}, decode-only limit {rate['decode']:.2f})",
        f"naive loop (decode all, CLIP 16 fp32, one at a time): {rate['naive']:.2f} videos/s",
        rate["stage"] / rate["naive"],
        note=f"keep/drop identical to naive: {'yes' if not differ else f'NO, {differ} differ'}; random-init CLIP",
        figures={"stage_videos_per_s": rate["stage"], "decode_videos_per_s": rate["decode"],
                 "stage_over_decode": seconds["stage"] / seconds["decode"], "frames": stage.config.frames,
                 "precision": picked, "device": str(getattr(stage.embedder, "device", "cpu")), "differ": differ},
    )
    return 1 if differ else 0


def report_decisions(
    naive: dict[str, tuple[float, bool]], fast: dict[str, Any], kind_of: dict[str, str], threshold: float, label: str
) -> int:
    """Prints how one stage path decided, against naive; returns the number of differing decisions."""
    differ = [k for k in naive if naive[k][1] != (fast[k].status == "dropped")]
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for key, result in fast.items():
        by_kind[kind_of[key]][f"{result.status} ({result.metrics.get('decided_by')})"] += 1
    scored = [k for k in fast if fast[k].metrics.get("decided_by") == "embedder"]
    delta = max((abs(fast[k].metrics["frame_similarity"] - naive[k][0]) for k in scored), default=0.0)
    closest = min(abs(naive[k][0] - threshold) for k in naive)
    print(f"\nkeep/drop decisions, naive vs {label}: {len(naive) - len(differ)}/{len(naive)} identical")
    for kind, counts in sorted(by_kind.items()):
        print(f"- {kind}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(
        f"- max |frame_similarity stage − naive| over videos the stage scored on every frame: {delta:.4f}; "
        f"naive score closest to the threshold: {closest:.3f} away"
    )
    for key in differ:
        print(f"  DIFFERENT: {key}: naive {naive[key][0]:.4f}, stage {fast[key].status} {fast[key].reason}")
    return len(differ)


if __name__ == "__main__":
    raise SystemExit(main())
