"""pipeline/storage.py on a backend without atomic uploads (fsspec's memory://): a file is published
under a temp key and copied, so a failed upload or copy never shows under the final name; the
manifest store works the same on it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.manifest import ManifestStore, full_schema

SCHEMA = full_schema(pa.schema([("score", pa.float64())]))


def test_roots_tell_local_from_remote():
    assert storage.is_remote("s3://b/p") and storage.is_remote("memory://x")
    assert not storage.is_remote("manifests") and not storage.is_remote("file:///tmp/m")
    assert storage.local_path("file:///tmp/m") == Path("/tmp/m")


def test_publish_goes_through_a_temp_key_and_a_failed_copy_leaves_nothing(tmp_path: Path, monkeypatch):
    root = storage.open_root("memory://publish-test/root")
    assert root.protocol not in storage.ATOMIC_UPLOAD
    (tmp_path / "f").write_bytes(b"whole")
    root.publish_file(tmp_path / "f", "a.bin")
    assert root.read_bytes("a.bin") == b"whole" and root.names() == ["a.bin"]

    copies = []
    monkeypatch.setattr(root.fs, "copy", lambda src, dst, **kw: (copies.append((src, dst)), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        root.publish_bytes(b"never", "b.bin")
    assert copies == [(root.key("b.bin.tmp"), root.key("b.bin"))], "the copy is from the temp key"
    assert root.names() == ["a.bin"], "neither the final key nor the temp key is left"


def test_manifest_store_on_a_backend_without_atomic_uploads():
    store = ManifestStore("memory://manifest-test/m")
    now = pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py()
    rows = [{"key": k, "status": "ok", "reason": "", "stage_version": "1", "params_hash": "p", "weights": "none",
             "run_id": "r", "finished_at": now, "elapsed_s": 0.0, "node": "n", "score": 1.0} for k in "abc"]
    store.append("s", SCHEMA, rows[:2])
    store.append("s", SCHEMA, rows[2:])
    store.remote.fs.pipe_file(store.remote.key("s", "part-9-torn.parquet.tmp"), b"half")
    assert store.ok_keys("s") == ["a", "b", "c"]
    assert store.compact("s") == (2, 3)
    assert store.remote.names("s") == [store.parts("s")[0].rsplit("/", 1)[-1]]
