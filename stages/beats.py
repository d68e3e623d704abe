"""beats: music onsets, optical-flow "video beats" and the VMAs beat weights of each clip.

Everything lives on one grid: the clip's EnCodec steps, `step_hz` (50) per second, step t at
`start_s + t / step_hz` (500 steps for a 10 s clip). The trainer only reads the arrays.

* **Music beats** — librosa onset detection on the 32 kHz mono instrumental, hop = one step. The
  envelope is computed from `AUDIO_CONTEXT_S` before the clip start, so the zero padding of the
  first STFT frame does not invent an onset at step 0 of every clip. `music_beats[t] = 1` at each
  onset; the onset-strength envelope (float16) and a tempo estimate are kept too.
* **Video beats** — frames at `video_fps` (9.6 → 96 per clip: frame j is the picture shown at
  `start_s + j / video_fps`), mean optical-flow magnitude of each consecutive pair (OpenCV
  Farneback on CPU, or torchvision RAFT), placed at the midpoint of the pair's two frame times and
  linearly interpolated onto the steps. `video_beats[t] = 1` where the value is the *strict*
  maximum of the window [t - video_window, t + video_window] and at least `min_flow_px`. Both
  conditions are there for still pictures: all-zero (or constant) flow has no strict maximum, and
  encoder noise on a static picture stays below the floor, so a static video has no video beats.
  Frames are 9.6 fps, so a motion's time is known to ± half a frame period (± 2.6 steps).
* **Beat weights** (VMAs eq. 3-4) — `overlap[t] = 1` where a video beat has a music beat within
  ± `overlap_tolerance` steps; `beat_weights = 1 + beat_weight * overlap`. The trainer multiplies
  its per-token loss by them, so music tokens that land on visible motion count more: that is how
  VMAs teaches the model to put beats where the video moves. `alignment_score` = matched video
  beats / video beats (the MV-Align idea), null for a clip without video beats.
* Partial clips (past the end of the media): the audio is padded with silence and the last frame
  repeated (zero flow, so no beats there); `audio_padded_s` and `frames_padded` record it.

Frames are decoded by one ffmpeg process per clip, `-ss start -t clip -vf fps=9.6:round=up,scale`
piped as raw pixels: on a 640x360 H.264 clip that is 0.27 s per clip against 0.44-0.59 s for
decord seeking to the 96 frame indices plus resizing, and it selects frames by timestamp (right
for variable frame rates) and applies the rotation metadata, as decord does. `round=up` makes
frame j exactly the frame on screen at its time (checked against a frame-numbered video).

Artifact: `<media_root>/beats/<key>.npz` (np.savez, load with allow_pickle=False): float16
`onset_envelope` and `flow_magnitude` (steps), `flow_pairs` (float32, one per frame pair), the
three beat arrays, and with `extras=true` float16 `rms` (n), `chroma` (12 x n) at `extras_hz`
and float32 `shot_cut_s` (seconds from the clip start).
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.media.probe import MediaError, run_tool
from pipeline.models.weights import RANDOM_INIT, Weights, models_root, pick_device, resolve
from pipeline.options import ConfigError, ModelWorkerOptions, option
from pipeline.stage import MissingDependency, Resources, Result, Row, Stage
from pipeline.timeline import STEP_HZ

FLOW_METHODS = ("farneback", "raft_small", "raft_large")
AUDIO_CONTEXT_S = 0.25  # audio read before the clip start, so the first step sees real history
DECODE_TIMEOUT_S = 300.0


@dataclass
class BeatsConfig(ModelWorkerOptions):
    onset_delta: float = option(0.07, "librosa onset peak-picking threshold on the normalised envelope")
    video_fps: float = option(9.6, "frames sampled per second for optical flow (VMAs: 9.6 → 96 per clip)")
    frame_size: str = option("256x144", "WxH frames are scaled to before flow (multiples of 8 for RAFT)")
    flow_method: str = option("farneback", "farneback (OpenCV, CPU) | raft_small | raft_large (torchvision)",
                              choices=FLOW_METHODS)
    video_window: int = option(
        10, "w: a video beat is the strict flow maximum within ±w steps (10 = ±0.2 s, ≤ 2.5 beats/s)")
    min_flow_px: float = option(
        0.1, "a video beat needs at least this mean flow (pixels of frame_size): a still picture has none")
    overlap_tolerance: int = option(
        4, "k: a video beat is matched by a music beat within ±k steps (4 = ±80 ms: the 9.6 fps "
        "half-frame uncertainty of 2.6 steps plus onset jitter; larger k matches more by chance)")
    beat_weight: float = option(1.0, "lambda: beat_weights = 1 + lambda * overlap (matched tokens count double)")
    raft_iters: int = option(12, "RAFT refinement iterations (torchvision's default)", output=lambda c, run: c.flow_method != "farneback")
    flow_batch: int = option(16, "frame pairs per RAFT call", output=False)
    extras: bool = option(False, "also store per-step RMS loudness, 12-bin chroma and shot-cut times")
    extras_hz: int = option(STEP_HZ, "rate of the rms and chroma arrays (extras=true)", output=lambda c, run: c.extras)
    shot_cut_threshold: float = option(
        0.2, "mean absolute grey difference (0-1) between sampled frames that counts as a cut", output=lambda c, run: c.extras)
    seed: int = option(0, "seeds random-init RAFT weights",
                       output=lambda c, run: c.flow_method != "farneback" and run.weights == "random")
    concurrency: int = 1  # RAFT actors; Farneback runs as CPU tasks

    @property
    def step_hz(self) -> int:
        """The tokens' grid (pipeline/timeline.py): beat arrays must line up with EnCodec steps."""
        return STEP_HZ


