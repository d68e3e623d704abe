"""clips: each separated video → fixed-length windows (default 10 s). From here on a row is a clip,
keyed `{video}_{index:03d}`; the window is recorded, no media is cut (later stages read the window
from the video and the instrumental, so audio and frames share one timeline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.options import ConfigError, clip_length, option
from pipeline.stage import Resources, Result, Row, Stage


@dataclass
class ClipsConfig:
    clip_s: float = clip_length(restates=None)
    hop_s: float = option(10.0, "start-to-start distance between clips; < clip_s overlaps them")
    max_clips: int | None = option(None, "at most this many clips per video (None: all)")
    last_partial: str = option("drop", "the last clip shorter than clip_s: drop | pad (downstream pads it)",
                               choices=("drop", "pad"))
    min_partial_s: float = option(3.0, "with last_partial=pad, keep a partial clip only if this long")
    batch_size: int = option(64, "videos cut into clips per call (cheap: large batches save scheduling)", output=False)


class Clips(Stage):
    name = "clips"
    upstream = "separate"
    version = "1"
    fans_out = True
    Config = ClipsConfig
    schema = pa.schema(
        [
            ("video_key", pa.string()),
            ("clip_index", pa.int32()),
            ("start_s", pa.float64()),
            ("end_s", pa.float64()),
            ("padded_s", pa.float64()),  # seconds past the end of the media, to be padded
        ]
    )

    def __init__(self, config: ClipsConfig, run: Any) -> None:
        super().__init__(config, run)
        if config.clip_s <= 0 or config.hop_s <= 0:
            raise ConfigError("config keys 'clips.clip_s' and 'clips.hop_s' must be > 0")

    @property
    def resources(self) -> Resources:
        return Resources(num_cpus=0.25, batch_size=self.config.batch_size)

    def process(self, rows: list[Row]) -> list[Result]:
        return [result for row in rows for result in self.clip_video(row)]

    def clip_video(self, row: Row) -> list[Result]:
        key = row["key"]
        duration = media_duration(row)
        if not duration:
            return [Result.failed(key, "no_duration: upstream rows carry no duration", video_key=key)]
        windows = clip_windows(duration, self.config)
        if not windows:
            return [Result.dropped(
                key, f"too_short: {duration:.1f}s gives no {self.config.clip_s:g}s clip", video_key=key
            )]
        return [
            Result.ok(f"{key}_{i:03d}", video_key=key, clip_index=i, start_s=start, end_s=end,
                      padded_s=max(0.0, end - duration))
            for i, (start, end) in enumerate(windows)
        ]


def media_duration(row: Row) -> float | None:
    """The shortest of the durations upstream stages measured: a clip must exist in every stream."""
    found = [row[c] for c in ("audio_duration_s", "media_duration_s") if row.get(c)]
    return min(found) if found else None


def clip_windows(duration: float, c: ClipsConfig) -> list[tuple[float, float]]:
    windows = []
    start = 0.0
    eps = 1e-6
    while start + eps < duration and (c.max_clips is None or len(windows) < c.max_clips):
        end = start + c.clip_s
        if end > duration + eps:
            if c.last_partial == "pad" and duration - start >= c.min_partial_s:
                windows.append((round(start, 6), round(end, 6)))
            break
        windows.append((round(start, 6), round(end, 6)))
        start += c.hop_s
    return windows
