"""tokens (EnCodec codes) and features (Hiera video features) on media made here with ffmpeg."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.media.frames import window_frame_indices
from pipeline.models.encodec import (
    ARCHITECTURES as CODEC_ARCHITECTURES,
)
from pipeline.models.encodec import (
    CODEBOOK_SIZE,
    decode,
    encode,
    randomize_codebooks,
)
from pipeline.models.hiera import (
    ARCHITECTURES as HIERA_ARCHITECTURES,
)
from pipeline.models.hiera import (
    build_hiera,
    extract,
    hiera_stage,
    pool,
    to_windows,
)
from pipeline.models.weights import WeightsNotFound
from pipeline.options import ConfigError, RunConfig
from pipeline.stage import Result
from pipeline.tools import synth
from stages.features import Features, FeaturesConfig
from stages.tokens import Tokens, TokensConfig

VIDEO_S = 14.0  # two 10 s clips: one whole, one 4 s long (6 s padded)
SR = 32000


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DISCOMV_OFFLINE", "1")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, synthetic_media) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clip_media")
    video = synthetic_media(d / "vid.mp4", synth.make_video, "moving", duration_s=VIDEO_S, seed=3, size="160x120")
    flac = d / "vid.flac"
    synth.ffmpeg("-f", "lavfi", "-i", f"aevalsrc={synth.music_expr(3)}:s={SR}:d={VIDEO_S}", "-ac", "1",
                 "-c:a", "flac", str(flac))
    text = d / "notes.txt"
    text.write_text("not media at all\n")
    return {"video": video, "flac": flac, "text": text}


def clip_row(media: dict[str, Path], index: int, **overrides: Any) -> dict[str, Any]:
    start = 10.0 * index
    row = {
        "key": f"vid_{index:03d}", "video_key": "vid", "clip_index": index, "start_s": start,
        "end_s": start + 10.0, "padded_s": max(0.0, start + 10.0 - VIDEO_S),
        "video_path": str(media["video"]), "instrumental32k_path": str(media["flac"]),
        "media_duration_s": VIDEO_S,
    }
    return {**row, **overrides}


def broken_rows(media: dict[str, Path]) -> list[dict[str, Any]]:
    return [
        clip_row(media, 0, key="unreadable_000", video_path=str(media["text"]),
                 instrumental32k_path=str(media["text"])),
        clip_row(media, 0, key="missing_000", video_path="/nonexistent/x.mp4",
                 instrumental32k_path="/nonexistent/x.flac"),
        clip_row(media, 0, key="short_window_000", end_s=5.0),
    ]


def by_key(results: list[Result]) -> dict[str, Result]:
    return {r.key: r for r in results}


def assert_failures(results: dict[str, Result]) -> None:
    assert results["unreadable_000"].status == "failed"
    assert results["unreadable_000"].reason.startswith("unreadable: ")
    assert results["missing_000"].reason.startswith("missing_file: ")
    assert results["short_window_000"].reason.startswith("bad_window: ")


def assert_atomic_outputs(folder: Path, keys: list[str]) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{k}.npy" for k in keys)  # no .part left


# ---------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def tokens_stage(tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    """The real encodec_32khz architecture, random weights."""
    root = tmp_path_factory.mktemp("tokens_run")
    stage = Tokens(TokensConfig(), RunConfig(media_root=str(root), weights="random"))
    stage.setup()
    return stage


def test_tokens_exact_shape_range_partial_clip_and_failures(tokens_stage: Tokens, media: dict[str, Path]) -> None:
    rows = [clip_row(media, 0), clip_row(media, 1), *broken_rows(media)]
    ordered = tokens_stage.process(rows)
    assert [r.key for r in ordered] == [r["key"] for r in rows]
    results = by_key(ordered)
    for key in ("vid_000", "vid_001"):
        result = results[key]
        assert result.status == "ok", result.reason
        assert set(result.metrics) <= set(Tokens.schema.names)
        codes = np.load(result.metrics["tokens_path"], allow_pickle=False)
        assert codes.shape == (4, 500) and codes.dtype == np.int16
        assert result.metrics["tokens_shape"] == [4, 500] and result.metrics["tokens_dtype"] == "int16"
        assert 0 <= codes.min() and codes.max() < CODEBOOK_SIZE
        assert len(np.unique(codes)) > 1  # zero-initialised codebooks would give code 0 everywhere
        assert result.metrics["codec_model"] == "encodec_32khz"
        assert result.metrics["codec_weights_sha256"] is None
    assert tokens_stage.weights_stamp == "random-init"
    assert results["vid_000"].metrics["audio_samples_read"] == 10 * SR
    assert results["vid_001"].metrics["audio_samples_read"] == pytest.approx(4 * SR, abs=SR // 100)
    assert_failures(results)
    assert_atomic_outputs(Path(tokens_stage.out_dir), ["vid_000", "vid_001"])


def test_tokens_partial_clip_is_padded_with_silence(tmp_path: Path, media: dict[str, Path]) -> None:
    """The padded tail encodes like silence: its codes equal those of an all-silent clip's tail."""
    stage = Tokens(TokensConfig(model="encodec_32khz_test"), RunConfig(media_root=str(tmp_path), weights="random"))
    stage.setup()
    partial = stage.read_clip(clip_row(media, 1))
    assert not isinstance(partial, Result)
    assert np.all(partial.audio[5 * SR:] == 0) and np.abs(partial.audio[: 3 * SR]).max() > 0.05
    codes = encode(stage.codec, np.stack([partial.audio, np.zeros(10 * SR, np.float32)]), stage.device, "fp32")
    assert np.array_equal(codes[0][:, 300:], codes[1][:, 300:])  # 6 s of silence = steps 200..499, away from the edge


