"""`discomv takedown KEY...`: remove videos (or single clips) from the shards and mark them in the
manifests, so no later run brings them back. Only the affected shards are rewritten."""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from pipeline.manifest import ManifestStore
from pipeline.storage import Root
from pipeline.webds.index import (
    ShardRoot,
    read_shards,
    sidecar_name,
    sidecar_path,
    write_index,
    write_sidecar,
)
from pipeline.webds.sample import split_member
from pipeline.webds.verify import open_shard
from pipeline.webds.writer import TarShardWriter


def matches(clip_key: str, keys: set[str]) -> bool:
    """A clip matches its own key or its video's (`{video}_{NNN}`)."""
    return clip_key in keys or clip_key.rsplit("_", 1)[0] in keys


def remove_from_shards(root: ShardRoot, keys: set[str]) -> dict[str, list[str]]:
    """Rewrite each shard holding a matching sample without it. Returns {shard: removed keys}.

    The new tar replaces the old one before its sidecar does: a kill in between leaves a sidecar
    that still lists the removed keys, so running the takedown again finishes the job. Remotely the
    new tar is written locally and uploaded whole over the old key; a shard left empty loses its
    sidecar first, then its tar.
    """
    import tarfile


    shards = read_shards(root, clean=True)
    removed: dict[str, list[str]] = {}
    for name, info in sorted(shards.items()):
        gone = [k for k in info.keys if matches(k, keys)]
        if not gone:
            continue
        samples: dict[str, dict[str, bytes]] = {}
        with open_shard(root, name) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                key, ext = split_member(member.name)
                if not matches(key, keys):
                    samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        if not samples:
            if isinstance(root, Root):
                root.remove(sidecar_name(name))
                root.remove(name)
            else:
                (root / name).unlink()
                sidecar_path(root, name).unlink()
            del shards[name]
        elif isinstance(root, Root):
            with tempfile.TemporaryDirectory(prefix="discomv-takedown-") as staging:
                rewrite(Path(staging) / (name + ".tmp"), samples, info)
                root.publish_file(Path(staging) / (name + ".tmp"), name)
            write_sidecar(root, info)
        else:
            rewrite(root / (name + ".tmp"), samples, info)
            os.replace(root / (name + ".tmp"), root / name)
            write_sidecar(root, info)
        removed[name] = gone
    write_index(root, shards)
    return removed


def rewrite(tmp: Path, samples: dict[str, dict[str, bytes]], info) -> None:
    """The samples as a new tar at `tmp`; `info` gets its keys, size and sha256."""
    with TarShardWriter(tmp) as writer:  # an error removes the temp file
        for sample in samples.values():
            writer.write(sample)
        info.keys = list(samples)
        info.bytes, info.sha256 = writer.close()


def mark_in_manifests(store: ManifestStore, keys: set[str], stages: list[str]) -> int:
    """Append a `dropped: takedown` row (same stage version and params) for every matching key of
    every stage, so pending computations never pick them up again. Returns rows written."""
    now = datetime.now(timezone.utc)
    written = 0
    for name in stages:
        latest = store.latest(name)
        if latest is None:
            continue
        rows = [r for r in latest.to_pylist() if matches(r["key"], keys) and r["status"] != "dropped"]
        for row in rows:
            row.update(status="dropped", reason=f"takedown: requested {now:%Y-%m-%d}", finished_at=now, run_id="takedown")
        store.append(name, latest.schema, rows)
        written += len(rows)
    return written
