"""Roots on object storage: a real S3 API (moto's server on 127.0.0.1, started by the `s3_server`
fixture) through the real clients (s3fs, boto3). Manifests, shards, verify/takedown/audit and the
trainer on `s3://` URIs keep the guarantees they have on local disk (docs/storage.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
from test_resume import kill_group
from test_shards import clip_rows

from pipeline.manifest import MERGE_FANIN, ManifestStore, full_schema
from pipeline.options import RunConfig
from pipeline.webds.index import read_shards, shard_root
from pipeline.webds.takedown import mark_in_manifests, remove_from_shards
from pipeline.webds.verify import verify
from stages.shards import Shards, ShardsConfig
from trainer.data import list_shards

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


def shards_stage(shard_root: str, manifest_root: str, **options) -> Shards:
    stage = Shards(ShardsConfig(**options), RunConfig(shard_root=shard_root, manifest_root=manifest_root))
    stage.setup()
    return stage


def test_shards_on_a_bucket_verify_takedown_and_readers(s3_server, tmp_path: Path):
    url = s3_server.bucket("shards-basic") + "/built/shards"
    rows = clip_rows(tmp_path / "art")
    stage = shards_stage(url, str(tmp_path / "m"), max_samples=10)
    results = stage.process(rows)
    assert [r.status for r in results] == ["ok"] * len(rows)
    names = [o.rsplit("/", 1)[-1] for o in objects(url)]
    assert "index.parquet" in names and not [n for n in names if n.endswith(".tmp")]
    root = shard_root(url)
    shards = read_shards(root)
    assert sorted(k for info in shards.values() for k in info.keys) == sorted(r["key"] for r in rows)
    report = verify(root, {r["key"] for r in rows})
    assert report.ok and report.samples == len(rows), report.faults
    assert shards_stage(url, str(tmp_path / "m"), max_samples=10).process(rows[:5]) and len(read_shards(root)) == len(shards)

    # HF datasets and webdataset (through the trainer's fsspec opener) read the shards unmodified
    from datasets import load_dataset

    tars = [f"{url}/{name}" for name in sorted(shards)]
    ds = load_dataset("webdataset", data_files={"s": tars}, split="s", cache_dir=str(tmp_path / "hf"))
    assert sorted(ds["__key__"]) == sorted(r["key"] for r in rows)
    first = next(s for s in ds if s["__key__"] == rows[0]["key"])
    assert np.array_equal(np.asarray(first["tokens.npy"]), np.load(rows[0]["tokens_path"]))
    assert sum(len(list_shards(url, split)) for split in ("train", "val", "test")) == len(shards)

    # a corrupted object is caught, as on disk
    import s3fs

    fs = s3fs.S3FileSystem()
    victim = sorted(shards)[0]
    data = bytearray(fs.cat_file(f"{url}/{victim}"))
    data[2000] ^= 0xFF
    fs.pipe_file(f"{url}/{victim}", bytes(data))
    assert any("sha256" in f for f in verify(root).faults)
    fs.pipe_file(f"{url}/{victim}", bytes(data[:2000]) + bytes([data[2000] ^ 0xFF]) + bytes(data[2001:]))
    assert verify(root).ok

    # takedown rewrites only the shards holding the video
    store = ManifestStore(s3_server.bucket("shards-basic-m") + "/m")
    now = datetime.now(timezone.utc)
    store.append("shards", full_schema(Shards.schema), [
        {"key": r.key, "status": "ok", "reason": "", "stage_version": "1", "params_hash": "p", "weights": "none",
         "run_id": "r", "finished_at": now, "elapsed_s": 0.0, "node": "n", **r.metrics} for r in results])
    before = {info.shard: info.sha256 for info in read_shards(root).values()}
    removed = remove_from_shards(root, {"yt_vid00000003"})
    assert sorted(k for keys in removed.values() for k in keys) == [f"yt_vid00000003_{c:03d}" for c in range(3)]
    after = read_shards(root)
    assert len({k for info in after.values() for k in info.keys}) == len(rows) - 3
    assert all(after[n].sha256 == before[n] for n in before if n not in removed)
    assert mark_in_manifests(store, {"yt_vid00000003"}, ["shards"]) == 3
    assert verify(root, set(store.ok_keys("shards"))).ok


KILLED_WRITER = """
import json, sys
from pathlib import Path
from pipeline.options import RunConfig
from stages.shards import Shards, ShardsConfig
rows = json.loads(Path(sys.argv[1]).read_text())
stage = Shards(ShardsConfig(max_samples=2), RunConfig(shard_root=sys.argv[2], manifest_root=sys.argv[3]))
stage.setup()
stage.process(rows)
"""


def test_kill_mid_shard_write_on_a_bucket_then_rerun_gives_every_clip_once(s3_server, tmp_path: Path):
    url = s3_server.bucket("shards-kill") + "/shards"
    rows = clip_rows(tmp_path / "art", videos=30, clips=2)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    root = shard_root(url)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "rows.json"), url, str(tmp_path / "m")],
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len([n for n in root.names() if n.endswith(".tar")]) < 3:
        time.sleep(0.02)
    kill_group(proc)
    finished_before = len(read_shards(root))
    assert 2 <= finished_before < 30, "the kill must land part-way"
    import tarfile

    for name in root.names():  # whatever the kill left, nothing torn is under a final name
        if name.endswith(".tar"):
            with root.open(name) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                assert len(tar.getmembers()) == 2 * 6  # two samples of six members, every one whole
    stage = shards_stage(url, str(tmp_path / "m"), max_samples=2)
    results = stage.process(rows)  # the re-run: finds finished samples, writes the rest
    assert Counter(r.status for r in results) == {"ok": len(rows)}
    keys = Counter(k for info in read_shards(root).values() for k in info.keys)
    assert set(keys) == {r["key"] for r in rows} and set(keys.values()) == {1}
    assert not [n for n in root.names() if n.endswith(".tmp")]
    assert verify(root, {r["key"] for r in rows}).ok
