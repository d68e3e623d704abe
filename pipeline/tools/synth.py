"""Synthetic music videos made with ffmpeg (and espeak-ng for a voice), for the offline demo and
the tests: real files with known properties, made at run time, never downloaded."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

SIZE = "320x240"
FPS = 25
KINDS = ("moving", "still", "slideshow", "voice")
ENCODE = [
    "-c:v", "libx264", "-preset", "ultrafast", "-crf", "32", "-pix_fmt", "yuv420p",
    "-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart",
]


def ffmpeg(*args: str) -> None:
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({' '.join(cmd[:12])} …): {proc.stderr.decode()[-800:]}")


def music_expr(seed: int) -> str:
    """A chord with a pulse and clicks at 120 BPM: music-like, with clear onsets."""
    rng = random.Random(seed)
    root = rng.choice([196.0, 220.0, 246.9, 261.6, 293.7])
    chord = "+".join(f"0.12*sin(2*PI*{root * r:.2f}*t)" for r in (1.0, 1.26, 1.5))
    click = "0.5*exp(-40*mod(t\\,0.5))*sin(2*PI*1200*t)"
    return f"({chord})*(0.6+0.4*sin(2*PI*2*t))+{click}"


def make_video(path: Path, kind: str, duration_s: float = 20.0, seed: int = 0, size: str = SIZE) -> Path:
    """One synthetic music video of `kind` (moving | still | slideshow | voice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = ["-f", "lavfi", "-i", f"aevalsrc={music_expr(seed)}:s=44100:c=stereo:d={duration_s}"]
    if kind in ("moving", "voice"):
        video = _moving_inputs(duration_s, seed, size)
        vfilter = [
            "-filter_complex",
            f"[0:v][1:v][2:v]concat=n=3:v=1:a=0,hue=h=t*{20 + seed % 40}[v]", "-map", "[v]", "-map", "3:a",
        ]
        if kind == "voice":
            voice = _voice(path.with_suffix(".voice.wav"), seed)
            audio += ["-i", str(voice)]
            vfilter = [
                "-filter_complex",
                "[0:v][1:v][2:v]concat=n=3:v=1:a=0,hue=h=t*30[v];"
                "[4:a]aresample=44100,adelay=1000|1000,volume=2.5[vo];[3:a][vo]amix=inputs=2:duration=first[a]",
                "-map", "[v]", "-map", "[a]",
            ]
        ffmpeg(*video, *audio, *vfilter, "-t", str(duration_s), *ENCODE, str(path))
    elif kind in ("still", "slideshow"):
        still = path.with_suffix(".png")
        ffmpeg("-f", "lavfi", "-i", f"mandelbrot=s={size}:start_scale={2 + seed % 5}",
               "-frames:v", "1", str(still))
        # slideshow: two near-identical images alternating every 3 s (a brightness nudge)
        vf = "eq=brightness='if(gt(mod(t,6),3),0.05,0)':eval=frame" if kind == "slideshow" else "null"
        ffmpeg("-loop", "1", "-framerate", str(FPS), "-t", str(duration_s), "-i", str(still), *audio,
               "-vf", vf, "-map", "0:v", "-map", "1:a", "-t", str(duration_s), *ENCODE, str(path))
        still.unlink()
    else:
        raise ValueError(f"unknown synthetic video kind {kind!r}; one of {KINDS}")
    return path


def _moving_inputs(duration_s: float, seed: int, size: str) -> list[str]:
    third = duration_s / 3
    sources = [
        f"testsrc2=s={size}:r={FPS}",
        f"mandelbrot=s={size}:r={FPS}:start_scale={1 + seed % 3}",
        f"life=s={size}:r={FPS}:mold=10:ratio=0.5:seed={seed}:death_color=#3050a0:life_color=#f0c040",
    ]
    return [arg for src in sources for arg in ("-f", "lavfi", "-t", f"{third:.3f}", "-i", src)]


def _voice(path: Path, seed: int) -> Path:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is missing: run `make setup` (apt: espeak-ng)")
    words = ["la la la", "we sing tonight", "under the neon lights", "hold on to the music"]
    text = ". ".join(random.Random(seed).sample(words, 3)) * 3
    subprocess.run(["espeak-ng", "-s", "130", "-w", str(path), text], check=True, capture_output=True)
    return path


def make_audio_only(path: Path, duration_s: float = 8.0) -> Path:
    ffmpeg("-f", "lavfi", "-i", f"aevalsrc={music_expr(1)}:s=44100:d={duration_s}", "-vn",
           "-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart", str(path))
    return path


def make_video_only(path: Path, duration_s: float = 8.0) -> Path:
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=s={SIZE}:r={FPS}", "-t", str(duration_s), "-an",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(path))
    return path


def make_truncated(source: Path, path: Path, keep: float = 0.6) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# ---------------------------------------------------------------- beats: events on one timeline


def make_click_track(path: Path, event_times: list[float], duration_s: float, sample_rate: int = 32000) -> Path:
    """Mono FLAC of short 1.5 kHz clicks at `event_times` (seconds), silence elsewhere."""
    import numpy as np
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.zeros(int(round(duration_s * sample_rate)), dtype=np.float32)
    click_t = np.arange(int(0.05 * sample_rate)) / sample_rate
    click = (0.8 * np.exp(-80 * click_t) * np.sin(2 * np.pi * 1500 * click_t)).astype(np.float32)
    for time_s in event_times:
        start = int(round(time_s * sample_rate))
        end = min(len(audio), start + len(click))
        if 0 <= start < end:
            audio[start:end] += click[: end - start]
    sf.write(path, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return path


def make_jump_video(
    path: Path, event_times: list[float], duration_s: float, size: str = "160x120", shift_px: int = 12,
    seed: int = 0,
) -> Path:
    """A textured picture that is perfectly still except at `event_times`, where it jumps sideways
    by `shift_px` (alternating left/right), with a click on the soundtrack at the same instants:
    video and music beats whose times are known exactly. Frame n (pts n/FPS) shows the position
    after every event at or before n/FPS."""
    import numpy as np

    width, height = (int(v) for v in size.split("x"))
    rng = np.random.default_rng(seed)
    # 8x8-pixel random blocks: enough texture for optical flow, nothing moves by itself
    blocks = rng.integers(30, 226, size=(height // 8 + 1, (width + shift_px) // 8 + 1), dtype=np.uint8)
    texture = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))[:height, : width + shift_px]
    frame_count = int(round(duration_s * FPS))
    events = np.sort(np.asarray(event_times, dtype=np.float64))
    jumps = np.searchsorted(events, np.arange(frame_count) / FPS + 1e-9, side="right")
    frames = np.stack([texture[:, (n % 2) * shift_px:(n % 2) * shift_px + width] for n in jumps])
    clicks = make_click_track(path.with_suffix(".clicks.flac"), list(events), duration_s, sample_rate=44100)
    cmd = [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "gray", "-s", f"{width}x{height}", "-r", str(FPS), "-i", "pipe:0",
        "-i", str(clicks), "-map", "0:v", "-map", "1:a", "-t", str(duration_s), *ENCODE, str(path),
    ]
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True, check=False)
    clicks.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed making {path.name}: {proc.stderr.decode()[-800:]}")
    return path


# ---------------------------------------------------------------- odd media for the bad-inputs suite

SOUNDTRACKS = ("music", "silent", "none")


def make_test_video(
    path: Path, duration_s: float = 4.0, size: str = "160x120", fps: float = FPS, soundtrack: str = "music",
    sample_rate: int = 44100, channels: int = 2,
) -> Path:
    """A moving picture (Game of Life) of any size (1x1 included) with a chosen soundtrack: music,
    digital silence or none, at any sample rate and channel count."""
    if soundtrack not in SOUNDTRACKS:
        raise ValueError(f"unknown soundtrack {soundtrack!r}; one of {SOUNDTRACKS}")
    width, height = (int(v) for v in size.split("x"))
    # drawn small and scaled (testsrc2 cannot draw 1x1, and drawing 4K is slow); odd sizes need
    # 4:4:4 chroma (4:2:0 halves each side)
    video = ["-f", "lavfi", "-t", str(duration_s), "-i", _life(fps)]
    pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    encode = ["-vf", f"scale={width}:{height}", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", pix_fmt]
    layout = {1: "mono", 2: "stereo"}[channels]
    sources = {
        "music": f"aevalsrc={music_expr(1)}:s={sample_rate}:c={layout}:d={duration_s}",
        "silent": f"anullsrc=r={sample_rate}:cl={layout}",
    }
    audio = ["-f", "lavfi", "-i", sources[soundtrack]] if soundtrack in sources else []
    audio_out = ["-c:a", "aac", "-b:a", "32k", "-ac", str(channels), "-ar", str(sample_rate)] if audio else ["-an"]
    ffmpeg(*video, *audio, *encode, *audio_out, "-t", str(duration_s), "-movflags", "+faststart", str(path))
    return path


def make_long_static(path: Path, hours: float = 10.0, size: str = "64x64") -> Path:
    """Hours of one grey picture at 1 fps with a silent soundtrack, made in about a second: one
    minute is encoded, then the concat demuxer repeats it by stream copy (a few MB for 10 h)."""
    minute = path.with_suffix(".minute.mp4")
    ffmpeg("-f", "lavfi", "-i", f"color=c=gray:s={size}:r=1:d=60", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono",
           "-t", "60", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "600",
           "-c:a", "aac", "-b:a", "8k", str(minute))
    playlist = path.with_suffix(".txt")
    playlist.write_text(f"file '{minute.name}'\n" * round(hours * 60))
    ffmpeg("-f", "concat", "-safe", "0", "-i", str(playlist), "-c", "copy", "-movflags", "+faststart", str(path))
    minute.unlink()
    playlist.unlink()
    return path


def make_vfr(path: Path, duration_s: float = 12.0, size: str = "160x120") -> Path:
    """Variable frame rate: 25 fps for the first 2 s, then every 5th frame (5 fps), timestamps kept."""
    ffmpeg("-f", "lavfi", "-t", str(duration_s), "-i", _life(FPS, size),
           "-f", "lavfi", "-i", f"aevalsrc={music_expr(2)}:s=44100:c=stereo:d={duration_s}",
           "-vf", f"select='lt(n\\,{2 * FPS})+not(mod(n\\,5))'", "-fps_mode", "vfr",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k",
           "-movflags", "+faststart", str(path))
    return path


def make_rotated(source: Path, path: Path, degrees: int = 90) -> Path:
    """`source` with a display rotation (the way phones store portrait video), streams copied."""
    ffmpeg("-i", str(source), "-map", "0", "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", str(path))
    return path


def make_corrupt_stream(source: Path, path: Path, stream: str = "a", every_nth_byte: int = 20) -> Path:
    """`source` with one stream's packets damaged (ffmpeg's noise bitstream filter): the container
    and the other stream are intact, so it probes fine but that stream does not decode."""
    ffmpeg("-i", str(source), "-map", "0", "-c", "copy", f"-bsf:{stream}", f"noise=amount={every_nth_byte}",
           str(path))
    return path


def _life(fps: float, size: str = "160x120") -> str:
    return f"life=s={size}:r={fps}:mold=10:ratio=0.5:seed=7:death_color=#3050a0:life_color=#f0c040"


def make_copies_corpus(root: Path, n: int, broken_every: int,
                       sources: tuple[str, ...] = ("moving", "slideshow", "voice", "still")) -> list[str]:
    """n candidates for load and crash runs: file names under `root`, hard links to one 12 s video
    per source kind (made once, kept), and every `broken_every`-th a 404 or an HTML page in turn."""
    root.mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(sources):
        if not (root / f"{kind}.mp4").exists():
            make_video(root / f"{kind}.mp4", kind, duration_s=12, seed=i, size="160x120")
    (root / "page.html").write_text("<html>not a video</html>")
    names = []
    for i in range(n):
        if i % broken_every == broken_every - 1:
            names.append("status/404/gone.mp4" if (i // broken_every) % 2 == 0 else "page.html")
            continue
        name = f"c{i:05d}.mp4"
        if not (root / name).exists():
            (root / name).hardlink_to(root / f"{sources[i % len(sources)]}.mp4")
        names.append(name)
    return names
