"""separate: Demucs removes the vocals; we keep the instrumental and measure how much voice is left.

Per track: ffmpeg decodes the audio once (44.1 kHz stereo for htdemucs) into a scratch file of raw
float32 while it accumulates the statistics Demucs normalises by (mean/std of the mono mix, the
same whole-track normalisation as the `demucs` CLI). Separation then streams over that file:

* **Long tracks, bounded memory.** Instead of handing `apply_model` the whole track (its output
  alone is 4 stems × the track), we run Demucs' own split scheme ourselves: segments of the model's
  length (7.8 s) at stride `(1 - overlap)`, triangular cross-fade weights, zero padding at the edges,
  the shift trick as whole-track delays, bags of models by their per-source weights. Each segment
  goes through `demucs.apply.apply_model(split=False)`. Finished samples are written to FLAC as soon
  as no later segment overlaps them, so memory is O(segment × batch), never O(track), and the
  output equals the CLI's on tracks of any length (the benchmark checks this).
* **Batching across tracks.** Segments from consecutive tracks share model calls
  (`batch_segments` per call), which matters on a GPU; on CPU one segment per call is faster.
* **Decode overlaps separation.** A one-thread pool decodes track i+1 while track i separates.

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
written under `.part` and renamed. Weights come from `<models_root>/demucs/<model>/`, Demucs'
`--repo` layout (`<model>.yaml` listing signatures; `<sig>.safetensors` or `<sig>[-<hash>].th`),
loaded without pickle (safetensors, or `torch.load(weights_only=True)` allowing only Demucs model
classes). `run.weights=random` builds the same architecture randomly initialised.
"""

from __future__ import annotations

import hashlib
import logging
import random
import tempfile
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.media.audio import stream_audio, write_resampled_flac
from pipeline.media.probe import MediaError
from pipeline.models.weights import RANDOM_INIT, models_root, pick_device, resolve, sha256_file
from pipeline.options import ConfigError, ModelWorkerOptions, option
from pipeline.stage import Resources, Result, Row, Stage

log = logging.getLogger("discomv")

SOURCES = ["drums", "bass", "other", "vocals"]
VOCALS = "vocals"
SILENCE_RMS = 1e-5  # below about -100 dBFS the track is digital silence
# The published htdemucs (signature 955717e8) architecture; random init builds exactly this.
HTDEMUCS_KWARGS: dict[str, Any] = dict(
    sources=SOURCES, audio_channels=2, samplerate=44100, segment=Fraction(39, 5), channels=48,
    growth=2, nfft=4096, cac=True, depth=4, rewrite=True, multi_freqs=[], freq_emb=0.2, emb_scale=10,
    emb_smooth=True, kernel_size=8, stride=4, time_stride=2, context=1, context_enc=0, norm_starts=4,
    norm_groups=4, dconv_mode=3, dconv_depth=2, dconv_comp=8, dconv_init=1e-3, bottom_channels=512,
    t_layers=5, t_hidden_scale=4.0, t_heads=8, t_dropout=0.02, t_sparse_attn_window=400, rescale=0.1,
)
# Small random models for tests: same class and code path, a fraction of the compute. "tiny8k" also
# runs at 8 kHz so a 10-minute input separates in seconds on 2 CPU cores (memory tests).
TINY_KWARGS: dict[str, dict[str, Any]] = {
    "tiny": dict(channels=8, bottom_channels=0, t_layers=1, t_heads=2, dconv_mode=1, dconv_depth=1),
    "tiny8k": dict(channels=8, bottom_channels=0, t_layers=1, t_heads=2, dconv_mode=1, dconv_depth=1,
                   samplerate=8000),
}
MODEL_CLASSES = ("demucs.htdemucs.HTDemucs", "demucs.hdemucs.HDemucs", "demucs.demucs.Demucs")


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
        "(8 kHz) = small HTDemucs for fast tests", output=lambda c, run: run.weights == "random")
    seed: int = option(0, "seeds the shift offsets (mixed with the key) and random-init weights")
    batch_size: int = 4  # tracks per process() call


