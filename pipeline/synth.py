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
