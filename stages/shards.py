"""shards: clips that passed every stage → WebDataset tar shards `{split}-{NNNNNN}.tar`.

Plain tars with members `{key}.{ext}`, byte for byte what webdataset's `TarWriter` writes (headers
from `tarfile.TarInfo`, see `TarShardWriter`), readable by any WebDataset/wids/HF `datasets`
reader. Not Ray Data's `write_webdataset`, because we need what that writer doesn't give:
size-bounded shards split by artist, a temp name renamed only when the shard is complete, sha256
computed while writing, and a sidecar index per shard so a re-run after a kill finds finished
samples instead of writing them twice. A write error (disk full) fails the rows of the shard being
written and the rest of its split, naming the error, and leaves no partial tar behind.

With `run.shard_root` on S3 (`s3://bucket/prefix`) each shard streams to its final key as a
multipart upload completed only when the tar is whole, and its sidecar is uploaded last; on other
object stores it is staged in a local file (one at a time) and uploaded whole (pipeline/webds/index.py,
docs/storage.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import subprocess
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.media.staging import MediaStore, media_store
from pipeline.options import ConfigError, option
from pipeline.stage import Resources, Result, Row, Stage
from pipeline.timeline import STEPS
from pipeline.webds.index import (
    ShardInfo,
    ShardRoot,
    next_shard_number,
    read_shards,
    sidecar_path,
    write_index,
    write_sidecar,
)
from pipeline.webds.sample import ARRAY_MEMBERS, BEAT_ARRAYS, ShardError, check_key, npy_bytes
from pipeline.webds.writer import FileMember, TarShardWriter, npy_artifact, write_failure

log = logging.getLogger("discomv")
Sample = dict[str, Any]  # member extension → bytes or FileMember, plus `__key__`


@dataclass
class ShardsConfig:
    max_bytes: int = option(1_000_000_000, "start a new shard before it would exceed this many bytes",
                            output=False)
    max_samples: int = option(2000, "at most this many samples per shard (also the writer's batch)",
                              output=False)
    train_fraction: float = option(0.9, "fraction of artists in train (by hash of the artist)")
    val_fraction: float = option(0.05, "fraction of artists in val; test gets the rest")
    heldout_keys: str | None = option(None, "file of video or clip keys forced into `heldout_split` (its "
                                      "content, not its path, decides a redo)", output=False)
    heldout_split: str = option("test", "split for held-out keys: val | test", choices=("val", "test"))
    include_flac: bool = option(False, "add the clip's 32 kHz instrumental as `flac`")
    include_mp4: bool = option(False, "add the clip re-encoded small as `mp4`")
    mp4_height: int = option(128, "height of the optional mp4", output=lambda c, run: c.include_mp4)
    fsync: bool = option(
        True, "fsync each shard before renaming it into place (false: faster where the disk is slow, "
        "but a power loss or kernel crash can leave a short shard under its final name; verify finds it)",
        output=False)


class Shards(Stage):
    name = "shards"
    upstream = "features"
    version = "1"
    Config = ShardsConfig
    schema = pa.schema([("shard", pa.string()), ("split", pa.string()), ("sample_bytes", pa.int64())])

    def __init__(self, config: ShardsConfig, run: Any) -> None:
        super().__init__(config, run)
        for name in ("max_bytes", "max_samples"):
            if getattr(config, name) < 1:
                raise ConfigError(f"config key 'shards.{name}' must be at least 1, got {getattr(config, name)}")
        if not 0 <= config.train_fraction + config.val_fraction <= 1:
            raise ConfigError("config keys 'shards.train_fraction' + 'shards.val_fraction' must be within [0, 1]")

    @property
    def resources(self) -> Resources:
        # One writer: shard numbers and index.parquet have a single owner.
        return Resources(num_cpus=1, batch_size=self.config.max_samples, concurrency=1)

    def reads_media(self) -> frozenset[str]:
        return frozenset({"stems"} if self.config.include_flac else set()) | (
            {"video"} if self.config.include_mp4 else set())

    def params(self) -> dict[str, Any]:
        return {**super().params(), "heldout": _file_digest(self.config.heldout_keys)}

    def setup(self) -> None:
        self.root: ShardRoot
        if storage.is_remote(self.run.shard_root):
            self.root = storage.open_root(self.run.shard_root)
            self.staging = staging_dir(self.root.url)
        else:
            self.root = storage.local_path(self.run.shard_root)
            self.root.mkdir(parents=True, exist_ok=True)
            self.staging = self.root
        self.heldout = _read_keys(self.config.heldout_keys)
        self.media = media_store(self.run)

    def process(self, rows: list[Row]) -> list[Result]:
        shards = read_shards(self.root, clean=True)
        where = {key: info for info in shards.values() for key in info.keys}
        results, by_split = [], {}
        for row in rows:
            key = row["key"]
            if key in where:  # written by a run that was killed before recording it
                results.append(Result.ok(key, shard=where[key].shard, split=where[key].split))
            else:
                by_split.setdefault(self.split_for(row), []).append(row)
        for split, split_rows in by_split.items():
            results += self.write_split(split, split_rows, shards)
        try:
            write_index(self.root, shards)
        except OSError as e:  # the shards are safe, but not done until the index lists them
            reason = write_failure(e, "index.parquet")
            log.error("shards: %s", reason)
            return [Result.failed(r.key, reason) if r.status == "ok" else r for r in results]
        return results

    def split_for(self, row: Row) -> str:
        if row["key"] in self.heldout or row.get("video_key") in self.heldout:
            return self.config.heldout_split
        artist = row.get("artist_id") or row.get("artist") or row.get("video_key") or row["key"]
        fraction = int(hashlib.sha256(str(artist).encode()).hexdigest()[:8], 16) / 0x100000000
        if fraction < self.config.train_fraction:
            return "train"
        return "val" if fraction < self.config.train_fraction + self.config.val_fraction else "test"

    def build_sample(self, row: Row) -> Sample:
        key = check_key(row["key"])
        sample = {
            "__key__": key,
            "tokens.npy": artifact(row, "tokens_path", "tokens.npy", self.media),
            "hiera.npy": artifact(row, "features_path", "hiera.npy", self.media),
            **{f"{name}.npy": npy_bytes(array) for name, array in beat_arrays(row).items()},
            "json": json.dumps(provenance(row), default=str, ensure_ascii=False).encode(),
        }
        if self.config.include_flac:
            sample["flac"] = clip_flac(row, self.media)
        if self.config.include_mp4:
            sample["mp4"] = clip_mp4(row, self.config.mp4_height, self.media)
        return sample

    def write_split(self, split: str, rows: list[Row], shards: dict[str, ShardInfo]) -> list[Result]:
        """Write these rows' samples into new shards of `split` (added to `shards`); one result per
        row. Samples are built as they are written, so memory holds a shard's batch, not the split."""
        results: list[Result] = []
        samples = SampleQueue(rows, self.build_sample, results)
        while samples.peek():
            info = ShardInfo(f"{split}-{next_shard_number(self.root, split):06d}.tar", split)
            try:
                sizes = self.write_shard(info, samples)
            except OSError as e:
                reason = write_failure(e, info.shard)
                log.error("shards: %s; %d rows of split %s not written", reason, len(info.keys) + samples.left(), split)
                return results + [Result.failed(key, reason) for key in info.keys + samples.keys_left()]
            shards[info.shard] = info
            results += [Result.ok(k, shard=info.shard, split=split, sample_bytes=sizes[k]) for k in info.keys]
        return results

    def write_shard(self, info: ShardInfo, samples: SampleQueue) -> dict[str, int]:
        """Fill one shard from `samples` (up to max_samples / max_bytes), publish it under its final
        name and return the approximate bytes per key. `info.keys` lists every key taken, even when
        a write error is raised part-way."""
        sizes = {}
        with self.open_writer(info) as writer:
            while (item := samples.peek()) and len(info.keys) < self.config.max_samples:
                key, sample = item
                size = sum(len(v) + 1024 for k, v in sample.items() if k != "__key__")
                if info.keys and writer.size + size > self.config.max_bytes:
                    break
                samples.pop()
                info.keys.append(key)
                sizes[key] = size
                writer.write(sample)
            info.bytes, info.sha256 = writer.close()
        publish(self.root, None if writer.sink else writer.path, info)
        log.info("shards: wrote %s (%d samples, %.1f MB)", info.shard, info.num_samples, info.bytes / 1e6)
        return sizes


    def open_writer(self, info: ShardInfo) -> TarShardWriter:
        """On S3 the tar streams straight to its final key as a multipart upload, completed by
        `close()` once the last byte is in (aborted on an error; a kill leaves it unfinished, which S3
        never shows), so uploading overlaps building; elsewhere, a temp file (local, or staged for
        an upload)."""
        if isinstance(self.root, storage.Root) and self.root.protocol in storage.ATOMIC_UPLOAD:
            sink = self.root.fs.open(self.root.key(info.shard), "wb", block_size=UPLOAD_PART_BYTES)
            return TarShardWriter(Path(info.shard), sink=sink)
        return TarShardWriter(self.staging / (info.shard + ".tmp"), durable=self.config.fsync)