class Separate(Stage):
    name = "separate"
    upstream = "filter"
    version = "1"
    Config = SeparateConfig
    requires = ("demucs", "torch", "soundfile", "numpy")
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
            resolve(f"demucs/{self.config.model}", "pretrained", models_root(self.run.models_root),
                    f"{self.config.model}.yaml")

    def setup(self) -> None:
        import torch

        c = self.config
        device = pick_device(c.device, c.num_gpus)
        self.bag, self.weights_stamp, self.weights_sha256 = load_bag(c, self.run)
        self.model_label = c.model if self.weights_stamp != RANDOM_INIT else c.random_init
        self.engine = SeparationEngine(self.bag, c, torch.device(device))
        media = Path(self.run.media_root)
        self.out_dir = media / "instrumental"
        self.out32k_dir = media / "instrumental32k"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.out32k_dir.mkdir(parents=True, exist_ok=True)
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
        if not source or not Path(source).is_file():
            raise MediaError(f"missing_input: no media file at {source!r}")
        limit = self.config.max_duration_s
        probed = row.get("media_duration_s")
        if limit and probed and probed > limit:  # refused before decoding hours of audio to scratch
            raise MediaError(f"too_long: {probed:.0f}s > {limit:.0f}s (separate.max_duration_s)")
        raw = Path(self.scratch.name) / f"{key}.f32"
        track = decode_to_scratch(key, Path(source), raw, self.bag.samplerate, self.bag.audio_channels)
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
        partial = self.out_dir / f"{key}.flac.part"
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
            final = self.out_dir / f"{key}.flac"
            partial.replace(final)
            final32k = self.out32k_dir / f"{key}.flac"
            write_resampled_flac(final, final32k, self.config.encodec_sample_rate, channels=1)
        except (MediaError, OSError, RuntimeError) as e:
            partial.unlink(missing_ok=True)
            reason = str(e) if isinstance(e, MediaError) else f"{type(e).__name__}: {e}"
            return Result.failed(key, reason, audio_duration_s=track.duration_s)
        finally:
            track.discard()
        return Result.ok(
            key,
            instrumental_path=str(final),
            instrumental32k_path=str(final32k),
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
    if c.random_init != "htdemucs" and c.random_init not in TINY_KWARGS:
        raise ConfigError(f"config key 'separate.random_init' must be 'htdemucs' or one of {sorted(TINY_KWARGS)}, "
                          f"got {c.random_init!r}")


# ---------------------------------------------------------------- decoded tracks


@dataclass
class Track:
    """One decoded track: raw float32 frames on scratch disk plus what separation accumulates."""

    key: str
    raw_path: Path
    frames: int
    channels: int
    sample_rate: int
    mean: float
    std: float
    mix_energy: float
    vocal_energy: float = 0.0
    block_vocal_energy: dict[int, float] = field(default_factory=dict)
    instrumental_source: bool = False
    kept_original: bool = False  # instrumental probe: not separated, the original audio is kept
    vocal_ratio_before: float = 0.0
    segments_separated: int = 0

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    @property
    def silent(self) -> bool:
        return self.mix_energy <= (SILENCE_RMS**2) * max(1, self.frames * self.channels)

    def read(self, start: int, count: int, normalized: bool = False) -> Any:
        """Frames [start, start+count) as (channels, count) float32, zeros outside the track
        (after normalising, as Demucs pads the normalised track)."""
        import numpy as np

        out = np.zeros((self.channels, count), dtype=np.float32)
        lo, hi = max(0, start), min(self.frames, start + count)
        if hi > lo:
            with open(self.raw_path, "rb") as f:
                f.seek(lo * self.channels * 4)
                data = np.fromfile(f, dtype=np.float32, count=(hi - lo) * self.channels)
            data = data.reshape(-1, self.channels).T
            out[:, lo - start:hi - start] = (data - self.mean) / self.std if normalized else data
        return out

    def discard(self) -> None:
        self.raw_path.unlink(missing_ok=True)


def decode_to_scratch(key: str, source: Path, raw: Path, sample_rate: int, channels: int) -> Track:
    """Decode once to raw float32 on disk, accumulating Demucs' normalisation statistics
    (mean and unbiased std of the mono mix) in float64 on the way."""
    import numpy as np

    frames, total, total_sq, energy = 0, 0.0, 0.0, 0.0
    try:
        with open(raw, "wb") as out:
            for chunk in stream_audio(source, sample_rate, channels):
                mono = chunk.astype(np.float64).mean(axis=1)
                total += float(mono.sum())
                total_sq += float(np.dot(mono, mono))
                energy += float(np.square(chunk, dtype=np.float64).sum())
                frames += len(chunk)
                chunk.tofile(out)
    except BaseException:
        raw.unlink(missing_ok=True)
        raise
    mean = total / frames if frames else 0.0
    variance = (total_sq - frames * mean * mean) / (frames - 1) if frames > 1 else 0.0
    std = float(np.sqrt(max(variance, 0.0))) + 1e-8
    return Track(key, raw, frames, channels, sample_rate, mean, std, energy)


# ---------------------------------------------------------------- model loading


def load_bag(config: SeparateConfig, run: Any) -> tuple[Any, str, str | None]:
    """(BagOfModels, weights stamp, sha256 of the weights) for `config.model`."""
    import torch
    from demucs.apply import BagOfModels

    if run.weights == "random":
        torch.manual_seed(config.seed)
        return BagOfModels([build_random_htdemucs(config.random_init)]), RANDOM_INIT, None
    # pinned in <models_root>/weights.lock.json as "demucs/<model>" (the bag's yaml)
    weights = resolve(f"demucs/{config.model}", "pretrained", models_root(run.models_root), f"{config.model}.yaml")
    assert weights.path is not None
    bag, files = load_repo_bag(weights.path.parent, config.model)
    return bag, weights.stamp, combined_sha256(files)


def build_random_htdemucs(size: str = "htdemucs") -> Any:
    from demucs.htdemucs import HTDemucs

    if size != "htdemucs" and size not in TINY_KWARGS:
        raise ValueError(f"separate.random_init must be 'htdemucs' or one of {sorted(TINY_KWARGS)}, got {size!r}")
    return HTDemucs(**{**HTDEMUCS_KWARGS, **TINY_KWARGS.get(size, {})}).eval()


def save_repo_model(model: Any, folder: Path, name: str, signature: str, fmt: str = "th") -> Path:
    """Write `model` as a one-model bag in Demucs' `--repo` layout (`<name>.yaml` + weights), the
    layout both this stage and `python -m demucs --repo` read. `fmt`: th | safetensors."""
    import json

    import torch
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    args, kwargs = model._init_args_kwargs
    klass = f"{type(model).__module__}.{type(model).__name__}"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        metadata = {"klass": klass, "args": json.dumps(list(args), default=_json_fraction),
                    "kwargs": json.dumps(kwargs, default=_json_fraction)}
        path = folder / f"{signature}.safetensors"
        save_file(state, str(path), metadata=metadata)
    elif fmt == "th":
        path = folder / f"{signature}.th"
        package = {"klass": type(model), "args": args, "kwargs": kwargs, "state": state, "training_args": {}}
        torch.save(package, path)
    else:
        raise ValueError(f"unknown weights format {fmt!r}: th | safetensors")
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"models": [signature]}))
    return path


