"""filter: drop videos whose frames barely change (VMAs kept DISCO-10M videos whose mean pairwise
CLIP frame similarity is under 0.7; a single image looped for minutes scores ~1).

Per video: `frames` frames sampled uniformly (decord with keyframe-aware seeking; ffmpeg where
decord cannot read the file) → 32×32 grey thumbnails. Frames within `identical_frame_tolerance` of
an earlier frame are the same picture and share its embedding, so a looped still (one distinct
frame) is dropped as `static` without running the embedder and a two-image slideshow costs two
forward passes. The rest are embedded in batches across the videos of a batch (open_clip, or the
weight-free `pixels` embedder): first the `early_drop_frames` mutually most different pictures
(by grey thumbnail); when even they score above threshold + `early_drop_margin` the video is
dropped without embedding the rest, otherwise every picture is embedded. Kept videos are always
scored on every sampled frame. `frame_similarity` = mean cosine similarity over all ordered pairs
of scored frames, diagonal excluded; above `threshold` → dropped.

Decoding is `prepare()`: under Ray with `decode_cpus` set (by default when CLIP runs on a GPU) it
runs in CPU tasks upstream of the CLIP actors, so a GPU stays fed; otherwise `process()` decodes
the rows itself. CLIP runs in bfloat16 where the hardware does it natively (`precision`);
similarities are always computed in float32/float64 from the embeddings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.media.frames import DECODERS, FrameReader, uniform_indices
from pipeline.media.probe import MediaError
from pipeline.models.precision import PRECISIONS, choose_precision, native_bf16
from pipeline.models.weights import Weights, models_root, resolve
from pipeline.options import ConfigError, ModelWorkerOptions, option
from pipeline.stage import Resources, Result, Row, Stage

log = logging.getLogger("discomv")

EMBEDDERS = ("clip", "pixels")
THUMBNAIL_SIZE = 32  # grey thumbnails for the identical-frame check and blank detection
PIXELS_SIZE = 16  # the pixels embedder's feature grid
FRAME_SHORT_SIDE = 224  # frames are shrunk to the embedder's input side (this, for the pixels embedder)
BLANK_STD = 3.0  # a thumbnail with less grey-level spread than this is a blank (black, white, flat) frame
LEADER_PASSES = 4  # resampling passes that close in on the end of a blank leader
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
RANDOM_SEED = 0  # random-init weights are the same on every worker, so scores are reproducible
# fields prepare() adds to a row: the sampled frames [n, H, W, 3] uint8, and how they were read
FRAMES, DECODED = "filter_frames", "filter_decoded"


@dataclass
class FilterConfig(ModelWorkerOptions):
    embedder: str = option(
        "clip",
        "clip: open_clip image embeddings | pixels: weight-free 16×16 pixel features "
        "(offline stand-in; outputs stamped model pixels-16x16, weights none)",
        choices=EMBEDDERS,
    )
    model: str = option("ViT-B-32", "open_clip architecture", output=lambda c, run: c.embedder == "clip")
    pretrained: str = option(
        "laion2b_s34b_b79k", "open_clip pretrained tag; weights in <models_root>/open_clip/<model>-<tag>/",
        output=lambda c, run: c.embedder == "clip",
    )
    frames: int = option(16, "frames sampled uniformly over each video")
    threshold: float = option(0.7, "drop videos whose frame_similarity is above this")
    identical_frame_tolerance: float = option(
        2.0,
        "frames whose mean absolute grey difference (0-255, 32×32 thumbnails) is at most this are "
        "the same picture: embedded once; a video of one picture is dropped as static without "
        "running the embedder. Negative: off",
    )
    early_drop_frames: int = option(
        4,
        "embed this many mutually most different pictures first; when even they score above "
        "threshold + early_drop_margin the video is dropped without embedding the rest. 0 = off",
    )
    early_drop_margin: float = option(0.1, "how far above the threshold an early drop must score")
    skip_blank_leader: bool = option(False, "sample after a black/blank opening instead of from frame 0")
    min_duration_s: float = option(2.0, "fail videos shorter than this (seconds)")
    decoder: str = option("auto", "auto: decord, ffmpeg where decord cannot read the file | decord | ffmpeg",
                          choices=DECODERS)
    precision: str = option(
        "auto",
        "CLIP weights and inputs: auto (bf16 on CUDA and on CPUs with native bf16 — AVX512-BF16 or "
        "AMX — else fp32) | fp32 | bf16. Embeddings are compared in float32 either way",
        choices=PRECISIONS, output=lambda c, run: c.embedder == "clip",
    )
    embed_batch: int = option(64, "frames per embedder forward pass", output=False)
    decode_threads: int = option(2, "videos of a batch decoded in parallel", output=False)
    batch_size: int = 8  # videos decoded together and embedded in shared forward passes
    concurrency: int = 2
    decode_cpus: float | None = option(
        None,
        "CPUs per decode task: under Ray, videos are decoded in CPU tasks upstream of the CLIP actors "
        "(keeps a GPU fed). None: 1 when num_gpus > 0, else decode inside the actors (CPU-only: the "
        "actors already use every core). 0: always inside the actors",
        output=False,
    )


@dataclass
class SampledVideo:
    """One video's sampled frames on their way through the checks and the embedder."""

    key: str
    frames: list[np.ndarray]
    decoder: str
    leader_skipped_s: float
    differences: np.ndarray  # mean absolute grey difference between every two frames
    same_as: np.ndarray  # frame i shows the same picture as frame same_as[i] (its first occurrence)
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)  # first-occurrence frame → embedding


