"""The bundled trainer on CPU with the tiny config: shards made here, with structure a model can learn."""

from __future__ import annotations

import csv
import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from pipeline.webds.sample import load_npy
from trainer import generate
from trainer import train as train_mod
from trainer.config import TrainConfig, load_config, set_key
from trainer.data import DataConfig, eval_batches, train_loader
from trainer.model import (
    ModelConfig,
    VideoToMusic,
    apply_delay,
    beat_weighted_cross_entropy,
    count_params,
    symmetric_info_nce,
    undo_delay,
)

STEPS, FRAMES, DIM, CLASSES = 48, 8, 16, 4  # small clips keep CPU tests fast; shapes are read from the data


def make_shards(root: Path, n_train: int = 8, n_val: int = 4, per_shard: int = 4, seed: int = 0) -> Path:
    """Each clip has a class; its video is the class prototype + noise and its tokens a class-specific
    periodic pattern, so the tokens are predictable from the video."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(CLASSES, FRAMES, DIM))
    t = np.arange(STEPS)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        with wds.ShardWriter(str(root / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i in range(n):
                c = i % CLASSES
                tokens = np.stack([(c * 97 + k * 13 + (t % 8) * (k + 1)) % 2048 for k in range(4)])
                beats = (t % 10 == 0).astype(np.int8)
                sink.write({
                    "__key__": f"{split}vid{i}_000",
                    "tokens.npy": tokens.astype(np.int16),
                    "hiera.npy": (prototypes[c] + 0.1 * rng.normal(size=(FRAMES, DIM))).astype(np.float16),
                    "music_beats.npy": beats,
                    "video_beats.npy": beats,
                    "beat_weights.npy": (1 + 2.0 * beats).astype(np.float32),
                    "json": {"class": c},
                })
    return root


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # Two threads on a 2-core box shared with other test runs spin-wait and run ~10× slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("trainer") / "shards")


def tiny_config(shards: Path, out: Path, steps: int, **top: object) -> TrainConfig:
    cfg = load_config("tiny", [])
    cfg.data.shards, cfg.out, cfg.steps = str(shards), str(out), steps
    cfg.log_interval, cfg.eval_interval, cfg.ckpt_interval, cfg.eval_batches = 10, 1000, 1000, 1
    for key, value in top.items():
        set_key(cfg, key.replace("__", "."), value)
    return cfg


@pytest.fixture(scope="module")
def trained(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[train_mod.TrainResult, Path]:
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    return train_mod.train(tiny_config(shards, out, steps=50, eval_interval=50)), out


# ------------------------------------------------------------------------------------------------ model


def test_delay_pattern_round_trips_and_shifts_codebook_k_by_k():
    codes = torch.randint(0, 2048, (3, 4, 11))
    delayed = apply_delay(codes, 2048)
    assert delayed.shape == (3, 4, 14)
    assert torch.equal(undo_delay(delayed), codes)
    for k in range(4):
        assert torch.equal(delayed[:, k, k : k + 11], codes[:, k])
        assert (delayed[:, k, :k] == 2048).all() and (delayed[:, k, k + 11 :] == 2048).all()


def test_beat_weighted_ce_is_sum_w_ce_over_sum_w():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 4, 5, 7), torch.randint(0, 7, (2, 4, 5))
    weights, valid = torch.rand(2, 4, 5) * 3, torch.rand(2, 4, 5) > 0.2
    by_hand_num = by_hand_den = 0.0
    for idx in np.ndindex(2, 4, 5):
        row = logits[idx]
        ce = -(row[targets[idx]] - row.exp().sum().log()).item()
        w = weights[idx].item() * valid[idx].item()
        by_hand_num, by_hand_den = by_hand_num + w * ce, by_hand_den + w
    assert beat_weighted_cross_entropy(logits, targets, weights, valid).item() == pytest.approx(by_hand_num / by_hand_den, rel=1e-5)
    ones = torch.ones_like(weights)
    plain = F.cross_entropy(logits.flatten(0, 2), targets.flatten())
    assert beat_weighted_cross_entropy(logits, targets, ones, torch.ones_like(valid)).item() == pytest.approx(plain.item(), rel=1e-6)
    assert beat_weighted_cross_entropy(logits, targets, weights, valid).item() != pytest.approx(plain.item(), rel=1e-3)


def test_beat_weights_follow_the_delay_pattern_in_the_model():
    """A weight on audio frame t0 only must select codebook k's prediction at delayed position t0 + k."""
    torch.manual_seed(0)
    cfg = ModelConfig(max_steps=12, video_dim=DIM, max_frames=FRAMES, contrastive_weight=0.0)
    model = VideoToMusic(cfg).eval()
    tokens, video = torch.randint(0, 2048, (2, 4, 12)), torch.randn(2, FRAMES, DIM)
    t0 = 5
    weights = torch.zeros(2, 12)
    weights[:, t0] = 1.0
    _, parts = model(tokens, video, weights)
    inputs = torch.cat([torch.full((2, 4, 1), 2048), apply_delay(tokens, 2048)[..., :-1]], dim=-1)
    logits = model.decode(inputs, model.encode_video(video))
    expected = torch.stack([F.cross_entropy(logits[:, k, t0 + k], tokens[:, k, t0]) for k in range(4)]).mean()
    assert parts["ce"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_contrastive_loss_prefers_matched_pairs():
    torch.manual_seed(0)
    video = torch.randn(8, 16)
    matched = symmetric_info_nce(video, video + 0.01 * torch.randn(8, 16), 0.07)
    shuffled = symmetric_info_nce(video, video[torch.randperm(8)], 0.07)
    assert matched.item() < 0.01 < shuffled.item()


def test_contrastive_term_is_differentiable_through_the_logits():
    cfg = ModelConfig(max_steps=8, video_dim=DIM, max_frames=FRAMES, contrastive_weight=1.0)
    model = VideoToMusic(cfg)
    _, parts = model(torch.randint(0, 2048, (3, 4, 8)), torch.randn(3, FRAMES, DIM), torch.ones(3, 8))
    logits = model.decode(torch.full((3, 4, 11), 2048), model.encode_video(torch.randn(3, FRAMES, DIM)))
    music = model.music_embedding(logits)
    music.sum().backward()
    assert model.heads[0].weight.grad is not None and model.heads[0].weight.grad.abs().sum() > 0


def test_300m_config_is_about_300m_parameters():
    cfg = load_config("300m", [])
    assert 250e6 < count_params(cfg.model) < 350e6


# ------------------------------------------------------------------------------------------------ data


def test_npy_fields_are_loaded_without_pickle():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object))  # an object array: loading it needs pickle
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npy(buf.getvalue())


