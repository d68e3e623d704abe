"""Beats on the step grid: music onsets, optical-flow "video beats", their overlap and the VMAs beat
weights, plus the extras (RMS, chroma, shot cuts). Plain numpy/librosa on decoded samples and
flow values, explicit arguments, no model weights: usable without the beats stage (which
explains the rules: stages/beats.py). Step t of a clip sits at `start_s + t / step_hz`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- music beats


@dataclass
class MusicBeats:
    beats: Any  # int8 (steps,)
    envelope: Any  # float32 (steps,)
    tempo_bpm: float | None


def music_beats(
    audio: Any, sample_rate: int, context_samples: int, n_steps: int, step_hz: int, onset_delta: float
) -> MusicBeats:
    """librosa onsets on the step grid. The hop is one step when sample_rate / step_hz is whole
    (32 kHz / 50 = 640); otherwise the nearest hop, and frames are mapped to steps by time.
    `audio` starts `context_samples` before the clip start."""
    import librosa
    import numpy as np

    sr = sample_rate
    hop = max(1, int(round(sr / step_hz)))
    envelope = librosa.onset.onset_strength(y=audio, sr=sr, hop_length=hop)
    frame_s = (np.arange(len(envelope)) * hop - context_samples) / sr  # seconds from clip start
    onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=sr, hop_length=hop, delta=onset_delta)
    steps = np.round(frame_s[onsets] * step_hz).astype(int)
    beats = np.zeros(n_steps, dtype=np.int8)
    beats[steps[(steps >= 0) & (steps < n_steps)]] = 1
    on_steps = np.interp(np.arange(n_steps) / step_hz, frame_s, envelope).astype(np.float32)
    tempo = None
    if beats.any():
        clip_envelope = envelope[frame_s >= 0]
        tempo = float(librosa.feature.tempo(onset_envelope=clip_envelope, sr=sr, hop_length=hop)[0])
    return MusicBeats(beats, on_steps, tempo)


# ---------------------------------------------------------------- beats on the step grid


def flow_on_steps(pair_magnitudes: Any, video_fps: float, step_hz: int, n_steps: int) -> Any:
    """Pair j (frames j, j+1) sits at the midpoint of their times, (j + 0.5) / video_fps, where
    the motion happened on average; steps outside the first/last midpoint get 0 (no motion known)."""
    import numpy as np

    knots = (np.arange(len(pair_magnitudes)) + 0.5) / video_fps * step_hz
    return np.interp(np.arange(n_steps), knots, pair_magnitudes, left=0.0, right=0.0).astype(np.float32)


def window_peaks(values: Any, window: int, floor: float) -> Any:
    """1 where values[t] > every other value in [t - window, t + window] and >= floor.
    Strict: a flat stretch (a still picture's zero or constant flow) has no peak."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    padded = np.pad(values, window, constant_values=-np.inf)
    neighbours = np.lib.stride_tricks.sliding_window_view(padded, 2 * window + 1).copy()
    neighbours[:, window] = -np.inf  # the centre itself
    return ((values > neighbours.max(axis=1)) & (values >= floor)).astype(np.int8)


def beat_overlap(video_beats: Any, music_beats: Any, tolerance: int) -> Any:
    """1 at each video beat that has a music beat within ±tolerance steps."""
    import numpy as np

    near_music = np.convolve(np.asarray(music_beats, dtype=np.int32), np.ones(2 * tolerance + 1, np.int32), "same")
    return ((np.asarray(video_beats) > 0) & (near_music > 0)).astype(np.int8)


def beat_weights(overlap: Any, weight: float) -> Any:
    import numpy as np

    return (1.0 + weight * np.asarray(overlap, dtype=np.float32)).astype(np.float32)


def alignment_score(video_beats: Any, overlap: Any) -> float | None:
    count = int(video_beats.sum())
    return float(overlap.sum()) / count if count else None


# ---------------------------------------------------------------- extras (for other V2M models)


def audio_features(audio: Any, sample_rate: int, rate_hz: int) -> dict[str, Any]:
    """float16 `rms` (n) and `chroma` (12 x n) of the clip's audio at `rate_hz`."""
    import librosa
    import numpy as np

    y, sr = audio, sample_rate
    hop = max(1, int(round(sr / rate_hz)))
    count = int(round(len(y) / sr * rate_hz))
    rms = librosa.feature.rms(y=y, hop_length=hop)[0]
    chroma = librosa.feature.chroma_stft(y=y, sr=sr, hop_length=hop)
    return {"rms": _fit(rms, count).astype(np.float16), "chroma": _fit(chroma, count).astype(np.float16)}


def _fit(values: Any, count: int) -> Any:
    """Trim or edge-pad the last axis to `count` frames (librosa's centred frames give one extra)."""
    import numpy as np

    values = values[..., :count]
    missing = count - values.shape[-1]
    if missing > 0:
        values = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, missing)], mode="edge")
    return values


def shot_cuts(grey_frames: Any, video_fps: float, threshold: float) -> Any:
    """Seconds (from the clip start) between two sampled frames whose mean absolute grey difference
    exceeds `threshold`: a cut changes most pixels at once, motion changes few. A cut that spills
    into the next pair (a transition, a fast first second of the new shot) counts once."""
    import numpy as np

    frames = grey_frames.astype(np.int16)
    change = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2)) / 255.0
    pairs = np.flatnonzero(change > threshold)
    first_of_runs = pairs[np.diff(pairs, prepend=-2) > 1]
    return ((first_of_runs + 0.5) / video_fps).astype(np.float32)


# ---------------------------------------------------------------- artifact


def load_beats(path: str | Path) -> dict[str, Any]:
    """The arrays of one clip's beats artifact, `<media_root>/beats/<key>.npz` (no pickle)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