class Filter(Stage):
    name = "filter"
    upstream = "download"
    version = "1"
    Config = FilterConfig
    requires = ("decord", "cv2", "torch", "open_clip")
    schema = pa.schema(
        [
            ("frame_similarity", pa.float64()),
            ("threshold", pa.float64()),
            ("decided_by", pa.string()),  # static_precheck | early_drop | embedder
            ("frames_read", pa.int32()),
            ("frames_scored", pa.int32()),
            ("distinct_frames", pa.int32()),  # different pictures among the frames read
            ("embedded_frames", pa.int32()),  # pictures the embedder ran on (0: static pre-check)
            ("max_grey_difference", pa.float64()),
            ("leader_skipped_s", pa.float64()),
            ("decoder", pa.string()),
            ("embedder_model", pa.string()),
            ("weights_sha256", pa.string()),
            ("precision", pa.string()),  # fp32 | bf16: what CLIP ran in (null for the pixels embedder)
        ]
    )

    def __init__(self, config: FilterConfig, run: Any) -> None:
        super().__init__(config, run)
        check_config(config)

    @property
    def resources(self) -> Resources:
        c = self.config
        decode_cpus = c.decode_cpus if c.decode_cpus is not None else (1.0 if c.num_gpus > 0 else 0.0)
        return dataclasses.replace(Resources.of(c), prepare_cpus=decode_cpus or None)

    def params(self) -> dict[str, Any]:
        clip = {"weights": self.run.weights} if self.config.embedder == "clip" else {}
        return {**super().params(), **clip}

    def preflight(self) -> None:
        c = self.config
        if c.embedder == "clip":
            resolve_clip_weights(c.model, c.pretrained, self.run.weights, self.run.models_root)

    def setup(self) -> None:
        c = self.config
        if c.embedder == "pixels":
            self.embedder: PixelEmbedder | ClipEmbedder = PixelEmbedder()
            self.weights_stamp = "none"
            sha256, precision = None, None
        else:
            weights = resolve_clip_weights(c.model, c.pretrained, self.run.weights, self.run.models_root)
            device = "cuda" if c.num_gpus > 0 else "cpu"
            precision = choose_precision(c.precision, native_bf16(device))
            self.embedder = ClipEmbedder(c.model, c.pretrained, weights, device, c.embed_batch, precision)
            self.weights_stamp = weights.stamp
            sha256 = weights.sha256
        self.identity = {
            "embedder_model": self.embedder.model_name,
            "weights_sha256": sha256,
            "threshold": c.threshold,
            "precision": precision,
        }
        log.debug("filter: embedder %s (%s), weights %s", self.embedder.model_name, precision, self.weights_stamp)

    def prepare(self, rows: list[Row]) -> list[Row]:
        """Decode: each row gains its sampled frames (FRAMES) and how they were read (DECODED,
        with the failure reason for a file that cannot be read). Needs no model."""
        if not rows:
            return []
        with ThreadPoolExecutor(max(1, min(self.config.decode_threads, len(rows)))) as pool:
            return list(pool.map(self.prepare_one, rows))

    def process(self, rows: list[Row]) -> list[Result]:
        unprepared = {r["key"]: r for r in self.prepare([r for r in rows if FRAMES not in r])}
        sampled = [self.sampled(unprepared.get(r["key"], r)) for r in rows]
        results = {s.key: s for s in sampled if isinstance(s, Result)}
        videos = [s for s in sampled if isinstance(s, SampledVideo)]
        for video in videos:
            if distinct_frames(video.same_as) == 1:
                results[video.key] = self.static_result(video)
        results.update(self.score([v for v in videos if v.key not in results]))
        return [results[row["key"]] for row in rows]

    # decoding ------------------------------------------------------------

    def sample(self, row: Row) -> SampledVideo | Result:
        return self.sampled(self.prepare_one(row))

    def prepare_one(self, row: Row) -> Row:
        path = row.get("video_path")
        decoded: dict[str, Any] = {"decoder": None, "leader_skipped_s": 0.0, "failure": None}
        frames = np.zeros((0, 0, 0, 3), np.uint8)  # same rank as real frames: one tensor column under Ray
        if not path or not Path(path).is_file():
            decoded["failure"] = f"missing_file: no video at {path!r} (re-run download)"
            return {**row, FRAMES: frames, DECODED: decoded}
        reader: FrameReader | None = None
        try:
            reader = FrameReader(path, self.config.decoder)
            check_length(reader, self.config.min_duration_s)
            read, start = self.read_frames(reader)
            frames = np.stack(read)
            decoded["leader_skipped_s"] = start / reader.fps if reader.fps else 0.0
        except MediaError as e:
            decoded["failure"] = str(e)
        decoded["decoder"] = reader.decoder if reader else None
        return {**row, FRAMES: frames, DECODED: decoded}

    def sampled(self, row: Row) -> SampledVideo | Result:
        """A prepared row as a video ready for the checks, or its decode failure as a result."""
        decoded = row[DECODED]
        if decoded["failure"]:
            return Result.failed(row["key"], decoded["failure"], decoder=decoded["decoder"], **self.identity)
        frames = list(row[FRAMES])
        differences = grey_differences(grey_thumbnails(frames))
        return SampledVideo(
            key=row["key"],
            frames=frames,
            decoder=decoded["decoder"],
            leader_skipped_s=float(decoded["leader_skipped_s"]),
            differences=differences,
            same_as=same_picture(differences, self.config.identical_frame_tolerance),
        )

    def shrink(self, frame: np.ndarray) -> np.ndarray:
        if not hasattr(self, "frame_side"):
            self.frame_side = embedder_input_side(self.config)
        return shrink_to_short_side(frame, self.frame_side)

    def read_frames(self, reader: FrameReader) -> tuple[list[np.ndarray], int]:
        """`frames` frames spread uniformly from the first frame, or from the end of a blank leader
        (when configured), and the index they start from."""
        start = 0
        indices = uniform_indices(start, reader.frame_count, self.config.frames)
        frames = reader.read(indices, self.shrink)
        if not self.config.skip_blank_leader:
            return frames, start
        for _ in range(LEADER_PASSES):
            blank = leading_blanks(frames)
            if blank == 0 or blank == len(frames):
                break  # no leader; or nothing but blank frames, which the static check will judge
            # the leader ends between the last blank sample and the next one: sample again from there
            start = indices[blank - 1] + 1
            indices = uniform_indices(start, reader.frame_count, self.config.frames)
            frames = reader.read(indices, self.shrink)
        else:
            blank = leading_blanks(frames)
            if 0 < blank < len(frames) - 1:  # leader frames the passes did not get past
                frames, start = frames[blank:], indices[blank]
        return frames, start

    # deciding ------------------------------------------------------------

    def static_result(self, video: SampledVideo) -> Result:
        n = len(video.frames)
        return Result.dropped(
            video.key,
            f"static: all {n} sampled frames show the same picture (max grey difference "
            f"{video.differences.max():.1f}/255); embedder not run",
            **self.metrics(video, similarity=1.0, scored=n, decided_by="static_precheck"),
        )

    def score(self, videos: list[SampledVideo]) -> dict[str, Result]:
        """Embed (batched across videos) and decide: the most different pictures first, then every
        picture of the videos they did not already drop."""
        c = self.config
        results: dict[str, Result] = {}
        undecided = videos
        if c.early_drop_frames:
            self.embed_pictures(videos, {v.key: most_different_pictures(v, c.early_drop_frames) for v in videos})
            undecided = []
            for video in videos:
                early = partial_similarity(video)
                if early is not None and early > c.threshold + c.early_drop_margin:
                    results[video.key] = self.early_drop(video, early)
                else:
                    undecided.append(video)
        self.embed_pictures(undecided, {v.key: list(np.unique(v.same_as)) for v in undecided})
        for video in undecided:
            results[video.key] = self.decide(video, video_similarity(video))
        return results

    def embed_pictures(self, videos: list[SampledVideo], pictures: dict[str, list[int]]) -> None:
        """Embed the wanted pictures (by first-occurrence frame) that the videos don't have yet,
        all videos' frames together so forward passes are full batches."""
        wanted = [
            (video, int(first))
            for video in videos
            for first in pictures[video.key]
            if int(first) not in video.embeddings
        ]
        if not wanted:
            return
        embeddings = self.embedder.embed([video.frames[first] for video, first in wanted])
        for (video, first), embedding in zip(wanted, embeddings, strict=True):
            video.embeddings[first] = embedding

    def early_drop(self, video: SampledVideo, similarity: float) -> Result:
        c, k = self.config, len(video.embeddings)
        return Result.dropped(
            video.key,
            f"similar_frames: its {k} most different pictures already score {similarity:.3f} > "
            f"{c.threshold:g} + {c.early_drop_margin:g} ({self.embedder.model_name}); rest not embedded",
            **self.metrics(video, similarity=similarity, scored=k, decided_by="early_drop"),
        )

    def decide(self, video: SampledVideo, similarity: float) -> Result:
        n = len(video.frames)
        metrics = self.metrics(video, similarity=similarity, scored=n, decided_by="embedder")
        threshold = self.config.threshold
        if similarity > threshold:
            return Result.dropped(
                video.key,
                f"similar_frames: frame_similarity {similarity:.3f} > {threshold:g} over {n} frames "
                f"({self.embedder.model_name})",
                **metrics,
            )
        return Result.ok(video.key, **metrics)

    def metrics(self, video: SampledVideo, similarity: float, scored: int, decided_by: str) -> dict[str, Any]:
        return {
            **self.identity,
            "frame_similarity": similarity,
            "decided_by": decided_by,
            "frames_read": len(video.frames),
            "frames_scored": scored,
            "distinct_frames": distinct_frames(video.same_as),
            "embedded_frames": len(video.embeddings),
            "max_grey_difference": float(video.differences.max()),
            "leader_skipped_s": video.leader_skipped_s,
            "decoder": video.decoder,
        }