def test_stream_yields_batches_from_the_shards_and_val_is_read_once(shards: Path):
    cfg = DataConfig(shards=str(shards), batch_size=3, shuffle_buffer=4)
    batch = next(train_loader(cfg))
    assert batch["tokens"].shape == (3, 4, STEPS) and batch["tokens"].dtype == torch.int64
    assert batch["video"].shape == (3, FRAMES, DIM) and batch["beat_weights"].shape == (3, STEPS)
    val_keys = [k for b in eval_batches(cfg, "val") for k in b["keys"]]
    assert sorted(val_keys) == sorted(f"valvid{i}_000" for i in range(4))


def test_stream_resumes_at_the_same_position(shards: Path):
    cfg = DataConfig(shards=str(shards), batch_size=3, shuffle_buffer=4, seed=7)
    straight = train_loader(cfg)
    keys = [next(straight)["keys"] for _ in range(5)]  # crosses an epoch boundary (8 train samples)
    resumed = train_loader(cfg, samples_seen=6)
    assert [next(resumed)["keys"] for _ in range(3)] == keys[2:]


# ------------------------------------------------------------------------------------------------ training


def test_loss_is_finite_and_decreases_when_overfitting(trained):
    result, out = trained
    assert len(result.losses) == 50 and all(np.isfinite(result.losses))
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.6 * first, (first, last)
    assert np.isfinite(result.val["loss"])
    rows = list(csv.DictReader((out / "log.csv").open()))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [int(r["step"]) for r in train_rows] == [10, 20, 30, 40, 50]
    assert float(train_rows[-1]["samples_per_s"]) > 0 and float(train_rows[-1]["tokens_per_s"]) > 0
    assert {r["split"] for r in rows} == {"train", "val", "val_ema"}