def _json_fraction(value: Any) -> Any:
    if isinstance(value, Fraction):
        return {"_type": "fraction", "numerator": value.numerator, "denominator": value.denominator}
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def load_repo_bag(folder: Path, name: str) -> tuple[Any, list[Path]]:
    """A bag from a Demucs `--repo` folder, read without unpickling arbitrary objects."""
    import yaml
    from demucs.apply import BagOfModels

    spec = yaml.safe_load((folder / f"{name}.yaml").read_text())
    files = [model_file(folder, sig) for sig in spec["models"]]
    models = [load_model_file(path) for path in files]
    bag = BagOfModels(models, spec.get("weights"), spec.get("segment"))
    bag.eval()
    return bag, files


def model_file(folder: Path, signature: str) -> Path:
    candidates = [folder / f"{signature}.safetensors", folder / f"{signature}.th",
                  *sorted(folder.glob(f"{signature}-*.th"))]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no weights for Demucs signature {signature} in {folder}")


def load_model_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_th(path)


def _load_safetensors(path: Path) -> Any:
    from demucs.hf import load_safetensors_model
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        klass = (f.metadata() or {}).get("klass", "")
    if klass not in MODEL_CLASSES:
        raise ValueError(f"{path}: model class {klass!r} is not a Demucs model; refusing to load it")
    return load_safetensors_model(path)


def _load_th(path: Path) -> Any:
    import torch
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs
    from demucs.states import load_model

    with torch.serialization.safe_globals([HTDemucs, HDemucs, Demucs, Fraction]):
        package = torch.load(path, map_location="cpu", weights_only=True)
    if package.get("klass") not in (HTDemucs, HDemucs, Demucs):
        raise ValueError(f"{path}: not a Demucs model package")
    return load_model(package)


def combined_sha256(files: list[Path]) -> str:
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- streaming separation


