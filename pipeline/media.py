"""Media helpers shared by stages: ffprobe, integrity checks. Argument lists only, never a shell."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
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


# ---------------------------------------------------------------- frame sampling

DECODERS = ("auto", "decord", "ffmpeg")


def uniform_indices(start: int, stop: int, n: int) -> list[int]:
    """`n` frame indices spread evenly over [start, stop), first and last included; fewer when the
    range holds fewer than `n` frames."""
    count = stop - start
    if count <= 0:
        return []
    if count <= n:
        return list(range(start, stop))
    return sorted({start + round(i * (count - 1) / (n - 1)) for i in range(n)}) if n > 1 else [start]


class FrameReader:
    """Frames of one video by index, as RGB uint8 arrays.

    decord first, with keyframe-aware seeking; with `decoder="auto"` a file decord cannot open or
    read (MPEG-TS, GIF, Ogg) falls back to one ffmpeg pass that keeps the wanted frames.
    `decoder` names the backend that produced the frames.
    """

    def __init__(self, path: str | Path, decoder: str = "auto") -> None:
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self.path = Path(path)
        self.may_fall_back = decoder == "auto"
        self.failures: list[str] = []
        self.decoder = ""
        self.frame_count = 0
        self.fps = 0.0
        if decoder in ("auto", "decord") and self._open_decord():
            return
        if decoder == "decord":
            raise MediaError(f"unreadable: decord cannot open the file ({self.failures[-1]})")
        self._open_ffmpeg()

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps if self.fps else 0.0

    def frame_starts(self) -> Any:
        """Each frame's start time in seconds: the container's timestamps through decord (right for
        variable frame rates, where index / average fps drifts), index / fps for the ffmpeg fallback."""
        import numpy as np

        if self.decoder == "decord" and self.frame_count:
            return np.asarray(self._reader.get_frame_timestamp(range(self.frame_count))[:, 0], dtype=np.float64)
        return np.arange(self.frame_count) / (self.fps or 25.0)

    def indices_at(self, times_s: list[float]) -> tuple[list[int], int]:
        """The frame whose start is nearest each time, and how many times fall before the end of the
        last frame (the rest get the last frame, so a partial clip still gets every index)."""
        import numpy as np

        starts = self.frame_starts()
        if len(starts) == 0:
            return [], 0
        times = np.asarray(times_s, dtype=np.float64)
        after = np.clip(np.searchsorted(starts, times), 0, len(starts) - 1)
        before = np.maximum(after - 1, 0)
        nearest = np.where(np.abs(times - starts[before]) <= np.abs(starts[after] - times), before, after)
        if self.decoder == "decord":
            end = float(self._reader.get_frame_timestamp([self.frame_count - 1])[0, 1])
        else:
            end = self.frame_count / (self.fps or 25.0)
        return [int(i) for i in nearest], int((times < end).sum())

    def read(self, indices: list[int], transform: Callable[[Any], Any] | None = None) -> list[Any]:
        """The frames at `indices`; `transform` (e.g. a resize) is applied to each frame as soon as
        it is decoded, so a 4K video never holds more than one full-size frame at a time."""
        keep = transform or (lambda frame: frame)
        if self.decoder == "decord":
            try:
                return self._read_decord(indices, keep)
            except _decord_errors() as e:
                self.failures.append(f"decord: {_short(e)}")
                if not self.may_fall_back:
                    raise MediaError(f"unreadable: decord cannot decode the file ({_short(e)})") from e
                self._open_ffmpeg()
        return self._read_ffmpeg(indices, keep)

    # decord ------------------------------------------------------------

    def _open_decord(self) -> bool:
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        try:
            # one thread per reader: callers decode several videos in parallel instead
            self._reader = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=1)
            self._keyframes = sorted(int(k) for k in self._reader.get_key_indices()) or [0]
        except _decord_errors() as e:
            self.failures.append(f"decord: {_short(e)}")
            return False
        self.decoder = "decord"
        self.frame_count = len(self._reader)
        self.fps = float(self._reader.get_avg_fps() or 0.0)
        return True

    def _read_decord(self, indices: list[int], keep: Callable[[Any], Any]) -> list[Any]:
        """Each wanted frame costs decoding from its keyframe, but frames of one GOP are reached by
        decoding forward from the previous one, never by seeking back to the keyframe (decord's
        get_batch seeks for every index: ~2x slower on long GOPs, same frames)."""
        import bisect

        reader = self._reader
        decoded: dict[int, Any] = {}
        position = -1  # index of the frame reader.next() returns; -1 = unknown
        for index in sorted(set(indices)):
            if not 0 <= index < self.frame_count:
                raise IndexError(f"frame {index} outside 0..{self.frame_count - 1}")
            keyframe = self._keyframes[max(0, bisect.bisect_right(self._keyframes, index) - 1)]
            if not keyframe <= position <= index:
                reader.seek(keyframe)
                position = keyframe
            if index > position:
                reader.skip_frames(index - position)
            frame = reader.next().asnumpy()
            if frame.ndim != 3 or frame.shape[2] != 3:
                # decord mis-sizes frames a few pixels wide (a 1x1 video comes back 1x1x96)
                raise ValueError(f"decord returned a frame of shape {frame.shape}")
            decoded[index] = keep(frame)
            position = index + 1
        return [decoded[i] for i in indices]

    # ffmpeg ------------------------------------------------------------

    def _open_ffmpeg(self) -> None:
        try:
            info = probe(self.path)
        except MediaError as e:
            self.failures.append(f"ffmpeg: {e}")
            raise MediaError(f"unreadable: {'; '.join(self.failures)}") from e
        if not info.has_video:
            raise MediaError("no_video_stream: the file has no video stream")
        self.decoder = "ffmpeg"
        self.fps = info.fps or 25.0
        self.frame_count = int(info.duration_s * self.fps)

    def _read_ffmpeg(self, indices: list[int], keep: Callable[[Any], Any], timeout_s: float = 600) -> list[Any]:
        """One ffmpeg pass that keeps the wanted frame numbers: a full decode, but exact frames and
        no timestamp-seeking quirks (MPEG-TS, GIF); only files decord cannot read come here."""
        import cv2
        import numpy as np

        wanted = sorted(set(indices))
        select = "+".join(f"eq(n\\,{i})" for i in wanted)
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(self.path), "-vf", f"select={select}",
               "-fps_mode", "passthrough", "-f", "image2pipe", "-c:v", "bmp", "-"]
        out = run_tool(cmd, timeout_s, f"decode_timeout: ffmpeg took more than {timeout_s}s")
        decoded: dict[int, Any] = {}
        for index, bmp in zip(wanted, _split_bmps(out.stdout), strict=False):
            image = cv2.imdecode(np.frombuffer(bmp, np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                break
            decoded[index] = keep(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        if len(decoded) < len(wanted):
            err = out.stderr.decode("utf-8", "replace").strip().splitlines()
            detail = f"ffmpeg decoded {len(decoded)} of {len(wanted)} frames" + (f" ({err[-1]})" if err else "")
            raise MediaError(f"unreadable: {'; '.join([*self.failures, detail])}")
        return [decoded[i] for i in indices]


def _split_bmps(stream: bytes) -> list[bytes]:
    """Split concatenated BMP files; each header holds its own size at bytes 2..6."""
    parts, offset = [], 0
    while offset + 6 <= len(stream) and stream[offset:offset + 2] == b"BM":
        size = int.from_bytes(stream[offset + 2:offset + 6], "little")
        if size <= 0:
            break
        parts.append(stream[offset:offset + size])
        offset += size
    return parts


def _decord_errors() -> tuple[type[BaseException], ...]:
    from decord._ffi.base import DECORDError

    return (DECORDError, RuntimeError, IndexError, ValueError, OSError)


def _short(error: BaseException, limit: int = 200) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    # decord prefixes messages with "[time] /path/to/source.cc:123: [file]"
    text = re.sub(r"^(\s*(\[[^\]]*\]|\S+\.cc:\d+:))+\s*", "", text)
    return text[:limit]


# ---------------------------------------------------------------- audio decode / encode (ffmpeg)

from collections.abc import Iterator  # noqa: E402  (appended section; the file head is shared)

AUDIO_CHUNK_FRAMES = 1 << 16


def stream_audio(
    path: str | Path, sample_rate: int, channels: int, chunk_frames: int = AUDIO_CHUNK_FRAMES
) -> Iterator[Any]:
    """Decode the first audio stream to float32 `(frames, channels)` numpy chunks at `sample_rate`.

    ffmpeg resamples (soxr) and up/down-mixes; memory is one chunk whatever the file's length.
    Raises MediaError (`no_audio_stream`, `corrupt`, `decode_error`) when ffmpeg fails.
    """
    import tempfile

    import numpy as np

    cmd = [
        "ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn",
        "-af", "aresample=resampler=soxr", "-ac", str(channels), "-ar", str(sample_rate),
        "-f", "f32le", "-c:a", "pcm_f32le", "pipe:1",
    ]
    chunk_bytes = chunk_frames * channels * 4
    # stderr goes to a file, not a pipe: a chatty ffmpeg must never block on a full stderr pipe
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors)
        try:
            assert proc.stdout is not None
            pending = b""
            while block := proc.stdout.read(chunk_bytes):
                data = pending + block
                usable = len(data) - len(data) % (channels * 4)
                pending = data[usable:]
                if usable:
                    yield np.frombuffer(data[:usable], dtype=np.float32).reshape(-1, channels)
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if returncode != 0:
            errors.seek(0)
            raise MediaError(_audio_decode_reason(errors.read().decode("utf-8", "replace")))


def _audio_decode_reason(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    if "matches no streams" in stderr or "does not contain any stream" in stderr:
        return "no_audio_stream: the file has no audio stream"
    if "Invalid data found" in stderr or "moov atom not found" in stderr or "End of file" in stderr:
        return f"corrupt: ffmpeg cannot read the file ({last[:200]})"
    return f"decode_error: ffmpeg failed to decode the audio ({last[:200]})"


def write_resampled_flac(
    source: str | Path, target: str | Path, sample_rate: int, channels: int, timeout_s: float = 3600
) -> None:
    """Resample (soxr) and downmix an audio file into 16-bit FLAC at `target`, written under a
    temporary name and renamed, so no partial file ever sits under the final name.
    Stereo→mono is the plain average of the two channels (ffmpeg's default `-ac 1` adds gain)."""
    target = Path(target)
    partial = target.with_name(target.name + ".part")
    mix = ["-af", "pan=mono|c0=0.5*c0+0.5*c1,aresample=resampler=soxr"] if channels == 1 else [
        "-af", "aresample=resampler=soxr", "-ac", str(channels)]
    cmd = [
        "ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(source), *mix, "-ar", str(sample_rate),
        "-c:a", "flac", "-sample_fmt", "s16", "-f", "flac", str(partial),
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        partial.unlink(missing_ok=True)
        raise MediaError(f"encode_timeout: resampling took more than {timeout_s}s") from e
    if out.returncode != 0:
        partial.unlink(missing_ok=True)
        err = out.stderr.decode("utf-8", "replace").strip().splitlines()
        raise MediaError(f"encode_error: ffmpeg could not write {target.name} ({err[-1] if err else 'no output'})")
    partial.replace(target)


# ---------------------------------------------------------------- fixed-length clip windows (tokens, features)


def read_audio_window(path: str | Path, start_s: float, samples: int, sample_rate: int) -> tuple[Any, int]:
    """`samples` mono float32 samples from `start_s` at `sample_rate`, zero-padded past the end of the
    file, and how many of them came from the file. soundfile reads the window exactly when the file
    already has that rate; anything else goes through ffmpeg (seek, resample, downmix).
    Raises MediaError (`unreadable: …`) when neither can read it."""
    import numpy as np

    try:
        mono = _read_window_soundfile(Path(path), start_s, samples, sample_rate)
    except (RuntimeError, OSError, ValueError) as e:
        mono = _read_window_ffmpeg(Path(path), start_s, samples, sample_rate, first_error=_short(e))
    out = np.zeros(samples, dtype=np.float32)
    read = min(samples, len(mono))
    out[:read] = mono[:read]
    return out, read


def _read_window_soundfile(path: Path, start_s: float, samples: int, sample_rate: int) -> Any:
    import soundfile as sf

    if sf.info(str(path)).samplerate != sample_rate:
        raise ValueError("sample rate differs")  # ffmpeg resamples
    data, _ = sf.read(str(path), start=round(start_s * sample_rate), frames=samples, dtype="float32",
                      always_2d=True)
    return data.mean(axis=1)


def _read_window_ffmpeg(path: Path, start_s: float, samples: int, sample_rate: int, first_error: str,
                        timeout_s: float = 120) -> Any:
    import numpy as np

    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-ss", f"{start_s:.6f}", "-i", str(path), "-map", "0:a:0",
           "-vn", "-ac", "1", "-ar", str(sample_rate), "-af", "aresample=resampler=soxr",
           "-t", f"{samples / sample_rate:.6f}", "-f", "f32le", "pipe:1"]
    out = run_tool(cmd, timeout_s, f"decode_timeout: ffmpeg took more than {timeout_s}s")
    if out.returncode != 0:
        err = out.stderr.decode("utf-8", "replace").strip().splitlines()
        raise MediaError(f"unreadable: soundfile: {first_error}; ffmpeg: {err[-1][:200] if err else 'no output'}")
    usable = len(out.stdout) - len(out.stdout) % 4
    return np.frombuffer(out.stdout[:usable], dtype=np.float32)[:samples]


def window_frame_indices(
    start_s: float, count: int, sample_fps: float, video_fps: float, frame_count: int
) -> tuple[list[int], int]:
    """`count` frame indices sampled at `sample_fps` from `start_s` (nearest frame), and how many of
    them lie inside the video; the ones past its last frame repeat the last frame, so a partial clip
    still gives exactly `count` frames."""
    if frame_count <= 0 or video_fps <= 0:
        return [], 0
    wanted = [round((start_s + i / sample_fps) * video_fps) for i in range(count)]
    inside = sum(1 for index in wanted if index < frame_count)
    return [min(max(index, 0), frame_count - 1) for index in wanted], inside


def save_npy_atomic(path: str | Path, array: Any) -> None:
    """np.save without pickle, under a temporary name renamed into place: a crash never leaves a
    partial array under the final name."""
    import numpy as np

    path = Path(path)
    partial = path.with_name(path.name + ".part")
    try:
        with open(partial, "wb") as f:
            np.save(f, array, allow_pickle=False)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
