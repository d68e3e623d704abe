"""The JSON behind the browser's two detail pages: a candidate (its end, the frames the filter saw,
a retry command, its clips, its lineage) and a clip (media to play, the 50 Hz timeline, lineage)."""

from __future__ import annotations

from typing import Any

import pipeline.tools.browse.data as data
from pipeline.tools import audit
from pipeline.tools.browse.media import Refused, beats_arrays

CLIP_FIELDS = ("key", "video_key", "clip_index", "start_s", "end_s", "status", "stage", "reason", "source",
               "frame_similarity", "vocal_residual", "alignment", "n_music_beats", "n_video_beats", "split",
               "shard", "weights")


def retry_hint(browser: Any, status: str | None, stage: str | None) -> dict[str, str] | None:
    """How to redo a row that did not pass: failed rows are redone with run.retry_failed; a dropped
    row is final for its stage's params, and is redone only when an option of the stage changes."""
    config = browser.config_path
    if status == "failed" and stage:
        return {"command": f"discomv {stage} -c {config} --set run.retry_failed=true",
                "note": f"redo the rows whose last {stage} status is failed (then the stages after it: "
                        f"discomv run -c {config} --from {stage} --set run.retry_failed=true)"}
    if status == "dropped" and stage:
        return {"command": f"discomv {stage} -c {config} --set {stage}.OPTION=VALUE",
                "note": f"a drop is final for these {stage} options; changing one (discomv {stage} --help) "
                        "redoes every row of the stage"}
    if status == "pending" and stage:
        return {"command": f"discomv run -c {config} --from {stage}", "note": "not run yet"}
    return None


def lineage(browser: Any, key: str) -> list[dict[str, Any]]:
    """What `discomv audit --key` prints: every row ever written for the key, stage by stage."""
    out = []
    for row in audit.lineage(browser.tables.store, key):
        out.append({k: v for k, v in row.items() if v not in (None, "", [])
                    and k not in ("music_beats", "video_beats", "beat_weights")})
    return out


def _has(browser: Any, key: str, what: str) -> bool:
    try:
        return browser.media(key, what) is not None
    except Refused:
        return False


def candidate_page(browser: Any, key: str) -> dict[str, Any] | None:
    row = data.one_row(browser.tables, "candidates", key)
    if row is None:
        return None
    stages = {}
    for name in audit.levels()[0]:
        found = data.stage_row(browser.tables, name, key)
        if found is not None:
            stages[name] = {"status": found["status"], "reason": found["reason"], "weights": found["weights"]}
    return {
        "candidate": row,
        "stages": stages,
        "retry": retry_hint(browser, row["status"], row["stage"]),
        "has_video": _has(browser, key, "video"),
        "clips": data.clip_keys(browser.tables, key),
        "lineage": lineage(browser, key),
    }


def clip_page(browser: Any, key: str) -> dict[str, Any] | None:
    row = data.one_row(browser.tables, "clips", key)
    if row is None:
        return None
    full = data.one_row(browser.tables, "clips_audit", key) or {}
    video_key = row["video_key"]
    start = float(row["start_s"] or 0.0)
    # the video and its instrumental from media (played from start_s), else the shard's own clip members
    video = _playable(browser, video_key, "video", start, key, "clip.mp4")
    instrumental = _playable(browser, video_key, "instrumental", start, key, "clip.flac")
    clip = {name: row.get(name) for name in CLIP_FIELDS}
    clip["beats_path"] = full.get("beats_path")
    beats = beats_arrays({**full, "key": key}, browser.roots, browser.members)
    return {
        "clip": {k: v for k, v in clip.items() if k != "beats_path"},
        "video": video,
        "instrumental": instrumental,
        "beats": beats,
        "retry": retry_hint(browser, row["status"], row["stage"]),
        "duration_s": float((row["end_s"] or start + 10.0) - start),
        "lineage": lineage(browser, video_key) + lineage(browser, key),
    }


def _playable(browser: Any, video_key: str, medium: str, start: float, key: str, member: str) -> dict | None:
    """Where a clip's `medium` plays from: the video's media file (from the clip's start), else the
    shard's own clip member (from 0), else nowhere."""
    if _has(browser, video_key, medium):
        return {"url": f"/media/{video_key}/{medium}", "offset_s": start, "from": "media"}
    if _has(browser, key, member):
        return {"url": f"/media/{key}/{member}", "offset_s": 0.0, "from": f"shard {member.split('.')[1]} member"}
    return None
