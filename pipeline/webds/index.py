"""The shard root's bookkeeping, shared by the shards stage and the `verify`/`takedown` commands.

Each finished shard `{split}-{NNNNNN}.tar` has a sidecar `{split}-{NNNNNN}.json` (keys, sample
count, bytes, sha256). The sidecar is renamed into place *before* its tar, so a tar under a final
name always has a sidecar; a sidecar without its tar is the trace of a kill between the two renames
and is removed. `index.parquet` (and `wids-{split}.json`) are rebuilt from the sidecars.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_NAME = re.compile(r"^(train|val|test)-(\d{6})\.tar$")


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
    data = json.dumps({"shard": info.shard, "split": info.split, "keys": info.keys,
                       "bytes": info.bytes, "sha256": info.sha256})
    replace_with(sidecar_path(root, info.shard), lambda tmp: tmp.write_text(data))


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
    replace_with(path, lambda tmp: pq.write_table(table, tmp))
    for split in {s.split for s in infos}:
        wids = {
            "__kind__": "wids-shard-index-v1",
            "name": f"discomv-{split}",
            "wids_version": 1,
            "shardlist": [{"url": s.shard, "nsamples": s.num_samples} for s in infos if s.split == split],
        }
        replace_with(root / f"wids-{split}.json", lambda tmp, w=wids: tmp.write_text(json.dumps(w, indent=1)))
    return path


def replace_with(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` then rename over `path`; on any error the temp file is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