# ---------------------------------------------------------------- checks and similarity math


def embedder_input_side(c: FilterConfig) -> int:
    """The side CLIP resizes frames to (224 for ViT-B-32), read from open_clip's model config."""
    if c.embedder != "clip":
        return FRAME_SHORT_SIDE
    import open_clip

    size = (open_clip.get_model_config(c.model) or {}).get("vision_cfg", {}).get("image_size", FRAME_SHORT_SIDE)
    return int(size if isinstance(size, int) else max(size))


def shrink_to_short_side(frame: np.ndarray, short_side: int) -> np.ndarray:
    """A frame larger than the embedder needs, resized as soon as it is decoded (16 4K frames
    would hold ~400 MB per video, and cross Ray as such from the decode tasks). The size and
    filter are the ones CLIP's own preprocessing computes (shortest side to 224, PIL bicubic),
    so its resize becomes a no-op and the embeddings are unchanged."""
    height, width = frame.shape[:2]
    if min(height, width) <= short_side:
        return frame
    from PIL import Image

    if width <= height:
        size = (short_side, int(short_side * height / width))
    else:
        size = (int(short_side * width / height), short_side)
    return np.asarray(Image.fromarray(frame).resize(size, Image.BICUBIC))

def check_config(c: FilterConfig) -> None:
    if c.decode_cpus is not None and c.decode_cpus < 0:
        raise ConfigError(f"config key 'filter.decode_cpus' must be None or >= 0, got {c.decode_cpus!r}")
    if c.frames < 2:
        raise ConfigError(f"config key 'filter.frames' must be at least 2 (similarity needs pairs), got {c.frames!r}")
    if c.early_drop_frames and not 2 <= c.early_drop_frames < c.frames:
        raise ConfigError(
            f"config key 'filter.early_drop_frames' must be 0 or between 2 and filter.frames-1, "
            f"got {c.early_drop_frames!r}"
        )