UPLOAD_PART_BYTES = 16 << 20  # a multipart upload's part: S3's minimum is 5 MiB; smaller parts overlap more


class SampleQueue:
    """Rows built into samples on demand, in order. A row that can't be built becomes a failed
    result in `failures` when it comes up, and is skipped."""

    def __init__(self, rows: list[Row], build: Callable[[Row], Sample], failures: list[Result]) -> None:
        self.rows = deque(rows)
        self.build = build
        self.failures = failures
        self.head: tuple[str, Sample] | None = None

    def peek(self) -> tuple[str, Sample] | None:
        while self.head is None and self.rows:
            row = self.rows.popleft()
            try:
                self.head = (row["key"], self.build(row))
            except (ShardError, OSError, ValueError) as e:
                self.failures.append(Result.failed(row["key"], str(e) if ":" in str(e) else f"bad_sample: {e}"))
        return self.head

    def pop(self) -> None:
        self.head = None

    def keys_left(self) -> list[str]:
        return ([self.head[0]] if self.head else []) + [row["key"] for row in self.rows]

    def left(self) -> int:
        return len(self.rows) + (self.head is not None)


def staging_dir(url: str) -> Path:
    """This node's local folder for the shard being written to a remote root: one per root (the
    stage has one writer), emptied of what a killed writer left, so it holds one shard at most."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"discomv-shards-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tmp"):
        stale.unlink(missing_ok=True)
    return folder


def publish(root: ShardRoot, tmp: Path | None, info: ShardInfo) -> None:
    """Sidecar first, then the tar: a tar under a final name always has its index entry. On an
    error neither the temp tar nor a sidecar without its tar is left behind. Remotely the tar goes
    up first (from `tmp`; or, with `tmp` None, already uploaded by the writer) and its sidecar last
    (a finished shard is one with a sidecar)."""
    if isinstance(root, storage.Root):
        try:
            if tmp is not None:
                root.publish_file(tmp, info.shard)
            write_sidecar(root, info)
        except OSError:
            root.remove(info.shard)
            raise
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        return
    try:
        write_sidecar(root, info)
        os.replace(tmp, root / info.shard)
    except OSError:
        tmp.unlink(missing_ok=True)
        if not (root / info.shard).exists():
            sidecar_path(root, info.shard).unlink(missing_ok=True)
        raise


def artifact(row: Row, column: str, member: str, media: MediaStore) -> FileMember | bytes:
    """The .npy file named in `column`, as the dtype and rank of sample member `member` (on an object
    store its bytes, read once: no clip's artifact is read twice, so none goes through the cache)."""
    try:
        path = row[column]
        data = media.read_bytes(path) if media.remote and storage.is_remote(path) else None
        return npy_artifact(path, *ARRAY_MEMBERS[member], data=data)
    except (KeyError, TypeError, FileNotFoundError, IsADirectoryError) as e:
        raise ShardError(f"missing_artifact: {column} {row.get(column)!r} not found") from e
    except OSError as e:
        raise ShardError(f"unreadable_artifact: {column} {row.get(column)!r} ({e.strerror or e})") from e


def beat_arrays(row: Row) -> dict[str, np.ndarray]:
    arrays = {}
    for name, (packer, dtype) in BEAT_ARRAYS.items():
        values = row.get(name)
        if isinstance(values, np.ndarray):  # rows that crossed Ray with array columns: same checks
            shape, values = values.shape, values.tolist()
        elif isinstance(values, list | tuple):
            shape = (len(values),)
        else:
            raise ShardError(f"missing_beats: no {name} ({type(values).__name__}), expected {STEPS} values")
        if shape != (STEPS,):
            raise ShardError(f"missing_beats: {name} has shape {shape}, expected ({STEPS},)")
        try:
            arrays[name] = np.frombuffer(packer.pack(*values), dtype)
        except (struct.error, TypeError, OverflowError, ValueError) as e:
            raise ShardError(f"bad_beats: {name} holds a value that is not {dtype.name} ({e})") from e
        if dtype.kind == "f" and not np.isfinite(arrays[name]).all():
            raise ShardError(f"bad_beats: {name} holds NaN or infinity")
    return arrays


PROVENANCE_SKIP = {*BEAT_ARRAYS, "also_in", "input_file", "input_row"}


def provenance(row: Row) -> dict[str, Any]:
    """Everything upstream stages recorded about this clip except bulky arrays and local paths."""
    info = {k: v for k, v in row.items() if k not in PROVENANCE_SKIP and not k.endswith("_path")}
    stamps = row.get("upstream_weights") or {}
    info["weights"] = "random-init" if "random-init" in stamps.values() else "pretrained"
    return info


def clip_flac(row: Row, media: MediaStore) -> bytes:
    import io

    import soundfile as sf

    path = row.get("instrumental32k_path")
    if not path or not media.is_file(path):
        raise ShardError(f"missing_artifact: instrumental32k_path {path!r} not found")
    with media.local(path) as file, sf.SoundFile(file) as f:
        rate = f.samplerate
        want = int(round((row["end_s"] - row["start_s"]) * rate))
        f.seek(min(int(round(row["start_s"] * rate)), f.frames))
        audio = f.read(want, dtype="float32")
    if len(audio) < want:  # a padded last clip: silence past the end of the track
        audio = np.pad(audio, [(0, want - len(audio))] + [(0, 0)] * (audio.ndim - 1))
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="FLAC")
    return buf.getvalue()


def clip_mp4(row: Row, height: int, media: MediaStore) -> bytes:
    try:
        with media.local(str(row["video_path"])) as file:
            return _cut_mp4(row, height, file)
    except FileNotFoundError as e:
        raise ShardError(f"missing_artifact: video_path {row['video_path']!r} not found") from e


def _cut_mp4(row: Row, height: int, video: Path) -> bytes:
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-ss", str(row["start_s"]), "-t", str(row["end_s"] - row["start_s"]),
           "-i", str(video), "-vf", f"scale=-2:{height}", "-c:v", "libx264", "-preset", "veryfast",
           "-crf", "30", "-c:a", "aac", "-b:a", "64k", "-movflags", "frag_keyframe+empty_moov", "-f", "mp4", "-"]
    out = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    if out.returncode != 0 or not out.stdout:
        raise ShardError(f"clip_encode: ffmpeg could not cut the clip ({out.stderr.decode()[-200:]})")
    return out.stdout


def _read_keys(path: str | None) -> set[str]:
    if not path:
        return set()
    lines = Path(path).read_text().split()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def _file_digest(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path and Path(path).is_file() else None
