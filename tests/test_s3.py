"""Roots on object storage: a real S3 API (moto's server on 127.0.0.1, started by the `s3_server`
fixture) through the real clients (s3fs, boto3). Manifests, shards, verify/takedown/audit and the
trainer on `s3://` URIs keep the guarantees they have on local disk (docs/storage.md)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa

from pipeline.manifest import MERGE_FANIN, ManifestStore, full_schema

SCHEMA = full_schema(pa.schema([("score", pa.float64())]))
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(key: str, status: str = "ok", minutes: int = 0, score: float = 0.0) -> dict:
    return {"key": key, "status": status, "reason": "", "stage_version": "1", "params_hash": "p", "weights": "none",
            "run_id": "r", "finished_at": T0 + timedelta(minutes=minutes), "elapsed_s": 0.1, "node": "n",
            "score": score}


def objects(url: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return sorted(fs.find(url))


def test_manifest_on_a_bucket_appends_merges_and_compacts(s3_server):
    root = s3_server.bucket("manifest-basic") + "/manifests"
    store = ManifestStore(root)
    assert store.latest("s") is None and list(store.stages()) == []
    store.append("s", SCHEMA, [row("a", "failed", 0), row("b", "ok", 0)])
    store.append("s", SCHEMA, [row("a", "ok", 5, score=1.0)])
    latest = {r["key"]: r for r in store.latest("s").to_pylist()}
    assert latest["a"]["status"] == "ok" and latest["a"]["score"] == 1.0 and set(latest) == {"a", "b"}
    assert store.done_keys("s", "1", "p") == {"a", "b"} and store.ok_keys("s") == ["a", "b"]
    for i in range(MERGE_FANIN):  # 18 parts in all: 16 of level 0 merge into one of level 1
        store.append("s", SCHEMA, [row(f"k{i:02d}", minutes=i)])
    assert len(store.parts("s")) == 3 and store.read("s").num_rows == 3 + MERGE_FANIN
    assert list(store.stages()) == ["s"]
    # a temp key a killed writer left is invisible to readers and removed by compaction
    import s3fs

    s3fs.S3FileSystem().pipe_file(f"{root}/s/part-99999999999999999999-deadbeef.parquet.tmp", b"half a part")
    assert store.read("s").num_rows == 3 + MERGE_FANIN
    assert store.compact("s") == (3, 2 + MERGE_FANIN)
    assert [o.rsplit("/", 1)[-1].endswith("-L9.parquet") for o in objects(root)] == [True]
    assert ManifestStore(root).latest("s").num_rows == 2 + MERGE_FANIN