def check_length(reader: FrameReader, min_duration_s: float) -> None:
    if reader.frame_count <= 0:
        raise MediaError(f"no_frames: the {reader.decoder} decoder finds no video frames")
    if reader.frame_count < 2 or reader.duration_s < min_duration_s:
        raise MediaError(
            f"too_short: {reader.duration_s:.2f}s ({reader.frame_count} frames) < "
            f"filter.min_duration_s={min_duration_s:g}s"
        )


def grey_thumbnails(frames: list[np.ndarray]) -> np.ndarray:
    import cv2

    size = (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    return np.stack(
        [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for f in frames]
    ).astype(np.float32)


def grey_differences(thumbnails: np.ndarray) -> np.ndarray:
    """Mean absolute grey difference (0-255) between every pair of thumbnails."""
    flat = thumbnails.reshape(len(thumbnails), -1)
    return np.abs(flat[:, None, :] - flat[None, :, :]).mean(axis=2)


def same_picture(differences: np.ndarray, tolerance: float) -> np.ndarray:
    """For each frame, the first frame showing the same picture (itself when none earlier does)."""
    n = len(differences)
    same_as = np.arange(n)
    for i in range(1, n):
        for first in np.unique(same_as[:i]):
            if differences[i, first] <= tolerance:
                same_as[i] = first
                break
    return same_as


def distinct_frames(same_as: np.ndarray) -> int:
    return len(np.unique(same_as))


def leading_blanks(frames: list[np.ndarray]) -> int:
    stds = grey_thumbnails(frames).reshape(len(frames), -1).std(axis=1)
    blank = stds < BLANK_STD
    return int(np.argmin(blank)) if not blank.all() else len(frames)


def most_different_pictures(video: SampledVideo, k: int) -> list[int]:
    """Up to k pictures (first-occurrence frames), each the one farthest in grey from those
    already picked, starting from the two most different. Being spread out, they tend to score
    lower than all frames together, so a high score among them is safe ground for an early drop."""
    pictures = np.unique(video.same_as)
    if len(pictures) <= k:
        return [int(p) for p in pictures]
    differences = video.differences[np.ix_(pictures, pictures)]
    first, second = np.unravel_index(int(np.argmax(differences)), differences.shape)
    picked = [int(first), int(second)]
    while len(picked) < k:
        nearest = differences[:, picked].min(axis=1)
        nearest[picked] = -1.0
        picked.append(int(np.argmax(nearest)))
    return sorted(int(pictures[i]) for i in picked)


def frame_similarity(embeddings: np.ndarray, same_as: np.ndarray | None = None) -> float:
    """Mean cosine similarity over all ordered pairs (i, j), i != j, of frames.

    `embeddings` holds one row per distinct picture; frame i's row is `same_as[i]` (default: one
    row per frame). Two frames showing the same picture have similarity 1 by definition, which
    also covers pictures whose feature vector is zero (a flat frame under the pixels embedder).
    """
    vectors = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms > 0, norms, 1.0)
    picture_similarity = unit @ unit.T
    np.fill_diagonal(picture_similarity, 1.0)
    rows = np.arange(len(vectors)) if same_as is None else np.asarray(same_as)
    pairs = picture_similarity[np.ix_(rows, rows)]
    n = len(rows)
    if n < 2:
        raise ValueError("frame_similarity needs at least 2 frames")
    return float((pairs.sum() - np.trace(pairs)) / (n * (n - 1)))