def test_tokens_round_trip_of_a_tone(tokens_stage: Tokens) -> None:
    """Mechanics only (random weights): the real architecture encodes and decodes; 2 s keeps it quick."""
    t = np.arange(2 * SR, dtype=np.float32) / SR
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    codes = encode(tokens_stage.codec, tone[None], tokens_stage.device, "fp32")
    audio = decode(tokens_stage.codec, codes)
    assert codes.shape == (1, 4, 100) and audio.shape == (1, 2 * SR)
    assert np.isfinite(audio).all() and audio.std() > 0
    assert np.array_equal(encode(tokens_stage.codec, tone[None], tokens_stage.device, "fp32"), codes)  # deterministic


def save_test_codec(folder: Path, **config: Any) -> Any:
    import torch
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(123)
    codec = EncodecModel(EncodecConfig(**{**CODEC_ARCHITECTURES["encodec_32khz_test"], **config}))
    randomize_codebooks(codec)
    codec.save_pretrained(str(folder))
    return codec.eval()


def test_tokens_load_a_saved_checkpoint_and_record_its_sha256(
    tmp_path: Path, media: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    saved = save_test_codec(models / "encodec" / "encodec_32khz_test")
    weights_file = models / "encodec" / "encodec_32khz_test" / "model.safetensors"
    monkeypatch.setenv("DISCOMV_MODELS", str(models))
    run = RunConfig(media_root=str(tmp_path / "media"), weights="pretrained", models_root="elsewhere")
    stage = Tokens(TokensConfig(model="encodec_32khz_test"), run)
    stage.setup()
    [result] = stage.process([clip_row(media, 0)])
    assert result.status == "ok", result.reason
    assert stage.weights_stamp == "pretrained"
    assert result.metrics["codec_weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    clip = stage.read_clip(clip_row(media, 0))
    expected = encode(saved, clip.audio[None], stage.device, "fp32")[0]
    assert np.array_equal(np.load(result.metrics["tokens_path"], allow_pickle=False), expected)
    random_stage = Tokens(TokensConfig(model="encodec_32khz_test"), RunConfig(media_root=str(tmp_path), weights="random"))
    random_stage.setup()
    assert not np.array_equal(encode(random_stage.codec, clip.audio[None], stage.device, "fp32")[0], expected)


def test_tokens_refuse_missing_or_foreign_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCOMV_MODELS", str(tmp_path / "models"))
    run = RunConfig(media_root=str(tmp_path / "media"), weights="pretrained")
    with pytest.raises(WeightsNotFound, match="make weights"):
        Tokens(TokensConfig(model="encodec_32khz_test"), run).setup()
    save_test_codec(tmp_path / "models" / "encodec" / "encodec_32khz_test", sampling_rate=24000)
    with pytest.raises(ConfigError, match="not MusicGen's codec"):
        Tokens(TokensConfig(model="encodec_32khz_test"), run).setup()


# ---------------------------------------------------------------- features


def features_stage(root: Path, weights: str = "random", **config: Any) -> Features:
    stage = Features(FeaturesConfig(**{"model": "hiera_test_16x224", **config}),
                     RunConfig(media_root=str(root), weights=weights))
    stage.setup()
    return stage


def test_features_exact_shape_partial_clip_and_failures(tmp_path: Path, media: dict[str, Path]) -> None:
    stage = features_stage(tmp_path, batch_size=4, windows_per_pass=6)  # one clip per pass: two passes
    rows = [clip_row(media, 0), clip_row(media, 1), *broken_rows(media)]
    results = by_key(stage.process(rows))
    width = HIERA_ARCHITECTURES["hiera_test_16x224"]["embed_dim"] * 8
    for key in ("vid_000", "vid_001"):
        result = results[key]
        assert result.status == "ok", result.reason
        assert set(result.metrics) <= set(Features.schema.names)
        features = np.load(result.metrics["features_path"], allow_pickle=False)
        assert features.shape == (48, width) and features.dtype == np.float16
        assert np.isfinite(features).all()
        assert result.metrics["features_shape"] == [48, width] and result.metrics["features_dtype"] == "float16"
        assert result.metrics["features_fps"] == pytest.approx(4.8)
        assert result.metrics["video_model"] == "hiera_test_16x224" and result.metrics["video_decoder"] == "decord"
    assert stage.weights_stamp == "random-init"
    assert results["vid_000"].metrics["frames_read"] == 96
    assert results["vid_001"].metrics["frames_read"] == 39  # 10 s..14 s at 9.6 fps; 57 repeats of the last frame
    assert_failures(results)
    assert_atomic_outputs(Path(stage.out_dir), ["vid_000", "vid_001"])


def test_partial_clip_repeats_the_last_frame(media: dict[str, Path], tmp_path: Path) -> None:
    indices, inside = window_frame_indices(10.0, 96, 9.6, 25.0, frame_count=350)
    assert len(indices) == 96 and inside == 39
    assert indices[:3] == [250, 253, 255] and indices[38] == 349
    assert indices[39:] == [349] * 57
    stage = features_stage(tmp_path)
    clip = stage.read_clip(clip_row(media, 1))
    assert not isinstance(clip, Result)
    assert clip.frames.shape == (96, 224, 224, 3) and clip.frames.dtype == np.uint8
    assert all(np.array_equal(clip.frames[i], clip.frames[95]) for i in range(39, 95))
    assert not np.array_equal(clip.frames[0], clip.frames[95])


def test_features_default_architecture_gives_48_by_768() -> None:
    """The full Hiera-Base video model, traced on the meta device (shapes without the compute)."""
    import torch

    hiera = build_hiera("hiera_base_16x224", device="meta")
    frames = torch.empty(2, 96, 224, 224, 3, dtype=torch.uint8, device="meta")
    with torch.inference_mode():
        stage = hiera_stage(hiera, to_windows(frames), layer=-1)
    assert tuple(stage.shape) == (12, 8, 7, 7, 768)
    assert tuple(pool(stage, "spatial_mean").reshape(2, -1, 768).shape) == (2, 48, 768)


def test_features_layer_and_pooling_options(tmp_path: Path, media: dict[str, Path]) -> None:
    embed = HIERA_ARCHITECTURES["hiera_test_16x224"]["embed_dim"]
    stage = features_stage(tmp_path, layer=1, pooling="mean")
    [result] = stage.process([clip_row(media, 0)])
    assert result.status == "ok", result.reason
    assert result.metrics["features_shape"] == [1, embed * 2] and result.metrics["video_layer"] == 1
    with pytest.raises(ConfigError, match="features.frames"):
        Features(FeaturesConfig(frames=90), RunConfig(media_root=str(tmp_path), weights="random"))


def test_features_load_saved_safetensors_and_record_sha256(
    tmp_path: Path, media: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(123)
    saved = build_hiera("hiera_test_16x224")
    folder = tmp_path / "models" / "hiera" / "hiera_test_16x224.mae_k400_ft_k400"
    folder.mkdir(parents=True)
    weights_file = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(weights_file))
    monkeypatch.setenv("DISCOMV_MODELS", str(tmp_path / "models"))
    stage = features_stage(tmp_path / "media", weights="pretrained")
    [result] = stage.process([clip_row(media, 0)])
    assert result.status == "ok", result.reason
    assert stage.weights_stamp == "pretrained"
    assert result.metrics["video_model"] == "hiera_test_16x224.mae_k400_ft_k400"
    assert result.metrics["video_weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    frames = stage.read_clip(clip_row(media, 0)).frames[None]
    expected = extract(saved, frames, -1, "spatial_mean", stage.device, "fp32")[0]
    assert np.array_equal(np.load(result.metrics["features_path"], allow_pickle=False), expected)
    random_features = extract(features_stage(tmp_path / "r").hiera, frames, -1, "spatial_mean", stage.device, "fp32")
    assert not np.array_equal(random_features[0], expected)

    state = {k: v.contiguous() for k, v in saved.state_dict().items() if k != "blocks.0.attn.qkv.weight"}
    save_file(state, str(weights_file))
    with pytest.raises(ConfigError, match="does not fit"):
        features_stage(tmp_path / "media", weights="pretrained")
