"""The shard root's bookkeeping, shared by the shards stage and the `verify`/`takedown` commands.

Each finished shard `{split}-{NNNNNN}.tar` has a sidecar `{split}-{NNNNNN}.json` (keys, sample
count, bytes, sha256). The sidecar is renamed into place *before* its tar, so a tar under a final
name always has a sidecar; a sidecar without its tar is the trace of a kill between the two renames
and is removed. `index.parquet` (and `wids-{split}.json`) are rebuilt from the sidecars.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

KEY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
SHARD_NAME = re.compile(r"^(train|val|test)-(\d{6})\.tar$")
ARRAY_MEMBERS = {
    "tokens.npy": ("int16", 2),
    "hiera.npy": ("float16", 2),
    "music_beats.npy": ("int8", 1),
    "video_beats.npy": ("int8", 1),
    "beat_weights.npy": ("float32", 1),
}
REQUIRED = set(ARRAY_MEMBERS) | {"json"}
OPTIONAL = {"flac", "mp4"}


class ShardError(ValueError):
    pass


def check_key(key: str) -> str:
    if not KEY.match(key):
        raise ShardError(f"unsafe sample key {key!r}: keys must match {KEY.pattern}")
    return key


def split_member(name: str) -> tuple[str, str]:
    """`key.ext` → (key, ext), refusing anything that could escape or confuse a reader."""
    if "/" in name or "\\" in name or name.startswith(".") or ".." in name:
        raise ShardError(f"unsafe tar member name {name!r}")
    key, _, ext = name.partition(".")
    check_key(key)
    if ext not in REQUIRED | OPTIONAL:
        raise ShardError(f"unexpected tar member {name!r}")
    return key, ext


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_file_bytes(path: str | Path, dtype: str, ndim: int) -> bytes:
    """The bytes of an .npy file, as they are when its header already says `dtype` with `ndim`
    dimensions (no decode/re-encode: the common case), else loaded and converted."""
    with open(path, "rb") as f:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read_header:
            shape, fortran, file_dtype = read_header(f)
            if file_dtype == np.dtype(dtype) and len(shape) == ndim and not fortran:
                f.seek(0)
                return f.read()
    array = np.load(path, allow_pickle=False)
    if array.ndim != ndim:
        raise ShardError(f"bad_array: {Path(path).name} has shape {array.shape}, expected {ndim} dimensions")
    return npy_bytes(array.astype(dtype))


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it (no re-read for sha256)."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += len(view)
        return self.file.write(view)

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        super().close()


@dataclass
class ShardInfo:
    shard: str
    split: str
    keys: list[str] = field(default_factory=list)
    bytes: int = 0
    sha256: str = ""

    @property
    def num_samples(self) -> int:
        return len(self.keys)


def sidecar_path(root: Path, shard: str) -> Path:
    return root / shard.replace(".tar", ".json")


def write_sidecar(root: Path, info: ShardInfo) -> None:
    path = sidecar_path(root, info.shard)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"shard": info.shard, "split": info.split, "keys": info.keys,
                               "bytes": info.bytes, "sha256": info.sha256}))
    os.replace(tmp, path)


def read_shards(root: Path, clean: bool = False) -> dict[str, ShardInfo]:
    """Finished shards by name. With `clean`, remove temp files and orphaned sidecars."""
    shards = {}
    if not root.is_dir():
        return shards
    if clean:
        for tmp in root.glob("*.tmp"):
            tmp.unlink()
    for side in sorted(root.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].json")):
        data = json.loads(side.read_text())
        if not (root / data["shard"]).is_file():
            if clean:
                side.unlink()
            continue
        shards[data["shard"]] = ShardInfo(data["shard"], data["split"], data["keys"], data["bytes"], data["sha256"])
    return shards


def next_shard_number(root: Path, split: str) -> int:
    numbers = [int(m.group(2)) for p in root.glob(f"{split}-*") if (m := SHARD_NAME.match(p.name.split(".tmp")[0]))]
    return max(numbers, default=-1) + 1


def write_index(root: Path, shards: dict[str, ShardInfo]) -> Path:
    """index.parquet (one row per shard, keys as a list) and a wids-style JSON per split."""
    infos = sorted(shards.values(), key=lambda s: s.shard)
    table = pa.table({
        "shard": [s.shard for s in infos],
        "split": [s.split for s in infos],
        "num_samples": pa.array([s.num_samples for s in infos], pa.int64()),
        "bytes": pa.array([s.bytes for s in infos], pa.int64()),
        "sha256": [s.sha256 for s in infos],
        "keys": pa.array([s.keys for s in infos], pa.list_(pa.string())),
    })
    path = root / "index.parquet"
    tmp = root / "index.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    for split in {s.split for s in infos}:
        wids = {
            "__kind__": "wids-shard-index-v1",
            "name": f"discomv-{split}",
            "wids_version": 1,
            "shardlist": [{"url": s.shard, "nsamples": s.num_samples} for s in infos if s.split == split],
        }
        wids_path = root / f"wids-{split}.json"
        wids_path.with_suffix(".json.tmp").write_text(json.dumps(wids, indent=1))
        os.replace(wids_path.with_suffix(".json.tmp"), wids_path)
    return path


# ---------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    faults: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_shard(path: Path, info: ShardInfo, frames: int) -> tuple[list[str], list[str]]:
    """(keys found, faults) for one shard: checksum, member names, arrays, completeness."""
    faults = []
    if path.stat().st_size != info.bytes or sha256_of(path) != info.sha256:
        faults.append(f"{path.name}: sha256/size mismatch with its index entry (corrupted or modified)")
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    faults.append(f"{path.name}: non-file member {member.name!r}")
                    continue
                try:
                    key, ext = split_member(member.name)
                except ShardError as e:
                    faults.append(f"{path.name}: {e}")
                    continue
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        faults.append(f"{path.name}: unreadable tar ({e})")
    for key, members in samples.items():
        faults += [f"{path.name}:{key}: {p}" for p in check_sample(members, frames)]
    if sorted(samples) != sorted(info.keys):
        faults.append(f"{path.name}: keys in the tar differ from its index entry")
    return list(samples), faults


def check_sample(members: dict[str, bytes], frames: int) -> list[str]:
    problems = [f"missing {m}" for m in sorted(REQUIRED - set(members))]
    for name, (dtype, ndim) in ARRAY_MEMBERS.items():
        if name not in members:
            continue
        try:
            array = load_npy(members[name])
        except ValueError as e:
            problems.append(f"{name} unreadable ({e})")
            continue
        if str(array.dtype) != dtype or array.ndim != ndim:
            problems.append(f"{name} is {array.dtype}{list(array.shape)}, expected {dtype} with {ndim} dims")
        elif name == "tokens.npy" and array.shape[1] != frames:
            problems.append(f"tokens.npy has {array.shape[1]} steps, expected {frames}")
        elif name.endswith(("beats.npy", "weights.npy")) and array.shape[0] != frames:
            problems.append(f"{name} has {array.shape[0]} steps, expected {frames}")
    if "json" in members:
        try:
            json.loads(members["json"])
        except ValueError:
            problems.append("json unreadable")
    return problems


def verify(root: Path, sharded_keys: set[str] | None = None, frames: int = 500) -> VerifyReport:
    """Re-read every shard; with `sharded_keys` (from the manifest), also check that each is in
    exactly one shard and that no shard holds a key the manifest doesn't list."""
    report = VerifyReport()
    shards = read_shards(root)
    on_disk = {p.name for p in root.glob("*.tar")} if root.is_dir() else set()
    for orphan in sorted(on_disk - set(shards)):
        report.faults.append(f"{orphan}: tar without an index entry (sidecar)")
    seen: dict[str, list[str]] = {}
    for name, info in sorted(shards.items()):
        keys, faults = verify_shard(root / name, info, frames)
        report.shards += 1
        report.samples += len(keys)
        report.faults += faults
        for key in keys:
            seen.setdefault(key, []).append(name)
    report.faults += [f"{k}: in {len(v)} shards ({', '.join(v)})" for k, v in seen.items() if len(v) > 1]
    if sharded_keys is not None:
        report.faults += [f"{k}: marked sharded in the manifest but in no shard" for k in sorted(sharded_keys - set(seen))]
        report.faults += [f"{k}: in a shard but not marked sharded in the manifest" for k in sorted(set(seen) - sharded_keys)]
    return report
