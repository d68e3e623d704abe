"""features: each clip's frames → Hiera video features, the VMAs conditioning.

Per clip: `frames` frames (default 96) at `fps` (9.6) from the clip's start, nearest frame each
(decord, ffmpeg where decord cannot read the file); a partial last clip repeats the video's last
frame, so every clip gives exactly `frames` frames (`frames_read` counts the real ones). Frames are
resized as decoded (short side to 224, centre crop; or squashed) for Hiera (pipeline/models/hiera.py).

Model: Hiera-Base video (`hiera_base_16x224`, 16-frame windows, Kinetics-400). 96 frames = 6
windows of 16; each window gives 8 time steps (temporal patch stride 2), so the default output is
[48, 768] float16 (4.8 Hz): the output of stage `layer` (-1 = last), mean-pooled over space
(`pooling=spatial_mean`), keeping the time axis VMAs conditions on per step. Saved to
`<media_root>/features/<key>.npy` (under `.part`, renamed, or uploaded whole to
a bucket: pipeline/media/staging.py; no pickle).

Weights: `<models_root>/hiera/<model>.<checkpoint>/model.safetensors` → a download of Meta's
checkpoint when online (pipeline/models/hiera.py). `run.weights=random` builds the same
architecture randomly initialised; rows are stamped `random-init`. A thread pool decodes the clips
of a batch while the model runs (the runner has one map per stage, so CPU decode lives here rather
than in separate CPU actors); on a GPU the forward pass runs in bf16 autocast (`precision=auto`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.media.files import write_npy
from pipeline.media.frames import DECODERS, FrameReader
from pipeline.media.probe import MediaError
from pipeline.media.staging import media_store
from pipeline.models.hiera import (
    ARCHITECTURES,
    CHECKPOINT_URLS,
    CROPS,
    POOLINGS,
    WINDOW_FRAMES,
    download_hiera,
    extract,
    load_hiera,
    resize_frame,
    resolve_hiera_weights,
)
from pipeline.models.precision import PRECISIONS, pick_precision
from pipeline.models.weights import pick_device
from pipeline.options import ConfigError, ModelWorkerOptions, clip_length, option
from pipeline.stage import Resources, Result, Row, Stage
from pipeline.timeline import check_window

CPU_GIB_PER_24_WINDOWS = 4.5


@dataclass
class FeaturesConfig(ModelWorkerOptions):
    model: str = option("hiera_base_16x224", f"Hiera video architecture: {' | '.join(ARCHITECTURES)}",
                        choices=tuple(ARCHITECTURES))
    checkpoint: str = option("mae_k400_ft_k400", "Meta's checkpoint tag: mae_k400_ft_k400 | mae_k400")
    frames: int = option(96, "frames per clip (a multiple of 16: Hiera windows)")
    fps: float = option(9.6, "frame sampling rate from the clip start (96 frames at 9.6 fps = 10 s)")
    clip_s: float = clip_length()
    crop: str = option("center", "center: short side to 224 then centre crop | squash: resize to 224×224",
                       choices=CROPS)
    layer: int = option(-1, "Hiera stage whose output is kept: 0..3, -1 = last (768-d for Base)")
    pooling: str = option(
        "spatial_mean", "spatial_mean | spatial_max: [T, D], T = frames/2 | mean: [1, D] over time and space",
        choices=POOLINGS)
    precision: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16", choices=PRECISIONS)
    decoder: str = option("auto", "auto: decord, ffmpeg where decord cannot read the file | decord | ffmpeg",
                          choices=DECODERS)
    windows_per_pass: int = option(24, "16-frame windows per forward pass (6 per clip): bounds memory",
                                   output=False)
    decode_threads: int = option(2, "threads decoding clips ahead of the model", output=False)
    batch_size: int = 4  # clips per process() call


class Features(Stage):
    name = "features"
    upstream = "tokens"
    version = "1"
    reads = frozenset({"video"})
    Config = FeaturesConfig
    requires = ("torch", "timm", "decord", "cv2", "safetensors", "numpy")
    schema = pa.schema(
        [
            ("features_path", pa.string()),
            ("features_shape", pa.list_(pa.int32())),
            ("features_dtype", pa.string()),
            ("features_fps", pa.float64()),  # rate of the time axis (4.8 Hz by default)
            ("video_model", pa.string()),
            ("video_weights_sha256", pa.string()),
            ("video_layer", pa.int32()),
            ("video_pooling", pa.string()),
            ("video_precision", pa.string()),
            ("video_decoder", pa.string()),
            ("frames_read", pa.int32()),  # real frames; the rest of the clip repeats the last one
        ]
    )

    def __init__(self, config: FeaturesConfig, run: Any) -> None:
        super().__init__(config, run)
        check_config(config)

    @property
    def resources(self) -> Resources:
        c = self.config
        # Hiera-Base on CPU peaks at ~4.1 GiB per actor with 24 windows per pass (Ray's memory
        # detector, `make demo`); activations scale with the windows. On a GPU they live there.
        memory = 0 if c.num_gpus else int(CPU_GIB_PER_24_WINDOWS * 2**30 * max(1, c.windows_per_pass) / 24)
        return replace(Resources.of(c), memory_bytes=memory)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "weights": self.run.weights}

    def preflight(self) -> None:
        c = self.config
        resolve_hiera_weights(c.model, c.checkpoint, self.run.weights, self.run.models_root)

    def setup(self) -> None:
        import torch

        c = self.config
        self.device = torch.device(pick_device(c.device, c.num_gpus))
        self.precision = pick_precision(c.precision, self.device.type)
        weights = resolve_hiera_weights(c.model, c.checkpoint, self.run.weights, self.run.models_root)
        self.hiera = load_hiera(c.model, weights, c.seed).to(self.device)
        self.weights_stamp = weights.stamp
        self.identity = {
            "video_model": c.model if weights.is_random else f"{c.model}.{c.checkpoint}",
            "video_weights_sha256": weights.sha256,
            "video_layer": c.layer,
            "video_pooling": c.pooling,
            "video_precision": self.precision,
        }
        self.media = media_store(self.run)  # pipeline/media/staging.py: local files to read and write
        self.out_dir = self.media.work_dir("features")
        self.decoders = ThreadPoolExecutor(max(1, c.decode_threads), thread_name_prefix="features-decode")

    def fetch_weights(self, root: Path) -> list[tuple[str, Path]]:
        c = self.config
        url = CHECKPOINT_URLS.get((c.model, c.checkpoint))
        if url is None:
            return []
        name = f"hiera/{c.model}.{c.checkpoint}"
        return [(name, download_hiera(url, root / name))]

    def process(self, rows: list[Row]) -> list[Result]:
        results: dict[str, Result] = {}
        for group in self.decoded_groups(rows, results):
            results.update(self.extract_and_save(group))
        return [results[row["key"]] for row in rows]

    def decoded_groups(self, rows: list[Row], results: dict[str, Result]) -> Iterator[list[VideoClip]]:
        """Decoded clips in groups that fill one forward pass; every decode is queued up front, so
        the threads decode the next group while the model runs on this one."""
        per_pass = max(1, self.config.windows_per_pass // (self.config.frames // WINDOW_FRAMES))
        futures: list[Future[VideoClip | Result]] = [self.decoders.submit(self.read_clip, row) for row in rows]
        group: list[VideoClip] = []
        for future in futures:
            clip = future.result()
            if isinstance(clip, Result):
                results[clip.key] = clip
                continue
            group.append(clip)
            if len(group) == per_pass:
                yield group
                group = []
        if group:
            yield group

    def read_clip(self, row: Row) -> VideoClip | Result:
        c = self.config
        key, path = row["key"], row.get("video_path") or ""
        if not self.media.is_file(path):
            return Result.failed(key, f"missing_file: no video at {path!r} (re-run download)", **self.identity)
        failure = check_window(row, c.clip_s)
        if failure:
            return Result.failed(key, failure, **self.identity)
        decoder = None
        try:
            with self.media.local(path) as file:
                reader = FrameReader(str(file), c.decoder)
                decoder = reader.decoder
                start_s = float(row["start_s"])
                # by timestamp, not index / average fps: right for variable frame rates too
                indices, inside = reader.indices_at([start_s + i / c.fps for i in range(c.frames)])
                if inside == 0:
                    raise MediaError(f"no_frames: the clip starts at {start_s:.2f}s, after the "
                                     f"video's last frame ({reader.duration_s:.2f}s)")
                # resized as decoded: a 4K clip holds one full-size frame at a time, not `frames` of them
                frames = np.stack(reader.read(indices, transform=lambda frame: resize_frame(frame, c.crop)))
                decoder = reader.decoder
        except MediaError as e:
            return Result.failed(key, str(e), video_decoder=decoder, **self.identity)
        return VideoClip(key, frames, inside, decoder)

    def extract_and_save(self, clips: list[VideoClip]) -> dict[str, Result]:
        c = self.config
        features = extract(self.hiera, np.stack([clip.frames for clip in clips]), c.layer, c.pooling,
                           self.device, self.precision)
        results = {}
        for clip, clip_features in zip(clips, features, strict=True):
            try:
                with self.media.writing("features", f"{clip.key}.npy") as partial:
                    write_npy(partial, clip_features)
            except OSError as e:
                results[clip.key] = Result.failed(clip.key, f"io_error: {e}", **self.identity)
                continue
            results[clip.key] = Result.ok(
                clip.key, features_path=self.media.uri("features", f"{clip.key}.npy"), features_shape=list(clip_features.shape),
                features_dtype=str(clip_features.dtype), features_fps=len(clip_features) / c.clip_s,
                frames_read=clip.frames_read, video_decoder=clip.decoder, **self.identity)
        return results


@dataclass
class VideoClip:
    key: str
    frames: np.ndarray  # uint8 [frames, 224, 224, 3]
    frames_read: int
    decoder: str


# ---------------------------------------------------------------- checks


def check_config(c: FeaturesConfig) -> None:
    problems = {
        "frames": (c.frames <= 0 or c.frames % WINDOW_FRAMES) and f"a positive multiple of {WINDOW_FRAMES}",
        "fps": c.fps <= 0 and "positive",
        "layer": not -4 <= c.layer <= 3 and "a Hiera stage, 0..3 or -1..-4",
    }
    for key, wanted in problems.items():
        if wanted:
            raise ConfigError(f"config key 'features.{key}' must be {wanted}, got {getattr(c, key)!r}")


__all__ = ["Features", "FeaturesConfig"]
