"""Train the video→music model on DISCO-MV shards (one process, or Ray Train workers).

    python -m trainer.train --shards shards --config tiny --steps 200 --out runs/tiny
    python -m trainer.train --shards s3://bucket/shards --config 300m --ray-workers 8 --out s3-mounted/run

Config: a preset (tiny | medium | 300m) or a YAML file with the same nested keys, then `--set a.b=c`.
Checkpoints (`<out>/ckpt.pt`) hold state dicts, numbers and strings only and load with
`torch.load(weights_only=True)`; `--resume` continues at the exact step, optimizer, EMA and data position.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.config import PRESETS, TrainConfig, config_from_dict, config_to_dict, load_config
from trainer.data import count_samples, eval_batches, peek_sample, train_loader
from trainer.model import ModelConfig, VideoToMusic, random_codebook_table

log = logging.getLogger("discomv.trainer")
RANDOM_INIT, PRETRAINED = "random-init", "pretrained"
CSV_COLUMNS = ["step", "split", "loss", "ce", "contrastive", "lr", "grad_norm", "samples_per_s", "tokens_per_s"]


# ---------------------------------------------------------------------------------------------------
# Pieces of the loop


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from lr to min_lr over lr_decay_steps (nanoGPT's schedule)."""
    decay_steps = cfg.lr_decay_steps or cfg.steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only: biases, norms and embeddings are not regularised (nanoGPT).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    # Warm the decay up so the EMA is not dominated by the random init on short runs.
    decay = min(decay, (1 + step) / (10 + step))
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param.detach(), 1 - decay)


def codebook_table(cfg: TrainConfig) -> tuple[torch.Tensor, str]:
    """EnCodec's codebook vectors [K, V, E] from a local checkpoint, else a seeded random table (stamped)."""
    if not cfg.encodec:
        return random_codebook_table(cfg.model, cfg.seed), RANDOM_INIT
    from transformers import EncodecModel

    encodec = EncodecModel.from_pretrained(cfg.encodec, local_files_only=True)
    layers = encodec.quantizer.layers[: cfg.model.n_codebooks]
    return torch.stack([layer.codebook.embed.detach().float() for layer in layers]), PRETRAINED


def fit_model_to_data(cfg: TrainConfig) -> None:
    """Shapes come from the shards, not from the preset: (K, S) of tokens, (T, D) of the video features."""
    sample = peek_sample(cfg.data.shards, "train")
    cfg.model.n_codebooks, cfg.model.max_steps = (int(n) for n in sample["tokens"].shape)
    frames, cfg.model.video_dim = (int(n) for n in sample["hiera"].shape)
    cfg.model.max_frames = max(cfg.model.max_frames, frames)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in ("tokens", "video", "beat_weights")}


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime) -> dict[str, float]:
    """Mean loss over up to `eval_batches` val batches, summed across ranks (each reads its share)."""
    model.eval()
    totals = torch.zeros(4, device=rt.device)  # loss, ce, contrastive, batches
    for batch in eval_batches(cfg.data, "val", cfg.eval_batches):
        with autocast(rt.device):
            loss, parts = model(**to_device(batch, rt.device))
        one = torch.ones((), device=rt.device)
        totals += torch.stack([loss.float(), parts["ce"].float(), parts["contrastive"].float(), one])
    if rt.distributed:
        torch.distributed.all_reduce(totals)
    model.train()
    if totals[3] == 0:
        return {}
    loss, ce, contrastive = (totals[:3] / totals[3]).tolist()
    return {"loss": loss, "ce": ce, "contrastive": contrastive}


# ---------------------------------------------------------------------------------------------------
# Checkpoints: state dicts, ints, floats, strings only.


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class CsvLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(CSV_COLUMNS)

    def write(self, **row: Any) -> None:
        if self.enabled:
            with self.path.open("a", newline="") as f:
                csv.writer(f).writerow([row.get(c, "") for c in CSV_COLUMNS])


