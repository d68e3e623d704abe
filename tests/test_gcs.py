"""Roots on Google Cloud Storage: a real GCS JSON API (gcp-storage-emulator on 127.0.0.1, started by
the `gcs_server` fixture) through the real client (gcsfs). Manifests, shards and media on `gs://`
URIs keep the guarantees they have on local disk and on S3 (docs/storage.md).

What the emulator lacks, and so what is not exercised here: cancelling a resumable upload session
(`DELETE` on the session URI answers 501), which gcsfs sends only when an upload fails part-way;
and the Storage Control gRPC API, which gcsfs's default client asks for each bucket's layout (the
fixture turns that off: pipeline/tools/gcsserver.py)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from test_s3 import (
    SCHEMA,
    check_kill_mid_manifest_append,
    check_kill_mid_shard_write,
    check_manifest_on_a_bucket,
    check_media_round_trip,
    check_shards_on_a_bucket,
    row,
    shards_stage,
)
from test_shards import clip_rows

from pipeline import storage
from pipeline.manifest import ManifestStore
from pipeline.webds.index import read_shards, shard_root
from pipeline.webds.verify import verify


def gcs():
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    fs.invalidate_cache()
    return fs


def objects(url: str) -> list[str]:
    return sorted(gcs().find(url))


def test_manifest_on_gs_appends_merges_and_compacts(gcs_server):
    check_manifest_on_a_bucket(gcs_server.bucket("manifest-basic") + "/manifests", objects)


def test_storage_options_reach_gcsfs_without_the_environment(gcs_server, monkeypatch):
    """`run.storage_options` alone (endpoint_url, token) is enough: no STORAGE_EMULATOR_HOST."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    options = {"endpoint_url": gcs_server.endpoint, "token": "anon", "project": "p"}
    root = storage.open_root(gcs_server.bucket("options") + "/m", options)
    assert root.protocol == "gs" and root.url == "gs://options/m" and root.fs._location == gcs_server.endpoint
    root.publish_bytes(b"x" * 10, "a.bin")
    assert root.names() == ["a.bin"] and root.read_bytes("a.bin") == b"x" * 10
    store = ManifestStore(root.url, storage_options=options)
    store.append("s", SCHEMA, [row("a")])
    assert store.ok_keys("s") == ["a"]


def test_gs_publishes_straight_to_the_final_key(gcs_server, tmp_path: Path, monkeypatch):
    """Both of gcsfs's upload paths (one request below 5 MiB; a resumable upload above) publish the
    whole file under its final name, with no temp key and no copy; publishing again replaces it."""
    root = storage.open_root(gcs_server.bucket("publish") + "/p")
    monkeypatch.setattr(root.fs, "copy", lambda *a, **k: pytest.fail("gs:// goes through a temp key and a copy"))
    small, big = os.urandom(100_000), os.urandom((6 << 20) + 123)
    for name, data in (("small.bin", small), ("big.bin", big)):
        (tmp_path / name).write_bytes(data)
        root.publish_file(tmp_path / name, name)
    root.publish_bytes(big, "bytes.bin")
    assert root.names() == ["big.bin", "bytes.bin", "small.bin"]
    assert root.read_bytes("small.bin") == small and root.read_bytes("big.bin") == big
    assert root.size("bytes.bin") == len(big) and root.read_bytes("bytes.bin") == big
    with root.open("big.bin", block_size=1 << 20) as f:  # ranged reads, as verify and the readers do
        f.seek(5 << 20)
        assert f.read(1000) == big[5 << 20:(5 << 20) + 1000]
    root.publish_bytes(small, "big.bin")
    assert root.read_bytes("big.bin") == small
    root.remove("big.bin")
    root.remove("big.bin")
    assert root.names() == ["bytes.bin", "small.bin"] and storage.file_size(root.url_of("big.bin")) is None


def test_shards_on_gs_verify_takedown_and_readers(gcs_server, tmp_path: Path):
    check_shards_on_a_bucket(gcs_server.bucket("shards-basic") + "/built/shards", objects, tmp_path)


def test_a_failed_shard_write_on_gs_leaves_no_partial_tar(gcs_server, tmp_path: Path, monkeypatch):
    """A write error part-way through a shard fails its rows and publishes nothing for it, even once
    the abandoned writer is garbage-collected (a gcsfs file streamed to the final key would be: its
    `discard()` before the first chunk keeps the buffer, and `__del__` uploads it; hence gs:// is not
    in storage.ATOMIC_UPLOAD); a re-run then completes."""
    import errno
    import gc

    from pipeline.webds.writer import TarShardWriter

    url = gcs_server.bucket("shards-fail") + "/shards"
    rows = clip_rows(tmp_path / "art")
    real, calls = TarShardWriter.write, [0]

    def failing_write(self, sample):
        calls[0] += 1
        if calls[0] == 15:  # five samples into the second shard
            raise OSError(errno.EIO, "injected write error")
        real(self, sample)

    monkeypatch.setattr(TarShardWriter, "write", failing_write)
    results = shards_stage(url, str(tmp_path / "m"), max_samples=10).process(rows)
    gc.collect()
    assert Counter(r.status for r in results)["failed"] > 0
    root = shard_root(url)
    tars = [n for n in root.names() if n.endswith(".tar")]
    assert tars == sorted(read_shards(root)) and verify(root).ok, "only finished shards, each whole"
    monkeypatch.setattr(TarShardWriter, "write", real)
    results = shards_stage(url, str(tmp_path / "m"), max_samples=10).process(rows)
    assert Counter(r.status for r in results) == {"ok": len(rows)}
    assert verify(root, {r["key"] for r in rows}).ok


def test_kill_mid_shard_write_on_gs_then_rerun_gives_every_clip_once(gcs_server, tmp_path: Path):
    """On gs:// each shard is staged locally and uploaded whole (storage.ATOMIC_UPLOAD), then its
    sidecar: a SIGKILL anywhere leaves no torn tar, and a re-run writes each clip exactly once."""
    check_kill_mid_shard_write(gcs_server.bucket("shards-kill") + "/shards", tmp_path)


def test_kill_mid_manifest_append_on_gs_leaves_no_torn_part(gcs_server):
    check_kill_mid_manifest_append(gcs_server.bucket("manifest-kill") + "/m", objects)


def test_media_on_gs_are_published_whole_and_read_through_the_node_cache(gcs_server, tmp_path: Path):
    check_media_round_trip(gcs_server.bucket("media"), objects, tmp_path)