class Beats(Stage):
    name = "beats"
    upstream = "clips"
    version = "1"
    Config = BeatsConfig
    requires = ("librosa", "soundfile", "cv2", "numpy")
    schema = pa.schema(
        [
            ("music_beats", pa.list_(pa.int8())),
            ("video_beats", pa.list_(pa.int8())),
            ("beat_weights", pa.list_(pa.float32())),
            ("tempo_bpm", pa.float32()),  # null when the clip has no onsets
            ("n_music_beats", pa.int32()),
            ("n_video_beats", pa.int32()),
            ("n_matched_beats", pa.int32()),
            ("alignment_score", pa.float32()),  # matched / video beats; null without video beats
            ("flow_method", pa.string()),
            ("flow_model", pa.string()),
            ("frames_read", pa.int32()),
            ("frames_padded", pa.int32()),
            ("audio_padded_s", pa.float32()),
            ("n_shot_cuts", pa.int32()),  # extras only
            ("beats_path", pa.string()),
        ]
    )

    def __init__(self, config: BeatsConfig, run: Any) -> None:
        super().__init__(config, run)
        self.frame_width, self.frame_height = parse_frame_size(config.frame_size)
        check_config(config, self.frame_width, self.frame_height)
        if config.flow_method != "farneback":
            missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
            if missing:
                raise MissingDependency(
                    f"beats.flow_method={config.flow_method} needs {', '.join(missing)}: "
                    "run `make setup` (or `pip install -e .`)"
                )

    @property
    def uses_raft(self) -> bool:
        return self.config.flow_method != "farneback"

    @property
    def resources(self) -> Resources:
        c = self.config
        if self.uses_raft:
            return Resources.of(c)
        return Resources(num_cpus=c.num_cpus, batch_size=c.batch_size)

    def preflight(self) -> None:
        if self.uses_raft:
            c = self.config
            name, filename = raft_weights_name(c.flow_method)
            resolve(name, self.run.weights, models_root(self.run.models_root), filename,
                    cache_lookup=lambda: raft_cache_file(c.flow_method),
                    download=lambda folder: download_raft(c.flow_method, folder))

    def setup(self) -> None:
        self.out_dir = Path(self.run.media_root) / "beats"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.flow: FarnebackFlow | RaftFlow = FarnebackFlow()
        if self.uses_raft:
            raft = RaftFlow.load(self.config, self.run)
            self.flow, self.weights_stamp = raft, raft.weights.stamp
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="beats-decode")

    def fetch_weights(self, root: Path) -> list[tuple[str, Path]]:
        if not self.uses_raft:
            return []
        name, _ = raft_weights_name(self.config.flow_method)
        return [(name, download_raft(self.config.flow_method, root / name))]

    def process(self, rows: list[Row]) -> list[Result]:
        """Clip i+1 decodes on a thread while clip i's flow runs (keeps a GPU fed)."""
        results = []
        pending: Future[ClipMedia] | None = self.decoder.submit(self._read, rows[0]) if rows else None
        for i, row in enumerate(rows):
            current = pending
            pending = self.decoder.submit(self._read, rows[i + 1]) if i + 1 < len(rows) else None
            results.append(self._finish(row, current))
        return results

    def _read(self, row: Row) -> ClipMedia:
        return read_clip(row, self.config, self.frame_width, self.frame_height, rgb=self.uses_raft)

    def _finish(self, row: Row, media: Future[ClipMedia] | None) -> Result:
        key = row["key"]
        try:
            assert media is not None
            return self._beats(key, media.result())
        except MediaError as e:
            return Result.failed(key, str(e))
        except OSError as e:
            return Result.failed(key, f"io_error: {e}")

    def _beats(self, key: str, clip: ClipMedia) -> Result:
        import numpy as np

        c = self.config
        music = music_beats(clip, c)
        pairs = self.flow.magnitudes(clip.frames)
        flow = flow_on_steps(pairs, c.video_fps, c.step_hz, clip.n_steps)
        video = window_peaks(flow, c.video_window, c.min_flow_px)
        overlap = beat_overlap(video, music.beats, c.overlap_tolerance)
        weights = beat_weights(overlap, c.beat_weight)
        arrays = {
            "onset_envelope": music.envelope.astype(np.float16),
            "flow_magnitude": flow.astype(np.float16),
            "flow_pairs": pairs.astype(np.float32),
            "music_beats": music.beats, "video_beats": video, "beat_weights": weights,
        }
        cuts = None
        if c.extras:
            arrays.update(audio_features(clip, c.extras_hz))
            cuts = shot_cuts(grey(clip.frames), c.video_fps, c.shot_cut_threshold)
            arrays["shot_cut_s"] = cuts
        path = self.out_dir / f"{key}.npz"
        save_npz(path, arrays)
        return Result.ok(
            key,
            music_beats=music.beats.tolist(), video_beats=video.tolist(), beat_weights=weights.tolist(),
            tempo_bpm=music.tempo_bpm, n_music_beats=int(music.beats.sum()), n_video_beats=int(video.sum()),
            n_matched_beats=int(overlap.sum()), alignment_score=alignment_score(video, overlap),
            flow_method=c.flow_method, flow_model=self.flow.model_name, frames_read=clip.frames_read,
            frames_padded=clip.frames_padded, audio_padded_s=clip.audio_padded_s,
            n_shot_cuts=None if cuts is None else len(cuts), beats_path=str(path),
        )


