"""Hiera video (Kinetics-400, 16-frame windows) as a feature extractor, built with timm's Hiera class.

timm's N-d Hiera is already a dependency; its blocks reproduce hiera-transformer's outputs to 1e-6
with the same weights. A window of 16 frames gives 8 time steps (temporal patch stride 2); a stage's
output is pooled over space, keeping the time axis. Frames are resized to 224 (short side then a
centre crop, or squashed) and normalised with ImageNet mean/std, as Hiera's Kinetics models were
trained.

Weights: `<models_root>/hiera/<model>.<checkpoint>/model.safetensors` (timm key names; safetensors
only) → a download of Meta's checkpoint when online (`torch.load(weights_only=True)`, converted to
safetensors once). Random init builds the same architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.models.weights import Weights, models_root, resolve
from pipeline.options import ConfigError

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
