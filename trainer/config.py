"""The trainer's config: presets (tiny | medium | 300m) or a YAML file with the same nested keys, then
`--set a.b=c` overrides; unknown keys fail naming the key and the choices."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.data import DataConfig
from trainer.model import ModelConfig


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "runs/train"
    steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    lr_decay_steps: int = 0  # 0: decay over `steps`
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    log_interval: int = 10
    eval_interval: int = 200
    eval_batches: int = 20
    ckpt_interval: int = 500
    encodec: str = ""  # local facebook/encodec_32khz folder for the codebook table; "" = random-init, stamped
    seed: int = 0
    cpu_threads: int = 0  # 0 = torch's default; 1 is far faster on a CPU box shared with other jobs


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"n_layer": 2, "n_head": 2, "d_model": 64},
        "data": {"batch_size": 4, "shuffle_buffer": 16},
        "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10, "log_interval": 10, "eval_interval": 50,
        "eval_batches": 4, "ckpt_interval": 100,
    },
    "medium": {
        "model": {"n_layer": 4, "n_head": 4, "d_model": 256},
        "data": {"batch_size": 8},
        "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 200,
    },
    "300m": {
        "model": {"n_layer": 18, "n_head": 16, "d_model": 1024, "dropout": 0.1},
        "data": {"batch_size": 16, "num_workers": 4, "shuffle_buffer": 2000},
        "steps": 100_000, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 2000, "eval_interval": 1000,
        "eval_batches": 50, "ckpt_interval": 2000,
    },
}


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    for key, value in _flatten(raw):
        set_key(cfg, key, value)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _flatten(raw: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in raw.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def set_key(cfg: Any, dotted: str, value: Any) -> None:
    """`set_key(cfg, "model.n_layer", 4)`; unknown keys fail naming the key and the choices."""
    *parents, leaf = dotted.split(".")
    target = cfg
    for name in parents:
        target = getattr(target, name, None)
        if not dataclasses.is_dataclass(target):
            raise KeyError(f"unknown config section {dotted!r}")
    names = {f.name: f for f in dataclasses.fields(target)}
    if leaf not in names:
        raise KeyError(f"unknown config key {dotted!r}; {'.'.join(parents) or 'top level'} has {sorted(names)}")
    current = getattr(target, leaf)
    setattr(target, leaf, type(current)(value) if isinstance(current, int | float | str) else value)


def load_config(name_or_path: str, overrides: list[str]) -> TrainConfig:
    if name_or_path in PRESETS:
        raw = copy.deepcopy(PRESETS[name_or_path])
    else:
        raw = yaml.safe_load(Path(name_or_path).read_text()) or {}
    cfg = config_from_dict(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        set_key(cfg, key, yaml.safe_load(value))
    return cfg
