"""features: each clip's frames → Hiera video features, the VMAs conditioning.

Per clip: `frames` frames (default 96) at `fps` (9.6) from the clip's start, nearest frame each
(decord, ffmpeg where decord cannot read the file); a partial last clip repeats the video's last
frame, so every clip gives exactly `frames` frames (`frames_read` counts the real ones). Frames are
resized (short side to 224, centre crop; or squashed) and normalised with ImageNet mean/std, as
Hiera's Kinetics models were trained.

Model: Hiera-Base video (`hiera_base_16x224`, 16-frame windows, Kinetics-400), built with timm's
Hiera class (N-d, already a dependency; its blocks reproduce hiera-transformer's outputs to 1e-6
with the same weights). 96 frames = 6 windows of 16; each window gives 8 time steps (temporal patch
stride 2), so the default output is [48, 768] float16 (4.8 Hz): the output of stage `layer`
(-1 = last), mean-pooled over space (`pooling=spatial_mean`), keeping the time axis VMAs conditions
on per step. Saved to `<media_root>/features/<key>.npy` (under `.part`, renamed; no pickle).

Weights: `<models_root>/hiera/<model>.<checkpoint>/model.safetensors` (timm key names; safetensors
only) → a download of Meta's checkpoint when online (`torch.load(weights_only=True)`, converted to
safetensors once). `run.weights=random` builds the same architecture randomly initialised; rows are
stamped `random-init`. A thread pool decodes the clips of a batch while the model runs (the runner
has one map per stage, so CPU decode lives here rather than in separate CPU actors); on a GPU the
forward pass runs in bf16 autocast (`precision=auto`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.media.files import save_npy_atomic
from pipeline.media.frames import DECODERS, FrameReader
from pipeline.media.probe import MediaError
from pipeline.models.precision import PRECISIONS, pick_precision
from pipeline.models.weights import Weights, models_root, pick_device, resolve
from pipeline.options import ConfigError, ModelWorkerOptions, clip_length, option
from pipeline.stage import Resources, Result, Row, Stage
from pipeline.timeline import check_window

WINDOW_FRAMES = 16  # Hiera video models see 16-frame windows
TEMPORAL_STRIDE = 2  # their patch embedding halves time: 8 steps per window
SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "model.safetensors"
VIDEO_HIERA: dict[str, Any] = dict(
    img_size=(WINDOW_FRAMES, SIZE, SIZE), q_stride=(1, 2, 2), mask_unit_size=(1, 8, 8), patch_kernel=(3, 7, 7),
    patch_stride=(TEMPORAL_STRIDE, 4, 4), patch_padding=(1, 3, 3), sep_pos_embed=True, num_classes=0,
)
CPU_GIB_PER_24_WINDOWS = 4.5
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "hiera_base_16x224": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
    "hiera_base_plus_16x224": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3)),
    # the same input and output layout at a fraction of the compute: for tests, never for data
    "hiera_test_16x224": dict(embed_dim=8, num_heads=1, stages=(1, 1, 1, 1)),
}
CHECKPOINT_URLS = {
    ("hiera_base_16x224", "mae_k400_ft_k400"): "https://dl.fbaipublicfiles.com/hiera/hiera_base_16x224.pth",
    ("hiera_base_16x224", "mae_k400"): "https://dl.fbaipublicfiles.com/hiera/mae_hiera_base_16x224.pth",
    ("hiera_base_plus_16x224", "mae_k400_ft_k400"): "https://dl.fbaipublicfiles.com/hiera/hiera_base_plus_16x224.pth",
    ("hiera_base_plus_16x224", "mae_k400"): "https://dl.fbaipublicfiles.com/hiera/mae_hiera_base_plus_16x224.pth",
}
POOLINGS = ("spatial_mean", "spatial_max", "mean")
CROPS = ("center", "squash")
# checkpoint keys the feature extractor does not use: the classifier, and MAE pre-training parts
UNUSED_KEY_PREFIXES = ("head.", "decoder", "mask_token", "multi_scale_fusion_heads", "encoder_norm", "pred")


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
        self.out_dir = Path(self.run.media_root) / "features"
        self.out_dir.mkdir(parents=True, exist_ok=True)
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
        if not path or not Path(path).is_file():
            return Result.failed(key, f"missing_file: no video at {path!r} (re-run download)", **self.identity)
        failure = check_window(row, c.clip_s)
        if failure:
            return Result.failed(key, failure, **self.identity)
        decoder = None
        try:
            reader = FrameReader(path, c.decoder)
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
            path = self.out_dir / f"{clip.key}.npy"
            try:
                save_npy_atomic(path, clip_features)
            except OSError as e:
                results[clip.key] = Result.failed(clip.key, f"io_error: {e}", **self.identity)
                continue
            results[clip.key] = Result.ok(
                clip.key, features_path=str(path), features_shape=list(clip_features.shape),
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


# ---------------------------------------------------------------- frames → model input


def resize_frame(frame: np.ndarray, crop: str) -> np.ndarray:
    import cv2

    height, width = frame.shape[:2]
    if crop == "squash":
        return cv2.resize(frame, (SIZE, SIZE), interpolation=_interpolation(min(height, width)))
    scale = SIZE / min(height, width)
    new_w, new_h = max(SIZE, round(width * scale)), max(SIZE, round(height * scale))
    resized = cv2.resize(frame, (new_w, new_h), interpolation=_interpolation(min(height, width)))
    top, left = (new_h - SIZE) // 2, (new_w - SIZE) // 2
    return np.ascontiguousarray(resized[top:top + SIZE, left:left + SIZE])


def _interpolation(short_side: int) -> int:
    import cv2

    return cv2.INTER_AREA if short_side > SIZE else cv2.INTER_CUBIC


def to_windows(frames: Any) -> Any:
    """uint8 [B, F, H, W, 3] tensor → normalised float [B × F/16, 3, 16, H, W] windows."""
    import torch

    batch, count = frames.shape[:2]
    mean = torch.tensor(MEAN, device=frames.device).view(1, 1, 1, 1, 3)
    std = torch.tensor(STD, device=frames.device).view(1, 1, 1, 1, 3)
    x = (frames.float() / 255.0 - mean) / std
    x = x.view(batch * (count // WINDOW_FRAMES), WINDOW_FRAMES, *frames.shape[2:])
    return x.permute(0, 4, 1, 2, 3).contiguous()


def extract(hiera: Any, frames: np.ndarray, layer: int, pooling: str, device: Any, precision: str) -> np.ndarray:
    """uint8 frames [B, F, 224, 224, 3] → float16 features [B, T, D] (T = F/2, or 1 for `mean`)."""
    import torch

    batch = frames.shape[0]
    with torch.inference_mode():
        windows = to_windows(torch.from_numpy(frames).to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            stage = hiera_stage(hiera, windows, layer)  # [windows, 8, h, w, D]
        pooled = pool(stage.float(), pooling)  # [windows, t, D]
        per_clip = pooled.reshape(batch, -1, pooled.shape[-1])
        if pooling == "mean":
            per_clip = per_clip.mean(dim=1, keepdim=True)
    return per_clip.to(torch.float16).cpu().numpy()


def hiera_stage(hiera: Any, windows: Any, layer: int) -> Any:
    index = layer % len(hiera.stage_ends)
    return hiera.forward_intermediates(windows, indices=[index], output_fmt="NHWC", intermediates_only=True)[0]


def pool(stage: Any, pooling: str) -> Any:
    """[windows, t, h, w, D] → [windows, t, D] (spatial pooling; `mean` finishes over time per clip)."""
    if pooling == "spatial_max":
        return stage.amax(dim=(2, 3))
    return stage.mean(dim=(2, 3))


# ---------------------------------------------------------------- the model


def build_hiera(model: str, device: str | None = None) -> Any:
    from timm.models.hiera import Hiera

    return Hiera(**VIDEO_HIERA, **ARCHITECTURES[model], device=device).eval()


def resolve_hiera_weights(model: str, checkpoint: str, mode: str, root: str) -> Weights:
    url = CHECKPOINT_URLS.get((model, checkpoint))
    return resolve(f"hiera/{model}.{checkpoint}", mode, models_root(root), WEIGHTS_FILE,
                   download=(lambda target: download_hiera(url, target)) if url else None)


def load_hiera(model: str, weights: Weights, seed: int) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hiera = build_hiera(model)
    if weights.path is not None:
        from safetensors.torch import load_file

        load_encoder_weights(hiera, load_file(str(weights.path)), weights.path)
    return hiera


def load_encoder_weights(hiera: Any, state: dict[str, Any], source: Path) -> None:
    """Strict on everything the features come from; only the classifier and MAE-only parts of a
    checkpoint may be left over."""
    from timm.models.hiera import checkpoint_filter_fn

    state = checkpoint_filter_fn(state, hiera)
    wanted = {k for k in hiera.state_dict() if not k.startswith("head.")}
    missing = sorted(wanted - set(state))
    extra = sorted(k for k in set(state) - wanted if not k.startswith(UNUSED_KEY_PREFIXES))
    if missing or extra:
        raise ConfigError(
            f"{source} does not fit this Hiera architecture: missing {missing[:3]}, unexpected {extra[:3]} "
            "(features.model must name the checkpoint's architecture)")
    hiera.load_state_dict({k: state[k] for k in wanted}, strict=False)


def download_hiera(url: str, target: Path) -> Path:
    """Meta's checkpoint → timm key names → safetensors; the .pth is read with weights_only=True."""
    import tempfile

    import torch
    from safetensors.torch import save_file
    from timm.models.hiera import checkpoint_filter_fn

    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        pth = Path(scratch) / "checkpoint.pth"
        torch.hub.download_url_to_file(url, str(pth), progress=False)
        state = torch.load(pth, map_location="cpu", weights_only=True)
    tensors = {k: v.contiguous() for k, v in checkpoint_filter_fn(state).items() if torch.is_tensor(v)}
    path = target / WEIGHTS_FILE
    save_file(tensors, str(path), metadata={"source": url, "key_names": "timm"})
    return path


__all__ = ["Features", "FeaturesConfig", "build_hiera", "extract"]
