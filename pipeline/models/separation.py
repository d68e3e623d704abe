"""Demucs' chunked apply, streamed: long tracks in bounded memory, segments batched across tracks.

* **Long tracks, bounded memory.** Instead of handing `apply_model` the whole track (its output
  alone is 4 stems × the track), we run Demucs' own split scheme ourselves: segments of the model's
  length (7.8 s) at stride `(1 - overlap)`, triangular cross-fade weights, zero padding at the edges,
  the shift trick as whole-track delays, bags of models by their per-source weights. Each segment
  goes through `demucs.apply.apply_model(split=False)`. Finished samples are written to FLAC as soon
  as no later segment overlaps them, so memory is O(segment × batch), never O(track), and the
  output equals the CLI's on tracks of any length (the benchmark checks this).
* **Batching across tracks.** Segments from consecutive tracks share model calls
  (`batch_segments` per call), which matters on a GPU; on CPU one segment per call is faster.

Vocal energy ratios (energy of the model's vocals stem / energy of its input):
* before: vocals / mix over the whole track, from the separation pass itself (free).
* after (`residual_vocal_ratio`): the instrumental is separated again, but only on the
  `residual_segments` model-length blocks where the first pass found the most vocal energy:
  vocals-of-instrumental / instrumental there. A full second pass would double the cost; the
  loudest-vocal blocks are where residue is, so this is a conservative (high) estimate at a fixed,
  small price.
* With `skip_instrumental`, a cheap probe (`probe_segments` evenly spread segments) runs first;
  a track whose vocal ratio is below `instrumental_threshold` is an instrumental source, is not
  separated, and keeps its original audio as the instrumental.
"""

from __future__ import annotations

import random
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.media.tracks import Track, copy_original
from pipeline.models.demucs import VOCALS


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

    def __init__(self, bag: Any, device: Any, *, segment: float | None, overlap: float, shifts: int, seed: int,
                 batch_segments: int, skip_instrumental: bool, probe_segments: int,
                 instrumental_threshold: float, residual_segments: int) -> None:
        """Arguments as the `separate.*` options of the same names; `batch_segments` 0 = auto."""
        import numpy as np

        self.bag, self.device = bag, device
        self.segment, self.overlap, self.shifts, self.seed = segment, overlap, shifts, seed
        self.skip_instrumental, self.probe_segments = skip_instrumental, probe_segments
        self.instrumental_threshold, self.residual_segments = instrumental_threshold, residual_segments
        self.models = list(bag.models)
        self.vocals = list(bag.sources).index(VOCALS)
        self.segment_lengths = [int(bag.samplerate * self._segment_s(m)) for m in self.models]
        self.weights = [triangle_weight(n) for n in self.segment_lengths]
        self.source_weights = np.asarray(bag.weights, dtype=np.float32)  # (models, sources)
        self.block = self.segment_lengths[0]
        self.batch_segments = batch_segments or auto_batch_segments(device)

    def _segment_s(self, model: Any) -> float:
        return float(self.segment if self.segment is not None else model.segment)

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
                if self.skip_instrumental and self._probe_is_instrumental(track):
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
        rng = random.Random(zlib.crc32(f"{self.seed}:{track.key}".encode()))
        max_shift = int(0.5 * self.bag.samplerate)
        streams = []
        for index, length in enumerate(self.segment_lengths):
            stride = int((1 - self.overlap) * length)
            delays = [max_shift - rng.randint(0, max_shift) for _ in range(self.shifts)] or [0]
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
            out = apply_model(self.models[index], mix, shifts=0, split=False, segment=self.segment,
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
        track.instrumental_source = track.vocal_ratio_before < self.instrumental_threshold

    def _probe_is_instrumental(self, track: Track) -> bool:
        import numpy as np

        n = self.block
        count = max(1, self.probe_segments)
        starts = sorted({int(s) for s in np.linspace(0, max(0, track.frames - n), count)})
        windows = [track.read(s, n) for s in starts]
        vocals, _ = self.window_vocals(track, windows)
        lengths = [min(n, track.frames - s) for s in starts]
        mix_energy = sum(float(np.square(w[:, :k], dtype=np.float64).sum()) for w, k in zip(windows, lengths, strict=True))
        vocal_energy = sum(float(np.square(v[:, :k], dtype=np.float64).sum()) for v, k in zip(vocals, lengths, strict=True))
        track.segments_separated += len(starts) * len(self.models)
        track.vocal_ratio_before = ratio(vocal_energy, mix_energy)
        track.instrumental_source = track.vocal_ratio_before < self.instrumental_threshold
        return track.instrumental_source

    def residual_vocal_ratio(self, track: Track, instrumental_path: Path) -> float | None:
        """Vocals the model still finds in the instrumental, on the blocks that had the most."""
        import numpy as np
        import soundfile as sf

        count = self.residual_segments
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


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0
