"""Optical flow magnitudes of consecutive frame pairs: OpenCV Farneback on CPU, or torchvision RAFT
(raft_small / raft_large) with weight resolution: `<models_root>/raft/<method>/<method>.pth` →
torchvision's own download cache → a download when online, or random-init. Explicit arguments
(method, weights, device, iterations, batch, seed); no stage config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.media.frames import grey
from pipeline.models.weights import RANDOM_INIT, Weights, resolve


class FarnebackFlow:
    model_name = "opencv-farneback"

    def magnitudes(self, frames: Any) -> Any:
        """Spatial mean flow magnitude (pixels) of each consecutive frame pair."""
        import cv2
        import numpy as np

        frames = grey(frames)
        out = np.zeros(len(frames) - 1, dtype=np.float32)
        for i in range(len(frames) - 1):
            # OpenCV's documented example parameters: 3-level pyramid, 15 px window
            flow = cv2.calcOpticalFlowFarneback(frames[i], frames[i + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
            out[i] = np.sqrt((flow**2).sum(axis=2)).mean()
        return out


class RaftFlow:
    """torchvision RAFT, frame pairs batched; weights via pipeline.models (never pickle)."""

    def __init__(self, model: Any, weights: Weights, arch: str, device: Any, iters: int, batch: int) -> None:
        self.model, self.weights, self.device, self.iters, self.batch = model, weights, device, iters, batch
        tag = RANDOM_INIT if weights.is_random else f"sha256:{(weights.sha256 or '')[:12]}"
        self.model_name = f"{arch}@{tag}"

    @classmethod
    def load(cls, method: str, weights: Weights, device: str, iters: int, batch: int, seed: int) -> RaftFlow:
        """`method` is raft_small or raft_large; `weights` from resolve_raft; `seed` seeds random-init."""
        import torch
        from torchvision.models import optical_flow

        if weights.is_random:
            torch.manual_seed(seed)
        model = getattr(optical_flow, method)(weights=None)
        if weights.path is not None:
            model.load_state_dict(torch.load(weights.path, map_location="cpu", weights_only=True))
        model = model.eval().to(device)
        return cls(model, weights, method, torch.device(device), iters, batch)

    def magnitudes(self, frames: Any) -> Any:
        import numpy as np
        import torch

        images = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2)  # a writable copy
        out = []
        with torch.inference_mode():
            for lo in range(0, len(frames) - 1, self.batch):
                hi = min(lo + self.batch, len(frames) - 1)
                first = images[lo:hi].to(self.device).float() / 127.5 - 1.0  # RAFT expects [-1, 1]
                second = images[lo + 1:hi + 1].to(self.device).float() / 127.5 - 1.0
                flow = self.model(first, second, num_flow_updates=self.iters)[-1]
                out.append(flow.norm(dim=1).mean(dim=(1, 2)).float().cpu())
        return torch.cat(out).numpy().astype(np.float32)


def resolve_raft(method: str, mode: str, root: Path) -> Weights:
    """The RAFT weights for run.weights `mode` under the models folder `root`."""
    name, filename = raft_weights_name(method)
    return resolve(name, mode, root, filename, cache_lookup=lambda: raft_cache_file(method),
                   download=lambda folder: download_raft(method, folder))


def raft_weights_name(method: str) -> tuple[str, str]:
    return f"raft/{method}", f"{method}.pth"


def _raft_url(method: str) -> str:
    from torchvision.models import optical_flow

    enum = {"raft_small": optical_flow.Raft_Small_Weights, "raft_large": optical_flow.Raft_Large_Weights}[method]
    return enum.DEFAULT.url


def raft_cache_file(method: str) -> Path | None:
    """torchvision's own download cache, if that machine already has the file."""
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_raft_url(method))
    return path if path.is_file() else None


def download_raft(method: str, folder: Path) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / raft_weights_name(method)[1]
    torch.hub.download_url_to_file(_raft_url(method), str(target), progress=False)
    return target
