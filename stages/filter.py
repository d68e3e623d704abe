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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.media.frames import DECODERS, FrameReader
from pipeline.media.probe import MediaError
from pipeline.media.staging import media_store
from pipeline.models.clip import (
    FRAME_SHORT_SIDE,
    ClipEmbedder,
    PixelEmbedder,
    clip_input_side,
    load_clip_embedder,
    resolve_clip_weights,
)
from pipeline.models.precision import PRECISIONS
from pipeline.models.similarity import (
    SampledVideo,
    distinct_frames,
    grey_differences,
    grey_thumbnails,
    most_different_pictures,
    partial_similarity,
    same_picture,
    sample_frames,
    shrink_to_short_side,
    video_similarity,
)
from pipeline.models.weights import pick_device
from pipeline.options import ConfigError, ModelWorkerOptions, option
from pipeline.stage import Resources, Result, Row, Stage

log = logging.getLogger("discomv")

EMBEDDERS = ("clip", "pixels")
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


class Filter(Stage):
    name = "filter"
    upstream = "download"
    version = "1"
    reads = frozenset({"video"})
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
            self.embedder = load_clip_embedder(
                c.model, c.pretrained, self.run.weights, self.run.models_root, pick_device(c.device, c.num_gpus),
                c.precision, c.embed_batch, c.seed,
            )
            self.weights_stamp = self.embedder.weights.stamp
            sha256, precision = self.embedder.weights.sha256, self.embedder.precision
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
        media = media_store(self.run)  # prepare() may run in a task that never ran setup()
        if not media.is_file(path):
            decoded["failure"] = f"missing_file: no video at {path!r} (re-run download)"
            return {**row, FRAMES: frames, DECODED: decoded}
        reader: FrameReader | None = None
        try:
            with media.local(path) as file:
                reader = FrameReader(str(file), self.config.decoder)
                check_length(reader, self.config.min_duration_s)
                read, start = sample_frames(reader, self.config.frames, self.shrink, self.config.skip_blank_leader)
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
        if not hasattr(self, "frame_side"):  # the side the embedder resizes frames to
            c = self.config
            self.frame_side = clip_input_side(c.model) if c.embedder == "clip" else FRAME_SHORT_SIDE
        return shrink_to_short_side(frame, self.frame_side)

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


# ---------------------------------------------------------------- checks


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


__all__ = ["Filter", "FilterConfig"]