def partial_similarity(video: SampledVideo) -> float | None:
    """Similarity among the pictures embedded so far, each counted once; None once every picture
    is embedded (the full score is then exact and cheap)."""
    if len(video.embeddings) == distinct_frames(video.same_as):
        return None
    return frame_similarity(np.stack(list(video.embeddings.values())))


def video_similarity(video: SampledVideo) -> float:
    """frame_similarity over every frame read, from one embedding per picture."""
    firsts = sorted(video.embeddings)
    row_of = {first: row for row, first in enumerate(firsts)}
    rows = np.array([row_of[int(first)] for first in video.same_as])
    return frame_similarity(np.stack([video.embeddings[first] for first in firsts]), rows)


# ---------------------------------------------------------------- embedders


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
        self, model: str, pretrained: str, weights: Weights, device: str, batch_frames: int, precision: str = "fp32"
    ) -> None:
        import open_clip
        import torch

        tag = open_clip.get_pretrained_cfg(model, pretrained)
        with torch.random.fork_rng(devices=[]), _quiet_root_logger():
            torch.manual_seed(RANDOM_SEED)
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
        cache_lookup=(lambda: _hub_cache(hub_repo)) if hub_repo else None,
        download=(lambda target: _hub_download(hub_repo, target)) if hub_repo else None,
    )


def _hub_repo(model: str, pretrained: str) -> str | None:
    import open_clip

    return (open_clip.get_pretrained_cfg(model, pretrained).get("hf_hub") or "").strip("/") or None


def _hub_cache(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in CHECKPOINT_NAMES:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    return None


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


__all__ = ["Filter", "FilterConfig", "frame_similarity"]