@dataclass
class Stream:
    """One pass of one model over one track: the track delayed by `delay` frames (the shift
    trick), split into segments at `offsets`, overlap-added into `acc` / `weight_sum`."""

    track: Track
    model_index: int
    delay: int
    length: int  # frames of the delayed signal
    offsets: list[int]
    acc: Any = None  # (sources, channels, n) starting at delayed-signal frame `start`
    weight_sum: Any = None
    start: int = 0
    done: int = 0  # segments added so far

    def final_until(self) -> int:
        """Track frames before this are complete: no remaining segment touches them."""
        if self.done == len(self.offsets):
            return self.track.frames
        return self.offsets[self.done] - self.delay

    def add(self, offset: int, estimate: Any, weight: Any) -> None:
        import numpy as np

        end = offset + estimate.shape[-1]
        if self.acc is None:
            self.start = offset
            self.acc = np.zeros((*estimate.shape[:-1], 0), dtype=np.float32)
            self.weight_sum = np.zeros(0, dtype=np.float32)
        missing = end - self.start - self.acc.shape[-1]
        if missing > 0:
            self.acc = np.concatenate([self.acc, np.zeros((*self.acc.shape[:-1], missing), np.float32)], -1)
            self.weight_sum = np.concatenate([self.weight_sum, np.zeros(missing, np.float32)])
        lo, hi = offset - self.start, end - self.start
        self.acc[..., lo:hi] += weight[: hi - lo] * estimate
        self.weight_sum[lo:hi] += weight[: hi - lo]
        self.done += 1

    def take(self, first: int, stop: int) -> Any:
        """The finished estimate for track frames [first, stop); forgets everything before `stop`."""
        lo, hi = first + self.delay - self.start, stop + self.delay - self.start
        out = self.acc[..., lo:hi] / self.weight_sum[lo:hi]
        self.acc, self.weight_sum = self.acc[..., hi:].copy(), self.weight_sum[hi:].copy()
        self.start += hi
        return out


@dataclass
class Job:
    stream: Stream
    offset: int