# ---------------------------------------------------------------- config


def parse_frame_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"config key 'beats.frame_size' must be WxH, e.g. 256x144, got {text!r}") from None
    return width, height


def check_config(c: BeatsConfig, width: int, height: int) -> None:
    if c.flow_method != "farneback" and (width % 8 or height % 8 or min(width, height) < 128):
        raise ConfigError("config key 'beats.frame_size': RAFT needs multiples of 8, at least 128 each way")
    if width < 16 or height < 16:
        raise ConfigError("config key 'beats.frame_size' must be at least 16x16")
    for name in ("video_window", "extras_hz", "raft_iters", "flow_batch"):
        if getattr(c, name) < 1:
            raise ConfigError(f"config key 'beats.{name}' must be >= 1")
    if c.video_fps <= 0 or c.overlap_tolerance < 0:
        raise ConfigError("config keys 'beats.video_fps' must be > 0 and 'beats.overlap_tolerance' >= 0")


# ---------------------------------------------------------------- media of one clip


@dataclass
class ClipMedia:
    audio: Any  # float32 mono, AUDIO_CONTEXT_S (or less, at the media start) before the clip start
    sample_rate: int
    context_samples: int  # audio samples before the clip start
    frames: Any  # (video_frames, H, W) grey or (video_frames, H, W, 3) RGB, uint8
    n_steps: int
    frames_read: int
    frames_padded: int
    audio_padded_s: float

    @property
    def clip_audio(self) -> Any:
        return self.audio[self.context_samples:]


def read_clip(row: Row, c: BeatsConfig, width: int, height: int, rgb: bool) -> ClipMedia:
    start_s, end_s = float(row["start_s"]), float(row["end_s"])
    clip_s = end_s - start_s
    audio, sample_rate, context, audio_padded = read_clip_audio(row.get("instrumental32k_path"), start_s, clip_s)
    n_frames = int(round(clip_s * c.video_fps))
    frames = read_clip_frames(row.get("video_path"), start_s, clip_s, c.video_fps, width, height, rgb)
    frames_read = min(len(frames), n_frames)
    return ClipMedia(
        audio=audio, sample_rate=sample_rate, context_samples=context,
        frames=pad_frames(frames[:n_frames], n_frames), n_steps=int(round(clip_s * c.step_hz)),
        frames_read=frames_read, frames_padded=n_frames - frames_read, audio_padded_s=audio_padded / sample_rate,
    )


