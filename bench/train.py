"""Trainer throughput on this machine: samples/s and tokens/s for the tiny and medium configs.

    python bench/train.py [--steps 6] [--warmup 2] [--threads 1] [--configs tiny,medium]

Synthetic shards with the real shapes (tokens 4×500, Hiera 96×768) are written to a temp folder and
streamed through the real loop (data, forward, backward, AdamW, EMA); the first `--warmup` steps are
not timed. Tokens = EnCodec codebook tokens (4 × 500 per sample). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import describe, record  # noqa: E402 - bench/ is the script's folder

from trainer import train as train_mod  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.model import count_params  # noqa: E402

BATCH_SIZES = {"tiny": 4, "medium": 8, "300m": 16}


def write_shards(root: Path, samples: int, steps: int = 500, frames: int = 96, dim: int = 768) -> None:
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=samples, verbose=0) as sink:
        for i in range(samples):
            beats = (np.arange(steps) % 25 == 0).astype(np.int8)
            sink.write({
                "__key__": f"bench{i}_000",
                "tokens.npy": rng.integers(0, 2048, (4, steps)).astype(np.int16),
                "hiera.npy": rng.normal(size=(frames, dim)).astype(np.float16),
                "music_beats.npy": beats,
                "video_beats.npy": beats,
                "beat_weights.npy": (1 + beats).astype(np.float32),
                "json": {"bench": True},
            })


def measure(config: str, shards: Path, out: Path, warmup: int, steps: int, threads: int) -> dict[str, float]:
    overrides = [f"data.batch_size={BATCH_SIZES[config]}", f"log_interval={warmup}", "eval_interval=1000000",
                 "ckpt_interval=1000000", f"cpu_threads={threads}", "data.shuffle_buffer=8"]
    cfg = load_config(config, overrides)
    cfg.data.shards, cfg.out, cfg.steps = str(shards), str(out), warmup + steps
    import torch

    cuda = torch.cuda.is_available()  # the trainer runs on CUDA whenever there is one
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train_mod.train(cfg)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    rows = [r for r in csv.DictReader((out / "log.csv").open()) if r["split"] == "train"]
    previous_step, samples, seconds = warmup, 0, 0.0
    for row in rows[1:]:  # rows[0] closes the untimed warmup window
        window = (int(row["step"]) - previous_step) * cfg.data.batch_size
        samples, seconds = samples + window, seconds + window / float(row["samples_per_s"])
        previous_step = int(row["step"])
    return {"params": result.num_params, "batch": cfg.data.batch_size, "samples_per_s": samples / seconds,
            "tokens_per_s": samples * cfg.model.n_codebooks * cfg.model.max_steps / seconds,
            "seconds_per_step": seconds / steps, "peak_gpu_gib": peak_gib}



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared box)")
    p.add_argument("--configs", default="tiny,medium")
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    header = describe("at the start")
    lines = ["| config | params | batch | threads | s/step | samples/s | tokens/s |", "|---|---|---|---|---|---|---|"]
    measured: list[str] = []
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        write_shards(shards, samples=32)
        for config in configs:
            cfg = load_config(config, [])
            print(f"{config}: {count_params(cfg.model) / 1e6:.1f}M params (at the preset's shapes)", file=sys.stderr)
            r = measure(config, shards, Path(tmp) / config, args.warmup, args.steps, args.threads)
            lines.append(f"| {config} | {r['params'] / 1e6:.1f}M | {r['batch']} | {args.threads} | "
                         f"{r['seconds_per_step']:.2f} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:,.0f} |")
            gpu = "" if r["peak_gpu_gib"] is None else f", peak GPU memory {r['peak_gpu_gib']:.1f} GiB"
            measured.append(f"{config} ({r['params'] / 1e6:.1f}M): {r['samples_per_s']:.2f} samples/s, "
                            f"{r['tokens_per_s']:,.0f} tokens/s{gpu}")
            figures[config] = {k: r[k] for k in ("samples_per_s", "tokens_per_s", "peak_gpu_gib", "batch")}
    print(f"\nTrainer throughput, {'GPU' if figures and figures[configs[0]]['peak_gpu_gib'] is not None else 'CPU'}: "
          f"{header}\n")
    print("\n".join(lines))
    record("train", "; ".join(measured) + f" ({args.threads} thread(s))", "no baseline", None, figures=figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
