"""The one clip timeline every clip-level stage, the shard format and the trainer share.

A clip is `CLIP_S` seconds; its music and video beats, tokens and beat weights live on EnCodec's
`STEP_HZ` grid, step t at `start_s + t / STEP_HZ`: `STEPS` steps per clip. Stage options that restate
these (clips.clip_s, tokens.clip_s, beats.step_hz, …) default to them and are cross-checked when the
config loads (`same_as` in pipeline/options.py)."""

from __future__ import annotations

from typing import Any

CLIP_S = 10.0
STEP_HZ = 50  # EnCodec 32 kHz: 640-sample hop
STEPS = int(CLIP_S * STEP_HZ)  # 500 steps per 10 s clip


def check_window(row: dict[str, Any], clip_s: float) -> str | None:
    """A reason when the row's window is not one clip of `clip_s` seconds (clips.clip_s differs)."""
    try:
        start, end = float(row["start_s"]), float(row["end_s"])
    except (KeyError, TypeError, ValueError):
        return "bad_window: the row has no start_s/end_s (run the clips stage)"
    if abs((end - start) - clip_s) > 1e-3:
        return f"bad_window: clip is {end - start:g}s but clip_s is {clip_s:g}s (set clips.clip_s to match)"
    return None