def read_clip_audio(path: str | None, start_s: float, clip_s: float) -> tuple[Any, int, int, int]:
    """(mono float32 from AUDIO_CONTEXT_S before the start to the clip end, sample rate,
    samples before the start, samples of silence padded at the end)."""
    import numpy as np
    import soundfile as sf

    if not path or not Path(path).is_file():
        raise MediaError(f"missing_input: no instrumental audio at {path!r}")
    try:
        with sf.SoundFile(path) as f:
            sample_rate = f.samplerate
            start = int(round(start_s * sample_rate))
            context = min(start, int(AUDIO_CONTEXT_S * sample_rate))
            wanted = context + int(round(clip_s * sample_rate))
            first = start - context
            if first < f.frames:
                f.seek(first)
                data = f.read(wanted, dtype="float32", always_2d=True)
            else:
                data = np.zeros((0, f.channels), np.float32)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise MediaError(f"unreadable_audio: {e}") from e
    mono = data.mean(axis=1).astype(np.float32)
    padded = wanted - len(mono)
    if padded >= wanted - context:
        raise MediaError(f"no_audio: the instrumental ends before the clip starts ({start_s:.1f}s)")
    return np.pad(mono, (0, padded)), sample_rate, context, padded


def read_clip_frames(
    path: str | None, start_s: float, clip_s: float, fps: float, width: int, height: int, rgb: bool
) -> Any:
    """Frames at `fps` from `start_s`: frame j is the picture on screen at start_s + j / fps."""
    import numpy as np

    if not path or not Path(path).is_file():
        raise MediaError(f"missing_input: no video at {path!r}")
    pix_fmt, channels = ("rgb24", 3) if rgb else ("gray", 1)
    cmd = [
        "ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-ss", f"{start_s:.6f}", "-t", f"{clip_s:.6f}",
        "-i", str(path), "-map", "0:v:0", "-an", "-sn",
        "-vf", f"fps={fps}:round=up,scale={width}:{height}:flags=area,format={pix_fmt}",
        "-f", "rawvideo", "-pix_fmt", pix_fmt, "pipe:1",
    ]
    out = run_tool(cmd, DECODE_TIMEOUT_S, f"decode_timeout: ffmpeg took more than {DECODE_TIMEOUT_S:.0f}s")
    frame_bytes = width * height * channels
    count = len(out.stdout) // frame_bytes
    if out.returncode != 0 or count == 0:
        err = out.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = err[-1][:200] if err else f"exit {out.returncode}, no frames"
        raise MediaError(f"unreadable_video: ffmpeg decoded {count} frames ({detail})")
    frames = np.frombuffer(out.stdout[: count * frame_bytes], dtype=np.uint8)
    return frames.reshape((count, height, width, channels) if rgb else (count, height, width))


def pad_frames(frames: Any, n_frames: int) -> Any:
    """Repeat the last frame up to `n_frames`: a held picture has no motion, so no beats."""
    import numpy as np

    missing = n_frames - len(frames)
    if missing <= 0:
        return frames
    return np.concatenate([frames, np.repeat(frames[-1:], missing, axis=0)])


def grey(frames: Any) -> Any:
    import cv2
    import numpy as np

    if frames.ndim == 3:
        return frames
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])


# ---------------------------------------------------------------- music beats


@dataclass
class MusicBeats:
    beats: Any  # int8 (steps,)
    envelope: Any  # float32 (steps,)
    tempo_bpm: float | None


def music_beats(clip: ClipMedia, c: BeatsConfig) -> MusicBeats:
    """librosa onsets on the step grid. The hop is one step when sample_rate / step_hz is whole
    (32 kHz / 50 = 640); otherwise the nearest hop, and frames are mapped to steps by time."""
    import librosa
    import numpy as np

    sr = clip.sample_rate
    hop = max(1, int(round(sr / c.step_hz)))
    envelope = librosa.onset.onset_strength(y=clip.audio, sr=sr, hop_length=hop)
    frame_s = (np.arange(len(envelope)) * hop - clip.context_samples) / sr  # seconds from clip start
    onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=sr, hop_length=hop, delta=c.onset_delta)
    steps = np.round(frame_s[onsets] * c.step_hz).astype(int)
    beats = np.zeros(clip.n_steps, dtype=np.int8)
    beats[steps[(steps >= 0) & (steps < clip.n_steps)]] = 1
    on_steps = np.interp(np.arange(clip.n_steps) / c.step_hz, frame_s, envelope).astype(np.float32)
    tempo = None
    if beats.any():
        clip_envelope = envelope[frame_s >= 0]
        tempo = float(librosa.feature.tempo(onset_envelope=clip_envelope, sr=sr, hop_length=hop)[0])
    return MusicBeats(beats, on_steps, tempo)


