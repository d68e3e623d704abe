"""Audio decode, resample and encode through ffmpeg (soundfile where it reads the file exactly)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.media.probe import MediaError, run_tool, short_error

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

def read_audio_window(path: str | Path, start_s: float, samples: int, sample_rate: int) -> tuple[Any, int]:
    """`samples` mono float32 samples from `start_s` at `sample_rate`, zero-padded past the end of the
    file, and how many of them came from the file. soundfile reads the window exactly when the file
    already has that rate; anything else goes through ffmpeg (seek, resample, downmix).
    Raises MediaError (`unreadable: …`) when neither can read it."""
    import numpy as np

    try:
        mono = _read_window_soundfile(Path(path), start_s, samples, sample_rate)
    except (RuntimeError, OSError, ValueError) as e:
        mono = _read_window_ffmpeg(Path(path), start_s, samples, sample_rate, first_error=short_error(e))
    out = np.zeros(samples, dtype=np.float32)
    read = min(samples, len(mono))
    out[:read] = mono[:read]
    return out, read


def _read_window_soundfile(path: Path, start_s: float, samples: int, sample_rate: int) -> Any:
    import soundfile as sf

    if sf.info(str(path)).samplerate != sample_rate:
        raise ValueError("sample rate differs")  # ffmpeg resamples
    return read_soundfile_window(path, round(start_s * sample_rate), samples)


def read_soundfile_window(path: str | Path, first: int, samples: int) -> Any:
    """Up to `samples` mono float32 samples from sample `first`, at the file's own rate (fewer, or
    none, past its end). Raises soundfile's errors (RuntimeError) for a file it cannot read."""
    import soundfile as sf

    data, _ = sf.read(str(path), start=first, frames=samples, dtype="float32", always_2d=True)
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


def read_audio_with_context(
    path: str | Path, start_s: float, clip_s: float, context_s: float
) -> tuple[Any, int, int, int]:
    """(mono float32 at the file's own rate from `context_s` before `start_s` (less at the file's
    start) to the clip end, zero-padded past the end of the file; sample rate; samples before
    `start_s`; samples of silence padded at the end). soundfile only: no resampling.
    Raises MediaError (`unreadable_audio: …`) when soundfile cannot read the file."""
    import numpy as np
    import soundfile as sf

    try:
        sample_rate = sf.info(str(path)).samplerate
        start = int(round(start_s * sample_rate))
        context = min(start, int(context_s * sample_rate))
        wanted = context + int(round(clip_s * sample_rate))
        mono = read_soundfile_window(path, start - context, wanted)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise MediaError(f"unreadable_audio: {e}") from e
    padded = wanted - len(mono)
    return np.pad(mono, (0, padded)), sample_rate, context, padded
