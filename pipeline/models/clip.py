"""CLIP image embeddings (open_clip) and the weight-free pixels stand-in, with CLIP weight
resolution: `<models_root>/open_clip/<model>-<tag>/` → the Hugging Face cache → a download when
online, or random-init. Explicit arguments (model, pretrained tag, weights mode, models root,
device, precision); no stage config. CLIP runs in bfloat16 where the hardware does it natively
(`pipeline.models.precision`); embeddings come back as float32 either way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.models.precision import choose_precision, native_bf16
from pipeline.models.weights import Weights, hub_cached, models_root, resolve

PIXELS_SIZE = 16  # the pixels embedder's feature grid
FRAME_SHORT_SIDE = 224  # frames are shrunk to the embedder's input side (this, for the pixels embedder)
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")


def clip_input_side(model: str) -> int:
    """The side CLIP resizes frames to (224 for ViT-B-32), read from open_clip's model config."""
    import open_clip

    size = (open_clip.get_model_config(model) or {}).get("vision_cfg", {}).get("image_size", FRAME_SHORT_SIDE)
    return int(size if isinstance(size, int) else max(size))


class PixelEmbedder:
    """Weight-free stand-in for CLIP: each frame as a 16×16 colour image, centred on its own mean,
    so similarity is the pixels' correlation (a brightness change alone does not lower it). It sees
    the same picture looped, not the same scene re-framed: a camera pan scores as change."""

    model_name = f"pixels-{PIXELS_SIZE}x{PIXELS_SIZE}"

    def embed(self, frames: list[np.ndarray]) -> np.ndarray:
        import cv2

        size = (PIXELS_SIZE, PIXELS_SIZE)
        features = np.stack(
            [cv2.resize(f, size, interpolation=cv2.INTER_AREA).astype(np.float32).ravel() for f in frames]
        )
        return features - features.mean(axis=1, keepdims=True)


class ClipEmbedder:
    """open_clip's image tower only (the text tower is never needed), with open_clip's own
    preprocessing for the pretrained tag, so scores match open_clip's encode_image."""

    def __init__(
        self, model: str, pretrained: str, weights: Weights, device: str, batch_frames: int, precision: str = "fp32",
        seed: int = 0,
    ) -> None:
        """`seed` makes random-init weights identical on every worker, so scores are reproducible."""
        import open_clip
        import torch

        tag = open_clip.get_pretrained_cfg(model, pretrained)
        with torch.random.fork_rng(devices=[]), _quiet_root_logger():
            torch.manual_seed(seed)
            clip = open_clip.create_model(model, pretrained=None, force_quick_gelu=bool(tag.get("quick_gelu")))
        if weights.path is not None:
            open_clip.load_checkpoint(clip, str(weights.path), weights_only=True)
        self.device = torch.device(device)
        # weights and inputs in bf16, not autocast: on CPU autocast re-casts every op (measured 2× slower than fp32)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.precision = precision
        self.visual = clip.visual.eval().to(self.device, self.dtype)
        self.preprocess = open_clip.image_transform(
            self.visual.image_size,
            is_train=False,
            mean=tag.get("mean"),
            std=tag.get("std"),
            resize_mode=tag.get("resize_mode"),
            interpolation=tag.get("interpolation"),
        )
        self.batch_frames = batch_frames
        self.weights = weights
        self.model_name = model if weights.is_random else f"{model}/{pretrained}"

    def embed(self, frames: list[np.ndarray]) -> np.ndarray:
        import torch
        from PIL import Image

        chunks = []
        for start in range(0, len(frames), self.batch_frames):
            images = [self.preprocess(Image.fromarray(f)) for f in frames[start : start + self.batch_frames]]
            batch = torch.stack(images).to(self.device, self.dtype)
            with torch.inference_mode():
                features = self.visual(batch)
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(chunks)


def load_clip_embedder(
    model: str, pretrained: str, weights_mode: str, root: str, device: str, precision: str, batch_frames: int,
    seed: int = 0,
) -> ClipEmbedder:
    """Resolve the weights (`weights_mode`: pretrained | random) and build the embedder in
    `precision` (auto: bf16 only where `device` computes it natively)."""
    weights = resolve_clip_weights(model, pretrained, weights_mode, root)
    chosen = choose_precision(precision, native_bf16(device))
    return ClipEmbedder(model, pretrained, weights, device, batch_frames, chosen, seed)


def resolve_clip_weights(model: str, pretrained: str, mode: str, root: str) -> Weights:
    """`<models_root>/open_clip/<model>-<tag>/` (any of CHECKPOINT_NAMES) → the Hugging Face cache →
    a download when online; `mode=random` builds the architecture randomly initialised."""
    folder = models_root(root) / "open_clip" / f"{model}-{pretrained}"
    filename = next((n for n in CHECKPOINT_NAMES if (folder / n).is_file()), CHECKPOINT_NAMES[-1])
    hub_repo = _hub_repo(model, pretrained)
    return resolve(
        f"open_clip/{model}-{pretrained}",
        mode,
        models_root(root),
        filename,
        cache_lookup=(lambda: hub_cached(hub_repo, CHECKPOINT_NAMES)) if hub_repo else None,
        download=(lambda target: _hub_download(hub_repo, target)) if hub_repo else None,
    )


def _hub_repo(model: str, pretrained: str) -> str | None:
    import open_clip

    return (open_clip.get_pretrained_cfg(model, pretrained).get("hf_hub") or "").strip("/") or None


def _hub_download(repo: str, target: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, CHECKPOINT_NAMES[-1], local_dir=target))


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """open_clip warns 'initialized randomly' on the root logger even when weights load next."""
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(level)

