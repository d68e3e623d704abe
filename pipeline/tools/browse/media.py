"""What the browser plays and shows, found from the manifests: media files under the configured
roots (never a path from a URL), shard members read in place inside their tar, and the filter's
frames with their similarity matrix, computed on request and cached under a temp dir."""

from __future__ import annotations

import json
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.webds.index import read_shards
from pipeline.webds.sample import KEY, ShardError, load_npy

MIME = {".mp4": "video/mp4", ".webm": "video/webm", ".mkv": "video/x-matroska", ".flac": "audio/flac",
        ".wav": "audio/wav", ".m4a": "audio/mp4", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
        ".jpg": "image/jpeg", ".json": "application/json"}


class Refused(ValueError):
    """A key or path the browser will not serve (bad key, or a file outside the roots)."""


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY.match(key):
        raise Refused(f"not a key: {key!r}")
    return key


@dataclass(frozen=True)
class Span:
    """Bytes to serve: `size` bytes of `path` from `offset` (a whole file, or one member of a tar)."""

    path: Path
    offset: int
    size: int
    mime: str


class Roots:
    """The folders the browser may read: the run's media and shard roots, and its own cache."""

    def __init__(self, media_root: str | Path, shard_root: str | Path, cache: Path) -> None:
        self.media = Path(media_root).resolve()
        self.shards = Path(shard_root).resolve()
        self.cache = cache.resolve()

    def inside(self, path: str | Path | None) -> Path | None:
        """`path` resolved (symlinks followed), when it is a file under one of the roots; else None."""
        if not path:
            return None
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in (self.media, self.shards, self.cache)):
            raise Refused(f"{path} is outside the browser's roots")
        return resolved if resolved.is_file() else None

    def file_span(self, path: str | Path | None) -> Span | None:
        resolved = self.inside(path)
        if resolved is None:
            return None
        return Span(resolved, 0, resolved.stat().st_size, MIME.get(resolved.suffix.lower(), "application/octet-stream"))


class ShardMembers:
    """Where each sample's members lie inside the shard tars (offset, size), found once per shard set."""

    def __init__(self, roots: Roots) -> None:
        self.roots = roots
        self.lock = threading.Lock()
        self.where: dict[str, dict[str, tuple[Path, int, int]]] = {}
        self.stamp: tuple | None = None

    def _refresh(self) -> None:
        shards = read_shards(self.roots.shards)
        stamp = tuple(sorted((s.shard, s.sha256) for s in shards.values()))
        if stamp == self.stamp:
            return
        where: dict[str, dict[str, tuple[Path, int, int]]] = {}
        for name in shards:
            path = self.roots.inside(self.roots.shards / name)
            if path is None:
                continue
            with tarfile.open(path) as tar:
                for info in tar:
                    key, _, ext = info.name.partition(".")
                    if info.isfile() and KEY.match(key):
                        where.setdefault(key, {})[ext] = (path, info.offset_data, info.size)
        self.where, self.stamp = where, stamp

    def members(self, key: str) -> dict[str, tuple[Path, int, int]]:
        with self.lock:
            self._refresh()
            return self.where.get(key, {})

    def span(self, key: str, ext: str) -> Span | None:
        found = self.members(key).get(ext)
        if found is None:
            return None
        mime = {"mp4": "video/mp4", "flac": "audio/flac"}.get(ext, "application/octet-stream")
        return Span(found[0], found[1], found[2], mime)

    def read(self, key: str, ext: str) -> bytes | None:
        span = self.span(key, ext)
        if span is None:
            return None
        with open(span.path, "rb") as f:
            f.seek(span.offset)
            return f.read(span.size)

    def array(self, key: str, member: str) -> np.ndarray | None:
        data = self.read(key, member)
        try:
            return None if data is None else load_npy(data)
        except (ValueError, ShardError):
            return None


