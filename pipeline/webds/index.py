"""The shard root's bookkeeping, shared by the shards stage and the `verify`/`takedown` commands.

Each finished shard `{split}-{NNNNNN}.tar` has a sidecar `{split}-{NNNNNN}.json` (keys, sample
count, bytes, sha256). The sidecar is renamed into place *before* its tar, so a tar under a final
name always has a sidecar; a sidecar without its tar is the trace of a kill between the two renames
and is removed. `index.parquet` (and `wids-{split}.json`) are rebuilt from the sidecars.

On an object store (a `storage.Root`) rename is not atomic, so the order flips: the tar is uploaded
whole under its final key first (storage.Root.publish_file), its sidecar last; a shard is finished
when its sidecar is there, and a tar without a sidecar is the trace of a kill between the two
uploads and is removed.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import TMP_SUFFIX, Root, is_remote, local_path, open_root

ShardRoot = Path | Root  # a local folder, or a remote root (storage.open_root)

SHARD_NAME = re.compile(r"^(train|val|test)-(\d{6})\.tar$")
SIDECAR_NAME = re.compile(r"^(train|val|test)-(\d{6})\.json$")


def shard_root(url: str | Path) -> ShardRoot:
    """`run.shard_root` as a local folder or a remote root."""
    return open_root(url) if is_remote(url) else local_path(url)


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


def sidecar_name(shard: str) -> str:
    return shard.replace(".tar", ".json")


def sidecar_path(root: Path, shard: str) -> Path:
    return root / sidecar_name(shard)


def write_sidecar(root: ShardRoot, info: ShardInfo) -> None:
    data = json.dumps({"shard": info.shard, "split": info.split, "keys": info.keys,
                       "bytes": info.bytes, "sha256": info.sha256})
    if isinstance(root, Root):
        root.publish_bytes(data.encode(), sidecar_name(info.shard))
        return
    replace_with(sidecar_path(root, info.shard), lambda tmp: tmp.write_text(data))


def read_shards(root: ShardRoot, clean: bool = False) -> dict[str, ShardInfo]:
    """Finished shards by name. With `clean`, remove temp files and orphaned sidecars (remotely:
    temp keys and tars without a sidecar)."""
    if isinstance(root, Root):
        return _read_remote_shards(root, clean)
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


def _read_remote_shards(root: Root, clean: bool) -> dict[str, ShardInfo]:
    names = root.names()
    if clean:
        for name in names:
            if name.endswith(TMP_SUFFIX):
                root.remove(name)
    present = set(names)
    shards = {}
    for name in names:
        if SIDECAR_NAME.match(name) and name.replace(".json", ".tar") in present:
            data = json.loads(root.read_bytes(name))
            shards[data["shard"]] = ShardInfo(data["shard"], data["split"], data["keys"], data["bytes"], data["sha256"])
    if clean:
        for name in names:
            if SHARD_NAME.match(name) and name not in shards:  # killed between the tar and its sidecar
                root.remove(name)
            elif SIDECAR_NAME.match(name) and name.replace(".json", ".tar") not in present:
                root.remove(name)
    return shards


def shard_names(root: ShardRoot) -> list[str]:
    """Names of the tars under a final name, finished or not."""
    if isinstance(root, Root):
        return [n for n in root.names() if SHARD_NAME.match(n)]
    return sorted(p.name for p in root.glob("*.tar")) if root.is_dir() else []


def next_shard_number(root: ShardRoot, split: str) -> int:
    names = root.names() if isinstance(root, Root) else [p.name for p in root.glob(f"{split}-*")]
    numbers = [int(m.group(2)) for n in names if (m := SHARD_NAME.match(n.split(".tmp")[0])) and m.group(1) == split]
    return max(numbers, default=-1) + 1


def write_index(root: ShardRoot, shards: dict[str, ShardInfo]) -> Path | str:
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
    wids = {split: json.dumps({
        "__kind__": "wids-shard-index-v1",
        "name": f"discomv-{split}",
        "wids_version": 1,
        "shardlist": [{"url": s.shard, "nsamples": s.num_samples} for s in infos if s.split == split],
    }, indent=1) for split in {s.split for s in infos}}
    if isinstance(root, Root):
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        root.publish_bytes(buffer.getvalue(), "index.parquet")
        for split, text in wids.items():
            root.publish_bytes(text.encode(), f"wids-{split}.json")
        return root.url_of("index.parquet")
    path = root / "index.parquet"
    replace_with(path, lambda tmp: pq.write_table(table, tmp))
    for split, text in wids.items():
        replace_with(root / f"wids-{split}.json", lambda tmp, t=text: tmp.write_text(t))
    return path


def replace_with(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` then rename over `path`; on any error the temp file is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