def test_resume_gives_the_same_next_losses(shards: Path, tmp_path: Path):
    settings = {"lr_decay_steps": 8, "warmup_steps": 2}
    straight = train_mod.train(tiny_config(shards, tmp_path / "straight", steps=8, **settings))
    train_mod.train(tiny_config(shards, tmp_path / "split", steps=5, **settings))
    checkpoint = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 5 and checkpoint["samples_seen"] == [20]
    resumed = train_mod.train(tiny_config(shards, tmp_path / "split", steps=8, **settings), resume=True)
    assert resumed.losses == straight.losses[5:]  # exact: same weights, optimizer, EMA and data position


def test_main_cli_overrides_and_rejects_unknown_keys(shards: Path, tmp_path: Path, capsys):
    assert train_mod.main(["--shards", str(shards), "--steps", "2", "--out", str(tmp_path),
                           "--set", "model.n_layer=1", "--set", "log_interval=1", "--set", "cpu_threads=1"]) == 0
    assert json.loads(torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"])["model"]["n_layer"] == 1
    assert train_mod.main(["--shards", str(shards), "--set", "model.n_layers=1"]) == 2
    assert "model.n_layers" in capsys.readouterr().err


def test_ray_train_with_two_cpu_workers(shards: Path, tmp_path: Path, ray_local):
    argv = ["--shards", str(shards), "--steps", "3", "--out", str(tmp_path), "--ray-workers", "2",
            "--set", "log_interval=1", "--set", "eval_batches=1", "--set", "cpu_threads=1"]
    assert train_mod.main(argv) == 0
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 3
    assert checkpoint["samples_seen"] == [12, 12]  # two ranks, 3 steps × batch 4 each
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [r["step"] for r in rows if r["split"] == "train"] == ["1", "2", "3"]


# ------------------------------------------------------------------------------------------------ generate


def test_generate_writes_a_32khz_wav_of_the_clip_length(trained, shards: Path, tmp_path: Path):
    _, run = trained
    out = tmp_path / "clip.wav"
    argv = ["--checkpoint", str(run / "ckpt.pt"), "--shards", str(shards), "--key", "valvid1_000",
            "--out", str(out), "--top-k", "5"]
    assert generate.main(argv) == 0
    with wave.open(str(out)) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (32_000, 1, 2)
        assert f.getnframes() == STEPS * 640
        audio = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    assert np.abs(audio).max() > 0
    provenance = json.loads((tmp_path / "clip.wav.json").read_text())
    assert provenance["encodec"] == "random-init" and provenance["codebook"] == "random-init"


def test_generate_from_a_features_file(trained, tmp_path: Path):
    _, run = trained
    features = tmp_path / "hiera.npy"
    np.save(features, np.random.default_rng(0).normal(size=(FRAMES, DIM)).astype(np.float16))
    out = tmp_path / "from_features.wav"
    assert generate.main(["--checkpoint", str(run / "ckpt.pt"), "--features", str(features),
                          "--out", str(out), "--steps", "10"]) == 0
    with wave.open(str(out)) as f:
        assert f.getnframes() == 10 * 640
    too_long = ["--checkpoint", str(run / "ckpt.pt"), "--features", str(features), "--out", str(out), "--steps", "49"]
    assert generate.main(too_long) == 2
