"""A track decoded once to raw float32 on scratch disk, then read back window by window.

ffmpeg decodes the audio once (44.1 kHz stereo for htdemucs) into a scratch file of raw float32
while the statistics Demucs normalises by are accumulated (mean/std of the mono mix, the same
whole-track normalisation as the `demucs` CLI), so a track of any length costs one chunk of memory.
The Track also carries what separation accumulates about it (pipeline/models/separation.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.media.audio import stream_audio

SILENCE_RMS = 1e-5  # below about -100 dBFS the track is digital silence


@dataclass
class Track:
    """One decoded track: raw float32 frames on scratch disk plus what separation accumulates."""

    key: str
    raw_path: Path
    frames: int
    channels: int
    sample_rate: int
    mean: float
    std: float
    mix_energy: float
    vocal_energy: float = 0.0
    block_vocal_energy: dict[int, float] = field(default_factory=dict)
    instrumental_source: bool = False
    kept_original: bool = False  # instrumental probe: not separated, the original audio is kept
    vocal_ratio_before: float = 0.0
    segments_separated: int = 0

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    @property
    def silent(self) -> bool:
        return self.mix_energy <= (SILENCE_RMS**2) * max(1, self.frames * self.channels)

    def read(self, start: int, count: int, normalized: bool = False) -> Any:
        """Frames [start, start+count) as (channels, count) float32, zeros outside the track
        (after normalising, as Demucs pads the normalised track)."""
        import numpy as np

        out = np.zeros((self.channels, count), dtype=np.float32)
        lo, hi = max(0, start), min(self.frames, start + count)
        if hi > lo:
            with open(self.raw_path, "rb") as f:
                f.seek(lo * self.channels * 4)
                data = np.fromfile(f, dtype=np.float32, count=(hi - lo) * self.channels)
            data = data.reshape(-1, self.channels).T
            out[:, lo - start:hi - start] = (data - self.mean) / self.std if normalized else data
        return out

    def discard(self) -> None:
        self.raw_path.unlink(missing_ok=True)


def decode_to_scratch(key: str, source: Path, raw: Path, sample_rate: int, channels: int) -> Track:
    """Decode once to raw float32 on disk, accumulating Demucs' normalisation statistics
    (mean and unbiased std of the mono mix) in float64 on the way."""
    import numpy as np

    frames, total, total_sq, energy = 0, 0.0, 0.0, 0.0
    try:
        with open(raw, "wb") as out:
            for chunk in stream_audio(source, sample_rate, channels):
                mono = chunk.astype(np.float64).mean(axis=1)
                total += float(mono.sum())
                total_sq += float(np.dot(mono, mono))
                energy += float(np.square(chunk, dtype=np.float64).sum())
                frames += len(chunk)
                chunk.tofile(out)
    except BaseException:
        raw.unlink(missing_ok=True)
        raise
    mean = total / frames if frames else 0.0
    variance = (total_sq - frames * mean * mean) / (frames - 1) if frames > 1 else 0.0
    std = float(np.sqrt(max(variance, 0.0))) + 1e-8
    return Track(key, raw, frames, channels, sample_rate, mean, std, energy)


def copy_original(track: Track, writer: Any, chunk: int = 1 << 18) -> None:
    """The track's own audio, clipped to [-1, 1], into `writer` (an instrumental source keeps it)."""
    import numpy as np

    for first in range(0, track.frames, chunk):
        count = min(chunk, track.frames - first)
        writer.write(np.clip(track.read(first, count), -1.0, 1.0).T)