@dataclass
class TrainResult:
    losses: list[float]  # this rank's training loss per step run in this call
    step: int
    val: dict[str, float]
    num_params: int


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, resume: bool = False, rt: Runtime | None = None) -> TrainResult:
    rt = rt or Runtime(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    checkpoint = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    if checkpoint is not None:
        cfg.model = ModelConfig(**json.loads(checkpoint["config"])["model"])
    else:
        fit_model_to_data(cfg)
    torch.manual_seed(cfg.seed + rt.rank)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)

    table, table_stamp = codebook_table(cfg)
    raw_model = VideoToMusic(cfg.model, table).to(rt.device)
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    optimizer = make_optimizer(raw_model, cfg)
    step, samples_seen = 0, 0
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, samples_seen = checkpoint["step"], checkpoint["samples_seen"][rt.rank]
        torch.set_rng_state(checkpoint["rng"])
        table_stamp = checkpoint["codebook"]
    model = _wrap_for_ranks(raw_model, rt)

    if rt.is_main:
        n_train = count_samples(cfg.data.shards, "train")
        log.info("model: %.2fM params, codebooks %s; %s; train samples %s; start at step %d",
                 raw_model.num_params() / 1e6, table_stamp, rt.device, n_train or "?", step)
    csv_log = CsvLog(out / "log.csv", rt.is_main)
    batches = train_loader(cfg.data, rt.world_size, samples_seen)
    tokens_per_sample = cfg.model.n_codebooks * cfg.model.max_steps
    losses: list[float] = []
    val: dict[str, float] = {}
    window_start, window_samples = time.perf_counter(), 0

    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        with autocast(rt.device):
            loss, parts = model(**to_device(batch, rt.device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, raw_model, step, cfg.ema_decay)
        step += 1
        samples_seen += len(batch["keys"])
        window_samples += len(batch["keys"]) * rt.world_size
        losses.append(loss.item())

        if step % cfg.log_interval == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            rates = {"samples_per_s": window_samples / elapsed, "tokens_per_s": window_samples * tokens_per_sample / elapsed}
            row = {"loss": losses[-1], "ce": parts["ce"].item(), "contrastive": parts["contrastive"].item(),
                   "lr": lr, "grad_norm": grad_norm.item(), **rates}
            _log_step(csv_log, rt, step, "train", row)
            window_start, window_samples = time.perf_counter(), 0
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            val = evaluate(raw_model, cfg, rt)  # not the DDP wrapper: its forward syncs, and ranks' val shares differ
            _log_step(csv_log, rt, step, "val", val)
            _log_step(csv_log, rt, step, "val_ema", evaluate(ema, cfg, rt))
        if step % cfg.ckpt_interval == 0 or step == cfg.steps:
            state = _checkpoint_state(cfg, raw_model, ema, optimizer, step, samples_seen, table_stamp, rt)
            if rt.is_main:
                save_checkpoint(ckpt_path, state)
    return TrainResult(losses, step, val, raw_model.num_params())


def _wrap_for_ranks(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    if not rt.distributed:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def _checkpoint_state(
    cfg: TrainConfig,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    samples_seen: int,
    table_stamp: str,
    rt: Runtime,
) -> dict[str, Any]:
    seen = torch.tensor([samples_seen], device=rt.device)
    if rt.distributed:  # every rank's data position, so each resumes its own stream
        gathered = [torch.zeros_like(seen) for _ in range(rt.world_size)]
        torch.distributed.all_gather(gathered, seen)
        seen = torch.cat(gathered)
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "samples_seen": [int(n) for n in seen.tolist()],
        "rng": torch.get_rng_state(),
        "config": json.dumps(config_to_dict(cfg)),
        "codebook": table_stamp,
    }


def _log_step(csv_log: CsvLog, rt: Runtime, step: int, split: str, row: dict[str, float]) -> None:
    if not row:
        return
    if rt.distributed:
        import ray.train

        ray.train.report({"step": step, "split": split, **row})
    if not rt.is_main:
        return
    csv_log.write(step=step, split=split, **row)
    text = " ".join(f"{k} {v:.4g}" for k, v in row.items())
    print(f"step {step:>6} {split:<7} {text}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Ray Train


def _ray_worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rt = Runtime(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(), True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train(config_from_dict(loop_config["config"]), loop_config["resume"], rt)


def train_with_ray(cfg: TrainConfig, workers: int, resume: bool = False) -> None:
    """`workers` Ray Train workers (one per GPU when there are GPUs); RAY_ADDRESS joins a cluster."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.runner import ensure_ray

    ensure_ray()
    cfg.out = str(Path(cfg.out).resolve())
    cfg.data.shards = cfg.data.shards if "://" in cfg.data.shards else str(Path(cfg.data.shards).resolve())
    trainer = TorchTrainer(
        _ray_worker_loop,
        train_loop_config={"config": config_to_dict(cfg), "resume": resume},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=torch.cuda.is_available()),
        run_config=RunConfig(name="discomv-train", storage_path=str(Path(cfg.out) / "ray")),
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="discomv train", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="shard root (folder or fsspec URI) with train-/val-*.tar")
    p.add_argument("--config", default="tiny", help=f"preset ({' | '.join(PRESETS)}) or a YAML file")
    p.add_argument("--steps", type=int, help="total optimizer steps (a resume continues up to this)")
    p.add_argument("--out", help="run folder: ckpt.pt, log.csv")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt if it exists")
    p.add_argument("--ray-workers", type=int, default=0, help="train with Ray Train on N workers; 0 = this process")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.n_layer=4 --set data.batch_size=2")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"discomv train: {exc}", file=sys.stderr)
        return 2
    if args.shards:
        cfg.data.shards = args.shards
    if args.steps is not None:
        cfg.steps = args.steps
    if args.out:
        cfg.out = args.out
    if args.ray_workers > 0:
        train_with_ray(cfg, args.ray_workers, args.resume)
    else:
        train(cfg, args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