class SeparationEngine:
    """Demucs' chunked apply (split + shifts + bags), streamed to disk and batched across tracks."""

    def __init__(self, bag: Any, config: SeparateConfig, device: Any) -> None:
        import numpy as np

        self.bag, self.config, self.device = bag, config, device
        self.models = list(bag.models)
        self.vocals = list(bag.sources).index(VOCALS)
        self.segment_lengths = [int(bag.samplerate * self._segment_s(m)) for m in self.models]
        self.weights = [triangle_weight(n) for n in self.segment_lengths]
        self.source_weights = np.asarray(bag.weights, dtype=np.float32)  # (models, sources)
        self.block = self.segment_lengths[0]
        self.batch_segments = config.batch_segments or auto_batch_segments(device)

    def _segment_s(self, model: Any) -> float:
        return float(self.config.segment if self.config.segment is not None else model.segment)

    # ---- driving

    def separate(self, tracks: Iterator[Track], open_writer: Any) -> Iterator[tuple[Track, str | None]]:
        """Separate every track into its writer; yields (track, failure reason or None) as each
        completes. Pulls the next track only when the queued segments no longer fill a batch."""
        queue: deque[Job] = deque()
        live: dict[str, tuple[list[Stream], Any]] = {}
        flushed: dict[str, int] = {}
        for track in tracks:
            if track.silent:
                yield track, None
                continue
            try:
                writer = open_writer(track)
                if self.config.skip_instrumental and self._probe_is_instrumental(track):
                    track.kept_original = True
                    copy_original(track, writer)
                    writer.close()
                    yield track, None
                    continue
            except (OSError, RuntimeError) as e:
                yield track, f"{type(e).__name__}: {e}"
                continue
            streams = self._streams(track)
            live[track.key], flushed[track.key] = (streams, writer), 0
            queue.extend(interleave(streams))
            while len(queue) >= self.batch_segments:
                yield from self._step(queue, live, flushed)
        while queue:
            yield from self._step(queue, live, flushed)

    def _step(self, queue: deque[Job], live: dict[str, tuple[list[Stream], Any]],
              flushed: dict[str, int]) -> Iterator[tuple[Track, str | None]]:
        batch = [queue.popleft() for _ in range(min(len(queue), self.batch_segments))]
        touched = {job.stream.track.key: job.stream.track for job in batch}
        try:
            self._run(batch)
        except RuntimeError as e:  # e.g. out of memory: fail the tracks in this batch, not the run
            for key, track in touched.items():
                live.pop(key)[1].close()
                for job in [j for j in queue if j.stream.track.key == key]:
                    queue.remove(job)
                yield track, f"separation_error: {e}"
            return
        for key, track in touched.items():
            streams, writer = live[key]
            if self._flush(track, streams, writer, flushed):
                writer.close()
                del live[key]
                self._decide_instrumental(track)
                yield track, None

    def _streams(self, track: Track) -> list[Stream]:
        """One stream per (model, shift), like apply_model: a bag applies each model in turn,
        and each shift delays the whole (zero-padded) track by a random 0-0.5 s."""
        rng = random.Random(zlib.crc32(f"{self.config.seed}:{track.key}".encode()))
        max_shift = int(0.5 * self.bag.samplerate)
        streams = []
        for index, length in enumerate(self.segment_lengths):
            stride = int((1 - self.config.overlap) * length)
            delays = [max_shift - rng.randint(0, max_shift) for _ in range(self.config.shifts)] or [0]
            for delay in delays:
                total = track.frames + delay
                streams.append(Stream(track, index, delay, total, list(range(0, total, stride))))
        return streams

    def _run(self, batch: list[Job]) -> None:
        """Model calls for a batch of segments, grouped by (model, padded length)."""
        groups: dict[tuple[int, int], list[tuple[Job, int]]] = {}
        for job in batch:
            stream = job.stream
            chunk = min(self.segment_lengths[stream.model_index], stream.length - job.offset)
            padded = self._valid_length(stream.model_index, chunk)
            groups.setdefault((stream.model_index, padded), []).append((job, chunk))
        for (index, padded), members in groups.items():
            windows = []
            for job, chunk in members:
                first = job.offset - (padded - chunk) // 2  # centred padding, as TensorChunk.padded
                windows.append(job.stream.track.read(first - job.stream.delay, padded, normalized=True))
            estimates = self._apply(index, windows)
            for (job, chunk), estimate in zip(members, estimates, strict=True):
                trim = (padded - chunk) // 2
                job.stream.add(job.offset, estimate[..., trim:trim + chunk], self.weights[index])
                job.stream.track.segments_separated += 1

    def _valid_length(self, index: int, chunk: int) -> int:
        from demucs.htdemucs import HTDemucs

        model = self.models[index]
        if isinstance(model, HTDemucs):
            return self.segment_lengths[index]
        return model.valid_length(chunk) if hasattr(model, "valid_length") else chunk

    def _apply(self, index: int, windows: list[Any]) -> Any:
        import numpy as np
        import torch
        from demucs.apply import apply_model

        mix = torch.from_numpy(np.stack(windows))
        with torch.inference_mode():
            out = apply_model(self.models[index], mix, shifts=0, split=False, segment=self.config.segment,
                              device=self.device)
        return out.cpu().numpy()

    def _flush(self, track: Track, streams: list[Stream], writer: Any, flushed: dict[str, int]) -> bool:
        """Write every finished frame of `track`; True once the whole track is written."""
        import numpy as np

        first, stop = flushed[track.key], max(0, min(s.final_until() for s in streams))
        if stop > first:
            stems = self._combine(streams, first, stop) * track.std + track.mean  # (sources, ch, n)
            vocals = stems[self.vocals]
            track.vocal_energy += float(np.square(vocals, dtype=np.float64).sum())
            self._add_block_energy(track, first, vocals)
            instrumental = stems.sum(axis=0) - vocals
            writer.write(np.clip(instrumental, -1.0, 1.0).T)
            flushed[track.key] = stop
        return stop >= track.frames

    def _combine(self, streams: list[Stream], first: int, stop: int) -> Any:
        """Average the shifts of each model, then mix models by their per-source weights."""
        import numpy as np

        per_model: dict[int, list[Any]] = {}
        for stream in streams:
            per_model.setdefault(stream.model_index, []).append(stream.take(first, stop))
        total, weight_total = 0.0, 0.0
        for index, parts in per_model.items():
            weights = self.source_weights[index][:, None, None]
            total = total + weights * (sum(parts) / len(parts))
            weight_total = weight_total + weights
        return np.asarray(total / weight_total, dtype=np.float32)

    def _add_block_energy(self, track: Track, first: int, vocals: Any) -> None:
        import numpy as np

        frame_energy = np.square(vocals, dtype=np.float64).sum(axis=0)
        blocks = np.arange(first, first + frame_energy.shape[0]) // self.block
        sums = np.bincount(blocks - blocks[0], weights=frame_energy)
        for i, energy in enumerate(sums):
            block = int(blocks[0]) + i
            track.block_vocal_energy[block] = track.block_vocal_energy.get(block, 0.0) + float(energy)

    # ---- vocal energy ratios

    def _decide_instrumental(self, track: Track) -> None:
        track.vocal_ratio_before = ratio(track.vocal_energy, track.mix_energy)
        track.instrumental_source = track.vocal_ratio_before < self.config.instrumental_threshold

    def _probe_is_instrumental(self, track: Track) -> bool:
        import numpy as np

        n = self.block
        count = max(1, self.config.probe_segments)
        starts = sorted({int(s) for s in np.linspace(0, max(0, track.frames - n), count)})
        windows = [track.read(s, n) for s in starts]
        vocals, _ = self.window_vocals(track, windows)
        lengths = [min(n, track.frames - s) for s in starts]
        mix_energy = sum(float(np.square(w[:, :k], dtype=np.float64).sum()) for w, k in zip(windows, lengths, strict=True))
        vocal_energy = sum(float(np.square(v[:, :k], dtype=np.float64).sum()) for v, k in zip(vocals, lengths, strict=True))
        track.segments_separated += len(starts) * len(self.models)
        track.vocal_ratio_before = ratio(vocal_energy, mix_energy)
        track.instrumental_source = track.vocal_ratio_before < self.config.instrumental_threshold
        return track.instrumental_source

    def residual_vocal_ratio(self, track: Track, instrumental_path: Path) -> float | None:
        """Vocals the model still finds in the instrumental, on the blocks that had the most."""
        import numpy as np
        import soundfile as sf

        count = self.config.residual_segments
        if count <= 0 or not track.block_vocal_energy:
            return None
        ranked = sorted(track.block_vocal_energy, key=track.block_vocal_energy.__getitem__, reverse=True)
        windows, lengths = [], []
        with sf.SoundFile(instrumental_path) as f:
            for block in sorted(ranked[:count]):
                f.seek(block * self.block)
                data = f.read(self.block, dtype="float32", always_2d=True).T
                lengths.append(data.shape[1])
                window = np.zeros((track.channels, self.block), np.float32)
                window[:, : data.shape[1]] = data
                windows.append(window)
        vocals, _ = self.window_vocals(track, windows)
        track.segments_separated += len(windows) * len(self.models)
        inst = sum(float(np.square(w[:, :k], dtype=np.float64).sum()) for w, k in zip(windows, lengths, strict=True))
        voc = sum(float(np.square(v[:, :k], dtype=np.float64).sum()) for v, k in zip(vocals, lengths, strict=True))
        return ratio(voc, inst)

    def window_vocals(self, track: Track, windows: list[Any]) -> tuple[Any, Any]:
        """The bag's vocals (and all stems) for whole-segment windows, without shifts, in the
        windows' own scale; normalised by the track's statistics like the main pass."""
        import numpy as np

        normalized = [(w - track.mean) / track.std for w in windows]
        total, weight_total = 0.0, 0.0
        for index in range(len(self.models)):
            estimates = self._apply(index, normalized)
            weights = self.source_weights[index][None, :, None, None]
            total = total + weights * estimates
            weight_total = weight_total + weights
        stems = np.asarray(total / weight_total) * track.std + track.mean
        return stems[:, self.vocals], stems


