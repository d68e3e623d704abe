"""beats: music onsets, optical-flow "video beats" and the VMAs beat weights of each clip.

Everything lives on one grid: the clip's EnCodec steps, `STEP_HZ` (50, pipeline/timeline.py) per second,
step t at `start_s + t / STEP_HZ` (500 steps for a 10 s clip). The trainer only reads the arrays.

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

Frames are decoded by one ffmpeg process per clip (`pipeline.media.frames.read_clip_frames` says
why); the audio is the instrumental at its own rate (`pipeline.media.audio.read_audio_with_context`).
The maths are in `pipeline.media.beatgrid`, the flow models in `pipeline.models.flow`.

Artifact: `<media_root>/beats/<key>.npz` (np.savez, load with allow_pickle=False): float16
`onset_envelope` and `flow_magnitude` (steps), `flow_pairs` (float32, one per frame pair), the
three beat arrays, and with `extras=true` float16 `rms` (n), `chroma` (12 x n) at `extras_hz`
and float32 `shot_cut_s` (seconds from the clip start).
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.media.audio import read_audio_with_context
from pipeline.media.beatgrid import (
    alignment_score,
    audio_features,
    beat_overlap,
    beat_weights,
    flow_on_steps,
    music_beats,
    shot_cuts,
    window_peaks,
)
from pipeline.media.files import write_npz
from pipeline.media.frames import grey, pad_frames, read_clip_frames
from pipeline.media.probe import MediaError
from pipeline.media.staging import MediaStore, media_store
from pipeline.models.flow import FarnebackFlow, RaftFlow, download_raft, raft_weights_name, resolve_raft
from pipeline.models.weights import models_root, pick_device
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


class Beats(Stage):
    name = "beats"
    upstream = "clips"
    version = "1"
    reads = frozenset({"video", "stems"})
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
            resolve_raft(self.config.flow_method, self.run.weights, models_root(self.run.models_root))

    def setup(self) -> None:
        self.media = media_store(self.run)  # pipeline/media/staging.py: local files to read and write
        self.out_dir = self.media.work_dir("beats")
        self.flow: FarnebackFlow | RaftFlow = FarnebackFlow()
        if self.uses_raft:
            c = self.config
            weights = resolve_raft(c.flow_method, self.run.weights, models_root(self.run.models_root))
            raft = RaftFlow.load(c.flow_method, weights, pick_device(c.device, c.num_gpus), c.raft_iters,
                                 c.flow_batch, c.seed)
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
        return read_clip(row, self.config, self.frame_width, self.frame_height, rgb=self.uses_raft,
                         media=self.media)

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
        music = music_beats(clip.audio, clip.sample_rate, clip.context_samples, clip.n_steps, STEP_HZ,
                            c.onset_delta)
        pairs = self.flow.magnitudes(clip.frames)
        flow = flow_on_steps(pairs, c.video_fps, STEP_HZ, clip.n_steps)
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
            arrays.update(audio_features(clip.clip_audio, clip.sample_rate, c.extras_hz))
            cuts = shot_cuts(grey(clip.frames), c.video_fps, c.shot_cut_threshold)
            arrays["shot_cut_s"] = cuts
        with self.media.writing("beats", f"{key}.npz") as partial:
            write_npz(partial, arrays)
        return Result.ok(
            key,
            music_beats=music.beats.tolist(), video_beats=video.tolist(), beat_weights=weights.tolist(),
            tempo_bpm=music.tempo_bpm, n_music_beats=int(music.beats.sum()), n_video_beats=int(video.sum()),
            n_matched_beats=int(overlap.sum()), alignment_score=alignment_score(video, overlap),
            flow_method=c.flow_method, flow_model=self.flow.model_name, frames_read=clip.frames_read,
            frames_padded=clip.frames_padded, audio_padded_s=clip.audio_padded_s,
            n_shot_cuts=None if cuts is None else len(cuts), beats_path=self.media.uri("beats", f"{key}.npz"),
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


def read_clip(row: Row, c: BeatsConfig, width: int, height: int, rgb: bool, media: MediaStore) -> ClipMedia:
    start_s, end_s = float(row["start_s"]), float(row["end_s"])
    clip_s = end_s - start_s
    audio_path = input_file(media, row.get("instrumental32k_path"), "instrumental audio")
    with media.local(audio_path) as audio_file:
        audio, sample_rate, context, audio_padded = read_audio_with_context(
            str(audio_file), start_s, clip_s, AUDIO_CONTEXT_S)
    if audio_padded >= len(audio) - context:
        raise MediaError(f"no_audio: the instrumental ends before the clip starts ({start_s:.1f}s)")
    n_frames = int(round(clip_s * c.video_fps))
    video_path = input_file(media, row.get("video_path"), "video")
    with media.local(video_path) as video_file:
        frames = read_clip_frames(str(video_file), start_s, clip_s, c.video_fps, width, height, rgb,
                                  DECODE_TIMEOUT_S)
    frames_read = min(len(frames), n_frames)
    return ClipMedia(
        audio=audio, sample_rate=sample_rate, context_samples=context,
        frames=pad_frames(frames[:n_frames], n_frames), n_steps=int(round(clip_s * STEP_HZ)),
        frames_read=frames_read, frames_padded=n_frames - frames_read, audio_padded_s=audio_padded / sample_rate,
    )


def input_file(media: MediaStore, path: str | None, what: str) -> str:
    if not path or not media.is_file(path):
        raise MediaError(f"missing_input: no {what} at {path!r}")
    return path
