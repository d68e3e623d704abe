"""ffprobe and integrity checks; MediaError carries a `class: message` reason."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class MediaError(RuntimeError):
    """A media file that can't be used; `str(e)` is a `class: message` reason."""


@dataclass
class Probe:
    duration_s: float
    has_video: bool
    has_audio: bool
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    vcodec: str | None = None
    acodec: str | None = None
    audio_sample_rate: int | None = None
    audio_channels: int | None = None
    rotation: int = 0


def run_tool(cmd: list[str], timeout_s: float, timeout_reason: str) -> subprocess.CompletedProcess:
    """Run ffmpeg/ffprobe (argument list, output captured); a timeout becomes a MediaError row reason."""
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise MediaError(timeout_reason) from e


def probe(path: str | Path, timeout_s: float = 60) -> Probe:
    cmd = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)]
    out = run_tool(cmd, timeout_s, f"probe_timeout: ffprobe took more than {timeout_s}s")
    if out.returncode != 0:
        msg = out.stderr.decode("utf-8", "replace").strip().splitlines()
        raise MediaError(f"corrupt: ffprobe cannot read the file ({msg[-1] if msg else 'no output'})")
    info = json.loads(out.stdout or b"{}")
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video" and not _is_cover_art(s)), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    duration = _float(info.get("format", {}).get("duration"))
    if duration is None:
        duration = max((_float(s.get("duration")) or 0.0 for s in streams), default=0.0)
    return Probe(
        duration_s=duration or 0.0,
        has_video=video is not None,
        has_audio=audio is not None,
        width=_int(video.get("width")) if video else None,
        height=_int(video.get("height")) if video else None,
        fps=_rate(video.get("avg_frame_rate")) if video else None,
        vcodec=video.get("codec_name") if video else None,
        acodec=audio.get("codec_name") if audio else None,
        audio_sample_rate=_int(audio.get("sample_rate")) if audio else None,
        audio_channels=_int(audio.get("channels")) if audio else None,
        rotation=_rotation(video) if video else 0,
    )


def check_tail_decodes(path: str | Path, seconds: float = 2.0, timeout_s: float = 60,
                       info: Probe | None = None) -> None:
    """Decode the last seconds: a file truncated after a front `moov` probes fine but fails here, and
    so does a stream whose packets are damaged (`corrupt_audio` / `corrupt_video`, named from the
    decoder in ffmpeg's messages when `info` gives the codecs)."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-sseof", f"-{seconds}", "-i", str(path), "-f", "null", "-"]
    out = run_tool(cmd, timeout_s, f"decode_timeout: decoding the last {seconds}s took more than {timeout_s}s")
    err = out.stderr.decode("utf-8", "replace").strip()
    if out.returncode == 0 and not err:
        return
    lines = [re.sub(r" @ 0x[0-9a-f]+\]", "]", line) for line in err.splitlines()]  # no pointers in reasons
    first = lines[0] if lines else f"exit {out.returncode}"
    if "partial file" in err or "moov atom not found" in err or not lines:
        raise MediaError(f"truncated: the end of the file does not decode ({first})")
    for kind, codec in (("audio", info and info.acodec), ("video", info and info.vcodec)):
        complaint = next((line for line in lines if codec and line.startswith(f"[{codec}]")), None)
        if complaint:
            raise MediaError(f"corrupt_{kind}: the {kind} stream ({codec}) does not decode ({complaint})")
    if out.returncode != 0 or "Invalid data" in err or "error while decoding" in err.lower():
        raise MediaError(f"corrupt: the end of the file does not decode ({first})")


def _is_cover_art(stream: dict[str, Any]) -> bool:
    return bool(stream.get("disposition", {}).get("attached_pic"))


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _rate(value: Any) -> float | None:
    if not value or value == "0/0":
        return None
    num, _, den = str(value).partition("/")
    try:
        return float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None


def _rotation(stream: dict[str, Any]) -> int:
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            return int(_float(side["rotation"]) or 0)
    return int(_float(stream.get("tags", {}).get("rotate")) or 0)




def short_error(error: BaseException, limit: int = 200) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    # decord prefixes messages with "[time] /path/to/source.cc:123: [file]"
    text = re.sub(r"^(\s*(\[[^\]]*\]|\S+\.cc:\d+:))+\s*", "", text)
    return text[:limit]