def auto_batch_segments(device: Any) -> int:
    """On CPU one htdemucs segment per call: measured on 2 cores, a batch of 4 takes 5.6 s per
    segment against 4.1 s alone (bench/separate.py --batch-segments). On a GPU batching is what
    fills the device; 4 is a guess, not yet measured."""
    return 1 if getattr(device, "type", str(device)) == "cpu" else 4


def triangle_weight(length: int) -> Any:
    """Demucs' cross-fade weight (apply_model, transition_power=1): a triangle peaking mid-segment."""
    import numpy as np

    half = length // 2
    weight = np.concatenate([np.arange(1, half + 1), np.arange(length - half, 0, -1)]).astype(np.float32)
    return weight / weight.max()


def interleave(streams: list[Stream]) -> Iterator[Job]:
    """Segments of all streams ordered by where they start in the track, so output is finished
    (and flushed) steadily instead of after the last stream."""
    jobs = [Job(s, offset) for s in streams for offset in s.offsets]
    return iter(sorted(jobs, key=lambda job: job.offset - job.stream.delay))


def copy_original(track: Track, writer: Any, chunk: int = 1 << 18) -> None:
    import numpy as np

    for first in range(0, track.frames, chunk):
        count = min(chunk, track.frames - first)
        writer.write(np.clip(track.read(first, count), -1.0, 1.0).T)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0
