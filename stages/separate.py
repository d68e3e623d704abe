"""separate: Demucs removes the vocals; we keep the instrumental and measure how much voice is left.

Per track: ffmpeg decodes the audio once into a scratch file of raw float32 (pipeline/media/tracks.py),
then the separation engine streams over it (pipeline/models/separation.py: Demucs' split + shifts +
bags, bounded memory, segments batched across tracks). A one-thread pool decodes track i+1 while
track i separates.

Vocal energy ratios (energy of the model's vocals stem / energy of its input):
* `vocal_ratio_before`: vocals / mix over the whole track, from the separation pass itself (free).
* `vocal_ratio_after`: the instrumental is separated again, but only on the `residual_segments`
  model-length blocks where the first pass found the most vocal energy: vocals-of-instrumental /
  instrumental there. A full second pass would double the cost; the loudest-vocal blocks are
  where residue is, so this is a conservative (high) estimate at a fixed, small price.
* With `skip_instrumental`, a cheap probe (`probe_segments` evenly spread segments) runs first;
  a track whose vocal ratio is below `instrumental_threshold` is `instrumental_source=true`, is not
  separated, and keeps its original audio as the instrumental.

Outputs: `<media_root>/instrumental/<key>.flac` (44.1 kHz stereo, 24-bit, samples clipped to
[-1, 1]) and `<media_root>/instrumental32k/<key>.flac` (32 kHz mono, 16-bit, for EnCodec), each
written under `.part` and renamed (or uploaded whole to a bucket, pipeline/media/staging.py). Weights come from `<models_root>/demucs/<model>/`, Demucs'
`--repo` layout, loaded without pickle (pipeline/models/demucs.py). `run.weights=random` builds
the same architecture randomly initialised.
"""

from __future__ import annotations

import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.media.audio import write_resampled_flac
from pipeline.media.probe import MediaError
from pipeline.media.staging import media_store
from pipeline.media.tracks import Track, decode_to_scratch
from pipeline.models.demucs import TINY_KWARGS, load_bag, resolve_bag
from pipeline.models.separation import SeparationEngine
from pipeline.models.weights import RANDOM_INIT, models_root, pick_device
from pipeline.options import ConfigError, ModelWorkerOptions, option
from pipeline.stage import Resources, Result, Row, Stage


@dataclass
class SeparateConfig(ModelWorkerOptions):
    model: str = option("htdemucs", "Demucs model (bag) name, weights in <models_root>/demucs/<model>/")
    shifts: int = option(1, "random shifts averaged (Demucs' shift trick; 0 = off, deterministic)")
    overlap: float = option(0.25, "overlap between consecutive segments")
    segment: float | None = option(None, "segment length in seconds (None = the model's, 7.8 s)")
    batch_segments: int = option(
        0, "segments per model call (across tracks); 0 = auto: 1 on CPU (htdemucs is slower per segment "
        "in larger batches there), 4 on GPU", output=False)
    instrumental_threshold: float = option(
        0.01, "vocal/mix energy ratio below which a track is instrumental_source")
    vocals_removed_threshold: float = option(
        0.01, "residual vocal/instrumental energy ratio below which vocals_removed=true")
    skip_instrumental: bool = option(
        True, "probe first; instrumental sources are not separated and keep their original audio")
    probe_segments: int = option(3, "segments separated by the instrumental probe")
    residual_segments: int = option(3, "segments of the instrumental separated again to measure residue")
    encodec_sample_rate: int = option(32000, "sample rate of the mono copy for EnCodec")
    max_duration_s: float | None = option(
        7200.0, "fail tracks longer than this (seconds; checked on the probed duration before decoding)")
    random_init: str = option(
        "htdemucs", "run.weights=random only: 'htdemucs' = the real architecture; 'tiny' / 'tiny8k' "
        "(8 kHz) = small HTDemucs for fast tests", choices=("htdemucs", *TINY_KWARGS),
        output=lambda c, run: run.weights == "random")
    seed: int = option(0, "seeds the shift offsets (mixed with the key) and random-init weights")
    batch_size: int = 4  # tracks per process() call


