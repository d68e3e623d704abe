"""`discomv verify`: re-read every shard and check it against its sidecar, the sample format and
the manifest."""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pipeline.storage import Root
from pipeline.timeline import STEPS
from pipeline.webds.index import ShardInfo, ShardRoot, read_shards, shard_names
from pipeline.webds.sample import ShardError, check_sample, split_member


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    faults: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


def sha256_of(path: Path | BinaryIO) -> str:
    h = hashlib.sha256()
    with open(path, "rb") if isinstance(path, Path) else path as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_shard(root: ShardRoot, name: str) -> BinaryIO:
    return root.open(name) if isinstance(root, Root) else open(root / name, "rb")


def verify_shard(root: ShardRoot, info: ShardInfo, frames: int) -> tuple[list[str], list[str]]:
    """(keys found, faults) for one shard: checksum, member names, arrays, completeness."""
    faults = []
    name = info.shard
    if isinstance(root, Root):  # one streaming read for the checksum, one for the members
        size, digest = root.size(name), sha256_of(root.open(name))
    else:
        size, digest = (root / name).stat().st_size, sha256_of(root / name)
    if size != info.bytes or digest != info.sha256:
        faults.append(f"{name}: sha256/size mismatch with its index entry (corrupted or modified)")
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with open_shard(root, name) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    faults.append(f"{name}: non-file member {member.name!r}")
                    continue
                try:
                    key, ext = split_member(member.name)
                except ShardError as e:
                    faults.append(f"{name}: {e}")
                    continue
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        faults.append(f"{name}: unreadable tar ({e})")
    for key, members in samples.items():
        faults += [f"{name}:{key}: {p}" for p in check_sample(members, frames)]
    if sorted(samples) != sorted(info.keys):
        faults.append(f"{name}: keys in the tar differ from its index entry")
    return list(samples), faults


def verify(root: ShardRoot, sharded_keys: set[str] | None = None, frames: int = STEPS) -> VerifyReport:
    """Re-read every shard; with `sharded_keys` (from the manifest), also check that each is in
    exactly one shard and that no shard holds a key the manifest doesn't list."""
    report = VerifyReport()
    shards = read_shards(root)
    on_disk = set(shard_names(root))
    for orphan in sorted(on_disk - set(shards)):
        report.faults.append(f"{orphan}: tar without an index entry (sidecar)")
    seen: dict[str, list[str]] = {}
    for name, info in sorted(shards.items()):
        keys, faults = verify_shard(root, info, frames)
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
