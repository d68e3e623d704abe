"""tokens: each clip's instrumental (32 kHz mono, from separate) → EnCodec codes, the VMAs targets.

MusicGen's codec (pipeline/models/encodec.py): 4 codebooks of 2048 entries at 50 Hz, so a 10 s clip
is an int16 array [4, 500] in `<media_root>/tokens/<key>.npy` (written under `.part`, renamed,
or uploaded whole to a bucket: pipeline/media/staging.py; np.save without pickle).

* Exact shapes always: the window is read sample-exact; a partial last clip (`padded_s > 0`) is
  padded with silence to the full clip length before encoding.
* Batched: the clips of a process() call are encoded in one forward pass; a thread pool reads the
  next clips' audio while the model runs (the runner has one map per stage, so CPU decode lives
  here rather than in separate CPU actors).
* Weights: `<models_root>/encodec/<model>/` → the Hugging Face cache → a download when online
  (pipeline/models/encodec.py). `run.weights=random` builds the same architecture randomly
  initialised and stamps rows `random-init`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.media.audio import read_audio_window
from pipeline.media.files import write_npy
from pipeline.media.probe import MediaError
from pipeline.media.staging import media_store
from pipeline.models.encodec import (
    ARCHITECTURES,
    CODEBOOKS,
    FRAME_RATE,
    HUB_REPOS,
    SAMPLE_RATE,
    download_codec,
    encode,
    load_codec,
    resolve_codec_weights,
)
from pipeline.models.precision import PRECISIONS, pick_precision
from pipeline.models.weights import pick_device
from pipeline.options import ConfigError, ModelWorkerOptions, clip_length, option
from pipeline.stage import Resources, Result, Row, Stage
from pipeline.timeline import check_window

# a clip shorter than the media promised by more than this is a damaged file, not a partial clip
SHORT_AUDIO_TOLERANCE_S = 0.5


@dataclass
class TokensConfig(ModelWorkerOptions):
    model: str = option("encodec_32khz", f"codec architecture: {' | '.join(ARCHITECTURES)} (test: tiny, for tests)",
                        choices=tuple(ARCHITECTURES))
    clip_s: float = clip_length()
    precision: str = option(
        "fp32", "fp32 | bf16 | auto (bf16 on CUDA). fp32 by default: codes are training targets, and "
        "bf16 distances can flip the nearest codebook entry", choices=PRECISIONS)
    decode_threads: int = option(2, "threads reading clip audio ahead of the model", output=False)
    batch_size: int = 8  # clips encoded in one forward pass


class Tokens(Stage):
    name = "tokens"
    upstream = "beats"
    version = "1"
    reads = frozenset({"stems"})
    Config = TokensConfig
    requires = ("torch", "transformers", "soundfile", "numpy")
    schema = pa.schema(
        [
            ("tokens_path", pa.string()),
            ("tokens_shape", pa.list_(pa.int32())),
            ("tokens_dtype", pa.string()),
            ("codec_model", pa.string()),
            ("codec_weights_sha256", pa.string()),
            ("codec_precision", pa.string()),
            ("audio_samples_read", pa.int64()),  # from the file; the rest of the clip is silence
        ]
    )

    def __init__(self, config: TokensConfig, run: Any) -> None:
        super().__init__(config, run)
        check_config(config)

    @property
    def resources(self) -> Resources:
        return Resources.of(self.config)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "weights": self.run.weights}

    def preflight(self) -> None:
        resolve_codec_weights(self.config.model, self.run.weights, self.run.models_root)

    def setup(self) -> None:
        import torch

        c = self.config
        self.device = torch.device(pick_device(c.device, c.num_gpus))
        self.precision = pick_precision(c.precision, self.device.type)
        weights = resolve_codec_weights(c.model, self.run.weights, self.run.models_root)
        self.codec = load_codec(c.model, weights, c.seed).to(self.device)
        self.weights_stamp = weights.stamp
        self.samples = round(c.clip_s * SAMPLE_RATE)
        self.steps = round(c.clip_s * FRAME_RATE)
        self.identity = {
            "codec_model": HUB_REPOS.get(c.model, c.model) if not weights.is_random else c.model,
            "codec_weights_sha256": weights.sha256,
            "codec_precision": self.precision,
        }
        self.media = media_store(self.run)  # pipeline/media/staging.py: local files to read and write
        self.out_dir = self.media.work_dir("tokens")
        self.reader = ThreadPoolExecutor(max(1, c.decode_threads), thread_name_prefix="tokens-read")

    def fetch_weights(self, root: Path) -> list[tuple[str, Path]]:
        repo = HUB_REPOS.get(self.config.model)
        if repo is None:
            return []
        return [(f"encodec/{self.config.model}", download_codec(repo, root / "encodec" / self.config.model))]

    def process(self, rows: list[Row]) -> list[Result]:
        clips = list(self.reader.map(self.read_clip, rows))
        results = {c.key: c for c in clips if isinstance(c, Result)}
        ready = [c for c in clips if isinstance(c, AudioClip)]
        if ready:
            results.update(self.encode_and_save(ready))
        return [results[row["key"]] for row in rows]

    def read_clip(self, row: Row) -> AudioClip | Result:
        key, path = row["key"], row.get("instrumental32k_path") or ""
        if not self.media.is_file(path):
            return Result.failed(key, f"missing_file: no instrumental at {path!r} (re-run separate)", **self.identity)
        failure = check_window(row, self.config.clip_s)
        if failure:
            return Result.failed(key, failure, **self.identity)
        try:
            with self.media.local(path) as file:
                audio, read = read_audio_window(file, float(row["start_s"]), self.samples, SAMPLE_RATE)
        except MediaError as e:
            return Result.failed(key, str(e), **self.identity)
        expected = self.samples - round(float(row.get("padded_s") or 0.0) * SAMPLE_RATE)
        if read < expected - SHORT_AUDIO_TOLERANCE_S * SAMPLE_RATE:
            return Result.failed(
                key, f"short_audio: {read / SAMPLE_RATE:.2f}s of audio where the clip needs "
                f"{expected / SAMPLE_RATE:.2f}s (truncated instrumental?)", **self.identity)
        return AudioClip(key, audio, read)

    def encode_and_save(self, clips: list[AudioClip]) -> dict[str, Result]:
        codes = encode(self.codec, np.stack([c.audio for c in clips]), self.device, self.precision)
        if codes.shape[1:] != (CODEBOOKS, self.steps):
            raise RuntimeError(f"codec returned codes of shape {codes.shape[1:]}, expected {(CODEBOOKS, self.steps)}")
        results = {}
        for clip, clip_codes in zip(clips, codes, strict=True):
            try:
                with self.media.writing("tokens", f"{clip.key}.npy") as partial:
                    write_npy(partial, clip_codes)
            except OSError as e:
                results[clip.key] = Result.failed(clip.key, f"io_error: {e}", **self.identity)
                continue
            results[clip.key] = Result.ok(
                clip.key, tokens_path=self.media.uri("tokens", f"{clip.key}.npy"), tokens_shape=list(clip_codes.shape),
                tokens_dtype=str(clip_codes.dtype), audio_samples_read=clip.samples_read, **self.identity)
        return results


@dataclass
class AudioClip:
    key: str
    audio: np.ndarray  # float32 [samples], silence-padded to the clip length
    samples_read: int


# ---------------------------------------------------------------- checks


def check_config(c: TokensConfig) -> None:
    if abs(c.clip_s * FRAME_RATE - round(c.clip_s * FRAME_RATE)) > 1e-9 or c.clip_s <= 0:
        raise ConfigError(f"config key 'tokens.clip_s' must be a positive multiple of 20 ms, got {c.clip_s}")


__all__ = ["Tokens", "TokensConfig"]
