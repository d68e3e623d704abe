"""Weight resolution: local folder → library cache → download (when online) → a clear error.

`run.weights=random` builds the same architecture randomly initialised (tests, offline demo);
stages stamp every output made that way `weights=random-init`. Real weights are identified by
sha256, pinned in `<models_root>/weights.lock.json` by `discomv weights`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("discomv")
RANDOM_INIT = "random-init"
PRETRAINED = "pretrained"
LOCK_FILE = "weights.lock.json"


class WeightsNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class Weights:
    path: Path | None  # None: build randomly initialised
    stamp: str  # pretrained | random-init
    sha256: str | None

    @property
    def is_random(self) -> bool:
        return self.path is None


def pick_device(device: str, num_gpus: float) -> str:
    """A stage's `device` option: `auto` is CUDA when the worker reserved a GPU and one is there."""
    import torch

    if device == "auto":
        return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    return device


def models_root(configured: str = "models") -> Path:
    return Path(os.environ.get("DISCOMV_MODELS") or configured)


def resolve(
    name: str,
    mode: str,
    root: Path,
    filename: str,
    cache_lookup: Callable[[], Path | None] | None = None,
    download: Callable[[Path], Path] | None = None,
) -> Weights:
    """Find the weights file `filename` for model `name` (folder `<root>/<name>/`)."""
    if mode == "random":
        return Weights(None, RANDOM_INIT, None)
    if mode != "pretrained":
        raise ValueError(f"run.weights must be 'pretrained' or 'random', got {mode!r}")
    local = root / name / filename
    path = local if local.is_file() else (cache_lookup() if cache_lookup else None)
    if path is None and download is not None and _online():
        log.info("weights %s: downloading into %s", name, local.parent)
        path = download(local.parent)
    if path is None or not Path(path).is_file():
        raise WeightsNotFound(
            f"no weights for {name}: expected {local}. Run `make weights` on a machine with network "
            f"access (it downloads and pins sha256), copy the file there, or set run.weights=random "
            f"for a test run (outputs are then stamped {RANDOM_INIT})."
        )
    digest = sha256_file(Path(path))
    _check_lock(root, name, digest)
    return Weights(Path(path), PRETRAINED, digest)


def hub_cached(repo: str, filenames: Sequence[str], beside: Sequence[str] = ()) -> Path | None:
    """The first of `filenames` that the Hugging Face cache holds for `repo`, where every file in
    `beside` (e.g. config.json) is cached next to it; None without huggingface_hub or a cached copy."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in filenames:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and all((Path(found).parent / other).is_file() for other in beside):
            return Path(found)
    return None


def sha256_file(path: Path) -> str:
    sidecar = path.with_name(path.name + ".sha256")
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    if sidecar.is_file():
        cached_stamp, _, digest = sidecar.read_text().strip().partition(" ")
        if cached_stamp == stamp:
            return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        sidecar.write_text(f"{stamp} {digest}\n")
    except OSError:
        pass  # read-only model folders are fine, we just hash again next time
    return digest


def pin(root: Path, name: str, path: Path) -> str:
    lock_path = root / LOCK_FILE
    lock = json.loads(lock_path.read_text()) if lock_path.is_file() else {}
    digest = sha256_file(path)
    lock[name] = {"file": str(path.relative_to(root)) if path.is_relative_to(root) else str(path), "sha256": digest}
    lock_path.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    return digest


def _check_lock(root: Path, name: str, digest: str) -> None:
    lock_path = root / LOCK_FILE
    if not lock_path.is_file():
        return
    pinned = json.loads(lock_path.read_text()).get(name, {}).get("sha256")
    if pinned and pinned != digest:
        raise WeightsNotFound(
            f"weights for {name} have sha256 {digest[:12]}…, but {lock_path} pins {pinned[:12]}…: "
            "re-run `make weights` or restore the pinned file"
        )


def _online(host: str = "huggingface.co", timeout_s: float = 2.0) -> bool:
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("DISCOMV_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False