# ---------------------------------------------------------------- optical flow


class FarnebackFlow:
    model_name = "opencv-farneback"

    def magnitudes(self, frames: Any) -> Any:
        """Spatial mean flow magnitude (pixels) of each consecutive frame pair."""
        import cv2
        import numpy as np

        frames = grey(frames)
        out = np.zeros(len(frames) - 1, dtype=np.float32)
        for i in range(len(frames) - 1):
            # OpenCV's documented example parameters: 3-level pyramid, 15 px window
            flow = cv2.calcOpticalFlowFarneback(frames[i], frames[i + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
            out[i] = np.sqrt((flow**2).sum(axis=2)).mean()
        return out


class RaftFlow:
    """torchvision RAFT, frame pairs batched; weights via pipeline.models (never pickle)."""

    def __init__(self, model: Any, weights: Weights, arch: str, device: Any, iters: int, batch: int) -> None:
        self.model, self.weights, self.device, self.iters, self.batch = model, weights, device, iters, batch
        tag = RANDOM_INIT if weights.is_random else f"sha256:{(weights.sha256 or '')[:12]}"
        self.model_name = f"{arch}@{tag}"

    @classmethod
    def load(cls, c: BeatsConfig, run: Any) -> RaftFlow:
        import torch
        from torchvision.models import optical_flow

        name, filename = raft_weights_name(c.flow_method)
        root = models_root(run.models_root)
        weights = resolve(name, run.weights, root, filename, cache_lookup=lambda: raft_cache_file(c.flow_method),
                          download=lambda folder: download_raft(c.flow_method, folder))
        if weights.is_random:
            torch.manual_seed(c.seed)
        model = getattr(optical_flow, c.flow_method)(weights=None)
        if weights.path is not None:
            model.load_state_dict(torch.load(weights.path, map_location="cpu", weights_only=True))
        device = pick_device(c.device, c.num_gpus)
        model = model.eval().to(device)
        return cls(model, weights, c.flow_method, torch.device(device), c.raft_iters, c.flow_batch)

    def magnitudes(self, frames: Any) -> Any:
        import numpy as np
        import torch

        images = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2)  # a writable copy
        out = []
        with torch.inference_mode():
            for lo in range(0, len(frames) - 1, self.batch):
                hi = min(lo + self.batch, len(frames) - 1)
                first = images[lo:hi].to(self.device).float() / 127.5 - 1.0  # RAFT expects [-1, 1]
                second = images[lo + 1:hi + 1].to(self.device).float() / 127.5 - 1.0
                flow = self.model(first, second, num_flow_updates=self.iters)[-1]
                out.append(flow.norm(dim=1).mean(dim=(1, 2)).float().cpu())
        return torch.cat(out).numpy().astype(np.float32)


def raft_weights_name(method: str) -> tuple[str, str]:
    return f"raft/{method}", f"{method}.pth"


def _raft_url(method: str) -> str:
    from torchvision.models import optical_flow

    enum = {"raft_small": optical_flow.Raft_Small_Weights, "raft_large": optical_flow.Raft_Large_Weights}[method]
    return enum.DEFAULT.url


def raft_cache_file(method: str) -> Path | None:
    """torchvision's own download cache, if that machine already has the file."""
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_raft_url(method))
    return path if path.is_file() else None


def download_raft(method: str, folder: Path) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / raft_weights_name(method)[1]
    torch.hub.download_url_to_file(_raft_url(method), str(target), progress=False)
    return target


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


def audio_features(clip: ClipMedia, rate_hz: int) -> dict[str, Any]:
    import librosa
    import numpy as np

    y, sr = clip.clip_audio, clip.sample_rate
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


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
    """np.savez under a temporary name, then rename: no partial file under the final name."""
    import numpy as np

    partial = path.with_name(path.name + ".part")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    partial.replace(path)


def load_beats(path: str | Path) -> dict[str, Any]:
    """The arrays of one clip's artifact (no pickle)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