def beats_arrays(clip: dict[str, Any], roots: Roots, members: ShardMembers) -> dict[str, Any]:
    """The clip's 50 Hz arrays: the beats manifest's lists, else the shard's members; with the onset
    envelope and flow magnitude from the beats .npz when it is there."""
    out: dict[str, Any] = {"source": None}
    names = ("music_beats", "video_beats", "beat_weights")
    if all(clip.get(n) is not None for n in names):
        out.update({n: [float(v) for v in clip[n]] for n in names}, source="beats manifest")
    else:
        arrays = {n: members.array(clip["key"], f"{n}.npy") for n in names}
        if all(a is not None for a in arrays.values()):
            out.update({n: a.astype(float).tolist() for n, a in arrays.items()}, source="shard members")
    try:
        npz_path = roots.inside(clip.get("beats_path"))
    except Refused:
        npz_path = None
    if npz_path is not None:
        with np.load(npz_path, allow_pickle=False) as npz:
            for name in ("onset_envelope", "flow_magnitude"):
                if name in npz.files:
                    out[name] = np.nan_to_num(npz[name].astype(float)).round(4).tolist()
    return out


class FrameCache:
    """The frames the filter samples from a video, as JPEGs, and their similarity matrix (the
    filter's embedder when it is the weight-free `pixels` one; CLIP needs its weights and is
    loaded once, on the first request that needs it)."""

    def __init__(self, cache: Path, filter_config: Any, run: Any) -> None:
        self.dir = cache / "frames"
        self.config = filter_config
        self.run = run
        self.lock = threading.Lock()
        self.embedder: Any = None

    def _embedder(self) -> Any:
        if self.embedder is None:
            from pipeline.models.clip import PixelEmbedder, load_clip_embedder

            c = self.config
            if c is None or c.embedder == "pixels":
                self.embedder = PixelEmbedder()
            else:
                self.embedder = load_clip_embedder(c.model, c.pretrained, self.run.weights, self.run.models_root,
                                                   "cpu", "fp32", c.embed_batch, c.seed)
        return self.embedder

    def frames(self, key: str, video: Path) -> dict[str, Any]:
        folder = self.dir / check_key(key)
        meta = folder / "frames.json"
        with self.lock:
            if not meta.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                meta.write_text(json.dumps(self._compute(video, folder)))
        return json.loads(meta.read_text())

    def _compute(self, video: Path, folder: Path) -> dict[str, Any]:
        from PIL import Image

        from pipeline.media.frames import FrameReader
        from pipeline.media.probe import MediaError
        from pipeline.models.clip import FRAME_SHORT_SIDE
        from pipeline.models.similarity import (
            grey_differences,
            grey_thumbnails,
            same_picture,
            sample_frames,
            shrink_to_short_side,
        )

        c = self.config
        count = c.frames if c else 16
        try:
            reader = FrameReader(video, c.decoder if c else "auto")
            read, start = sample_frames(reader, count, lambda f: shrink_to_short_side(f, FRAME_SHORT_SIDE),
                                        bool(c and c.skip_blank_leader))
        except MediaError as e:
            return {"error": str(e), "frames": [], "matrix": []}
        same_as = same_picture(grey_differences(grey_thumbnails(read)),
                               c.identical_frame_tolerance if c else 2.0)
        firsts = sorted({int(i) for i in same_as})
        embedder = self._embedder()
        vectors = np.asarray(embedder.embed([read[i] for i in firsts]), dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = vectors / np.where(norms > 0, norms, 1.0)
        pictures = unit @ unit.T
        np.fill_diagonal(pictures, 1.0)
        rows = [firsts.index(int(i)) for i in same_as]
        matrix = pictures[np.ix_(rows, rows)]
        n = len(rows)
        mean = float((matrix.sum() - np.trace(matrix)) / (n * (n - 1))) if n > 1 else None
        names = []
        for i, frame in enumerate(read):
            Image.fromarray(frame).save(folder / f"{i:02d}.jpg", quality=80)
            names.append(f"{i:02d}.jpg")
        fps = reader.fps or 0.0
        return {"frames": names, "matrix": matrix.round(4).tolist(), "same_as": [int(i) for i in same_as],
                "similarity": mean, "embedder": embedder.model_name, "decoder": reader.decoder,
                "start_s": start / fps if fps else 0.0}
