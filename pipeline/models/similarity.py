"""Frame-similarity maths of the filter score, usable without the stage.

Frames within a tolerance of an earlier frame (mean absolute grey difference of 32×32 thumbnails)
are the same picture and share its embedding. `frame_similarity` = mean cosine similarity over all
ordered pairs of scored frames, diagonal excluded (VMAs kept DISCO-10M videos scoring under 0.7; a
single image looped for minutes scores ~1). Similarities are always computed in float64 from the
embeddings, whatever precision the embedder ran in. `sample_frames` spreads the sampled frames
uniformly, optionally from the end of a black/blank opening (found by the thumbnails' grey spread).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.media.frames import FrameReader, uniform_indices

THUMBNAIL_SIZE = 32  # grey thumbnails for the identical-frame check and blank detection
LEADER_PASSES = 4  # resampling passes that close in on the end of a blank leader
BLANK_STD = 3.0  # a thumbnail with less grey-level spread than this is a blank (black, white, flat) frame


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


def sample_frames(
    reader: FrameReader, count: int, shrink: Callable[[np.ndarray], np.ndarray], skip_blank_leader: bool
) -> tuple[list[np.ndarray], int]:
    """`count` frames spread uniformly from the first frame, or from the end of a blank leader
    (`skip_blank_leader`), and the index they start from."""
    start = 0
    indices = uniform_indices(start, reader.frame_count, count)
    frames = reader.read(indices, shrink)
    if not skip_blank_leader:
        return frames, start
    for _ in range(LEADER_PASSES):
        blank = leading_blanks(frames)
        if blank == 0 or blank == len(frames):
            break  # no leader; or nothing but blank frames, which the static check will judge
        # the leader ends between the last blank sample and the next one: sample again from there
        start = indices[blank - 1] + 1
        indices = uniform_indices(start, reader.frame_count, count)
        frames = reader.read(indices, shrink)
    else:
        blank = leading_blanks(frames)
        if 0 < blank < len(frames) - 1:  # leader frames the passes did not get past
            frames, start = frames[blank:], indices[blank]
    return frames, start


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