class Separate(Stage):
    name = "separate"
    upstream = "filter"
    version = "1"
    reads = frozenset({"video"})
    Config = SeparateConfig
    requires = ("demucs", "torch", "soundfile", "numpy")
    media = {"instrumental_path": "stems", "instrumental32k_path": "stems"}
    schema = pa.schema(
        [
            ("instrumental_path", pa.string()),
            ("instrumental32k_path", pa.string()),
            ("audio_duration_s", pa.float64()),
            ("separation_sample_rate", pa.int32()),
            ("vocal_ratio_before", pa.float64()),
            ("vocal_ratio_after", pa.float64()),
            ("vocals_removed", pa.bool_()),
            ("instrumental_source", pa.bool_()),
            ("separation_model", pa.string()),
            ("weights_sha256", pa.string()),
            ("segments_separated", pa.int32()),
        ]
    )

    def __init__(self, config: SeparateConfig, run: Any) -> None:
        super().__init__(config, run)
        check_config(config)

    @property
    def resources(self) -> Resources:
        return Resources.of(self.config)

    def preflight(self) -> None:
        if self.run.weights != "random":
            resolve_bag(self.config.model, models_root(self.run.models_root))

    def setup(self) -> None:
        import torch

        c = self.config
        device = pick_device(c.device, c.num_gpus)
        self.bag, self.weights_stamp, self.weights_sha256 = load_bag(
            c.model, self.run.weights, models_root(self.run.models_root), c.random_init, c.seed)
        self.model_label = c.model if self.weights_stamp != RANDOM_INIT else c.random_init
        self.engine = SeparationEngine(
            self.bag, torch.device(device), segment=c.segment, overlap=c.overlap, shifts=c.shifts, seed=c.seed,
            batch_segments=c.batch_segments, skip_instrumental=c.skip_instrumental,
            probe_segments=c.probe_segments, instrumental_threshold=c.instrumental_threshold,
            residual_segments=c.residual_segments)
        self.media = media_store(self.run)  # local folders to write in (pipeline/media/staging.py)
        self.out_dir = self.media.work_dir("instrumental")
        self.out32k_dir = self.media.work_dir("instrumental32k")
        self.scratch = tempfile.TemporaryDirectory(prefix="discomv-separate-")
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="separate-decode")

    def process(self, rows: list[Row]) -> list[Result]:
        results: dict[str, Result] = {}
        try:
            tracks = self._decoded(rows, results)
            for track, failure in self.engine.separate(tracks, self._open_writer):
                results[track.key] = self._finish(track, failure)
        finally:
            for row in rows:  # scratch audio of tracks still in flight if something raised
                (Path(self.scratch.name) / f"{row['key']}.f32").unlink(missing_ok=True)
        return [results.get(row["key"]) or Result.failed(row["key"], "error: no result") for row in rows]

    # ---------------------------------------------------------------- per track

    def _decoded(self, rows: list[Row], results: dict[str, Result]) -> Iterator[Track]:
        """Tracks in order, each decoded while the one before it separates."""
        ahead: deque[tuple[Row, Future[Track]]] = deque()
        pending = iter(rows)

        def decode_next() -> None:
            following = next(pending, None)
            if following is not None:
                ahead.append((following, self.decoder.submit(self._decode, following)))

        decode_next()
        while ahead:
            row, future = ahead.popleft()
            decode_next()
            try:
                yield future.result()
            except MediaError as e:
                results[row["key"]] = Result.failed(row["key"], str(e))
            except OSError as e:
                results[row["key"]] = Result.failed(row["key"], f"io_error: {e}")

    def _decode(self, row: Row) -> Track:
        key, source = row["key"], row.get("video_path") or ""
        if not self.media.is_file(source):
            raise MediaError(f"missing_input: no media file at {source!r}")
        limit = self.config.max_duration_s
        probed = row.get("media_duration_s")
        if limit and probed and probed > limit:  # refused before decoding hours of audio to scratch
            raise MediaError(f"too_long: {probed:.0f}s > {limit:.0f}s (separate.max_duration_s)")
        raw = Path(self.scratch.name) / f"{key}.f32"
        with self.media.local(source) as file:
            track = decode_to_scratch(key, file, raw, self.bag.samplerate, self.bag.audio_channels)
        if limit and track.duration_s > limit:
            track.discard()
            raise MediaError(f"too_long: {track.duration_s:.0f}s > {limit:.0f}s (separate.max_duration_s)")
        if track.frames == 0:
            track.discard()
            raise MediaError("empty_audio: the audio stream decodes to no samples")
        return track

    def _open_writer(self, track: Track) -> Any:
        import soundfile as sf

        partial = self.out_dir / f"{track.key}.flac.part"
        return sf.SoundFile(partial, "w", samplerate=self.bag.samplerate, channels=self.bag.audio_channels,
                            format="FLAC", subtype="PCM_24")

    def _finish(self, track: Track, failure: str | None) -> Result:
        key = track.key
        partial, local32k = self.out_dir / f"{key}.flac.part", self.out32k_dir / f"{key}.flac"
        try:
            if failure:
                partial.unlink(missing_ok=True)
                return Result.failed(key, failure, audio_duration_s=track.duration_s)
            if track.silent:
                partial.unlink(missing_ok=True)
                return Result.dropped(key, "silent: the audio track is digital silence",
                                      audio_duration_s=track.duration_s)
            ratio_after = track.vocal_ratio_before if track.kept_original else (
                self.engine.residual_vocal_ratio(track, partial))
            # the 32 kHz copy first, from the scratch file; then each published whole (on a local
            # root: renamed into place)
            write_resampled_flac(partial, local32k, self.config.encodec_sample_rate, channels=1)
            final = self.media.publish(partial, "instrumental", f"{key}.flac", cache=True)
            final32k = self.media.publish(local32k, "instrumental32k", f"{key}.flac", cache=True)
        except (MediaError, OSError, RuntimeError) as e:
            partial.unlink(missing_ok=True)
            if self.media.remote:
                local32k.unlink(missing_ok=True)
            reason = str(e) if isinstance(e, MediaError) else f"{type(e).__name__}: {e}"
            return Result.failed(key, reason, audio_duration_s=track.duration_s)
        finally:
            track.discard()
        return Result.ok(
            key,
            instrumental_path=final,
            instrumental32k_path=final32k,
            audio_duration_s=track.duration_s,
            separation_sample_rate=self.bag.samplerate,
            vocal_ratio_before=track.vocal_ratio_before,
            vocal_ratio_after=ratio_after,
            vocals_removed=None if ratio_after is None else ratio_after < self.config.vocals_removed_threshold,
            instrumental_source=track.instrumental_source,
            separation_model=self.model_label,
            weights_sha256=self.weights_sha256,
            segments_separated=track.segments_separated,
        )


def check_config(c: SeparateConfig) -> None:
    problems = {
        "shifts": c.shifts < 0, "overlap": not 0 <= c.overlap < 1, "batch_segments": c.batch_segments < 0,
        "segment": c.segment is not None and c.segment <= 0, "probe_segments": c.probe_segments < 1,
        "residual_segments": c.residual_segments < 0, "encodec_sample_rate": c.encodec_sample_rate <= 0,
    }
    bad = [name for name, wrong in problems.items() if wrong]
    if bad:
        raise ConfigError(f"config key 'separate.{bad[0]}': invalid value {getattr(c, bad[0])!r}")
