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
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from test_resume import kill_group
from test_shards import clip_rows

from pipeline import storage
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
    check_manifest_on_a_bucket(s3_server.bucket("manifest-basic") + "/manifests", objects)


def check_manifest_on_a_bucket(root: str, objects: Any) -> None:
    """Appends, merges (16 parts of a level make one of the next), latest rows and pending keys
    through duckdb reading the bucket via the registered fsspec filesystem, compaction, temp keys."""
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
    assert all(p.startswith(f"{root}/s/part-") for p in store.parts("s"))
    assert list(store.stages()) == ["s"]
    assert not [o for o in objects(root) if o.endswith(".tmp")], "parts go straight to their key"
    # a temp key a killed writer left is invisible to readers and removed by compaction
    fs, key = storage.fs_of(f"{root}/s/part-99999999999999999999-deadbeef.parquet.tmp")
    fs.pipe_file(key, b"half a part")
    assert store.read("s").num_rows == 3 + MERGE_FANIN
    assert store.compact("s") == (3, 2 + MERGE_FANIN)
    assert [o.rsplit("/", 1)[-1].endswith("-L9.parquet") for o in objects(root)] == [True]
    assert ManifestStore(root).latest("s").num_rows == 2 + MERGE_FANIN
    assert ManifestStore(root).latest_rows("s")["a"]["score"] == 1.0


def shards_stage(shard_root: str, manifest_root: str, **options) -> Shards:
    stage = Shards(ShardsConfig(**options), RunConfig(shard_root=shard_root, manifest_root=manifest_root))
    stage.setup()
    return stage


def test_shards_on_a_bucket_verify_takedown_and_readers(s3_server, tmp_path: Path):
    root, rows, results = check_shards_on_a_bucket(s3_server.bucket("shards-basic") + "/built/shards", objects, tmp_path)
    # takedown marks the video dropped in the manifest, on the bucket too
    store = ManifestStore(s3_server.bucket("shards-basic-m") + "/m")
    now = datetime.now(timezone.utc)
    store.append("shards", full_schema(Shards.schema), [
        {"key": r.key, "status": "ok", "reason": "", "stage_version": "1", "params_hash": "p", "weights": "none",
         "run_id": "r", "finished_at": now, "elapsed_s": 0.0, "node": "n", **r.metrics} for r in results])
    assert mark_in_manifests(store, {"yt_vid00000003"}, ["shards"]) == 3
    assert verify(root, set(store.ok_keys("shards"))).ok


def check_shards_on_a_bucket(url: str, objects: Any, tmp_path: Path) -> tuple[Any, list[dict], list[Any]]:
    """Shards written to the bucket: whole, found again by a re-run, verified (a corrupted object
    caught), read unmodified by HF datasets and the trainer, and taken down shard by shard.
    Returns (shard root, clip rows, results)."""
    rows = clip_rows(tmp_path / "art")
    results = shards_stage(url, str(tmp_path / "m"), max_samples=10).process(rows)
    assert [r.status for r in results] == ["ok"] * len(rows)
    names = [o.rsplit("/", 1)[-1] for o in objects(url)]
    assert "index.parquet" in names and not [n for n in names if n.endswith(".tmp")]
    root = shard_root(url)
    shards = read_shards(root)
    assert sorted(k for info in shards.values() for k in info.keys) == sorted(r["key"] for r in rows)
    report = verify(root, {r["key"] for r in rows})
    assert report.ok and report.samples == len(rows), report.faults
    assert shards_stage(url, str(tmp_path / "m"), max_samples=10).process(rows[:5])
    assert len(read_shards(root)) == len(shards), "a re-run finds the finished samples"

    # HF datasets (its own fsspec resolution of the URL) and the trainer read the shards unmodified
    from datasets import load_dataset

    tars = [f"{url}/{name}" for name in sorted(shards)]
    ds = load_dataset("webdataset", data_files={"s": tars}, split="s", cache_dir=str(tmp_path / "hf"))
    assert sorted(ds["__key__"]) == sorted(r["key"] for r in rows)
    first = next(s for s in ds if s["__key__"] == rows[0]["key"])
    assert np.array_equal(np.asarray(first["tokens.npy"]), np.load(rows[0]["tokens_path"]))
    assert sum(len(list_shards(url, split)) for split in ("train", "val", "test")) == len(shards)

    fs, victim = storage.fs_of(f"{url}/{sorted(shards)[0]}")
    data = bytearray(fs.cat_file(victim))
    data[2000] ^= 0xFF
    fs.pipe_file(victim, bytes(data))
    assert any("sha256" in f for f in verify(root).faults), "a corrupted object is caught"
    data[2000] ^= 0xFF
    fs.pipe_file(victim, bytes(data))
    assert verify(root).ok

    # takedown rewrites only the shards holding the video
    before = {info.shard: info.sha256 for info in read_shards(root).values()}
    removed = remove_from_shards(root, {"yt_vid00000003"})
    assert sorted(k for keys in removed.values() for k in keys) == [f"yt_vid00000003_{c:03d}" for c in range(3)]
    after = read_shards(root)
    assert len({k for info in after.values() for k in info.keys}) == len(rows) - 3
    assert all(after[n].sha256 == before[n] for n in before if n not in removed)
    assert verify(root).ok
    return root, rows, results


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
    check_kill_mid_shard_write(s3_server.bucket("shards-kill") + "/shards", tmp_path)


def check_kill_mid_shard_write(url: str, tmp_path: Path) -> None:
    """SIGKILL a shard writer part-way: no torn tar under a final name; a re-run writes each clip once."""
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


APPENDER = """
import sys
from datetime import datetime, timezone
import pyarrow as pa
from pipeline.manifest import ManifestStore, full_schema
store = ManifestStore(sys.argv[1])
schema = full_schema(pa.schema([("score", pa.float64())]))
for i in range(10_000):
    now = datetime.now(timezone.utc)
    store.append("s", schema, [{"key": f"k{i:05d}-{j}", "status": "ok", "reason": "", "stage_version": "1",
                                "params_hash": "p", "weights": "none", "run_id": "r", "finished_at": now,
                                "elapsed_s": 0.0, "node": "n", "score": float(i)} for j in range(4)])
    print(i, flush=True)
"""


def test_kill_mid_manifest_append_on_a_bucket_leaves_no_torn_part(s3_server):
    check_kill_mid_manifest_append(s3_server.bucket("manifest-kill") + "/m", objects)


def check_kill_mid_manifest_append(root: str, objects: Any) -> None:
    """SIGKILL a writer appending (and merging: 16 appends make a merge) at several points: every part
    under a final name is whole, rows are only ever duplicated (a kill mid-merge), never lost, and
    appends after the kill go on from there."""
    acknowledged = 0
    for target, extra_s in ((3, 0.05), (MERGE_FANIN + 4, 0.15), (2 * MERGE_FANIN - 1, 0.0)):
        proc = subprocess.Popen([sys.executable, "-c", APPENDER, root], stdout=subprocess.PIPE, start_new_session=True)
        done = 0
        while done < target and proc.stdout.readline():  # appends it has acknowledged (EOF: it died)
            done += 1
        time.sleep(extra_s)  # the next append is under way (after the third target: the one that merges)
        kill_group(proc)
        acknowledged = max(acknowledged, done + len(proc.stdout.read().split()))
        store = ManifestStore(root)
        for part in store.parts("s"):  # every part under a final name reads whole
            assert store._parquet(part).read().num_rows % 4 == 0
        keys = store.latest("s").column("key").to_pylist()
        assert len(keys) == len(set(keys))
        assert acknowledged * 4 <= len(keys), "an acknowledged append was lost"
    assert acknowledged > MERGE_FANIN, "the kills must land after merges have run"
    store = ManifestStore(root)
    store.compact("s")
    assert not [o for o in objects(root) if o.endswith(".tmp")]


def test_a_media_root_on_a_bucket_is_accepted_and_storage_options_are_checked():
    from pipeline.options import ConfigError
    from stages import load_config_dict

    cfg = load_config_dict({"run": {"media_root": "s3://bucket/media", "media_cache_gb": 2}})
    assert cfg.run.media_root == "s3://bucket/media" and cfg.run.media_cache_gb == 2.0
    with pytest.raises(ConfigError, match="run.media_cache_gb"):
        load_config_dict({"run": {"media_root": "s3://bucket/media", "media_cache_gb": 0}})
    cfg = load_config_dict({"run": {"manifest_root": "s3://bucket/m", "storage_options": {"endpoint_url": "http://x"}}})
    assert cfg.run.storage_options == {"endpoint_url": "http://x"}
    with pytest.raises(ConfigError, match="run.storage_options"):
        load_config_dict({"run": {"storage_options": "endpoint_url=http://x"}})
    load_config_dict({})  # and back to none, for the rest of the session


def test_media_on_a_bucket_are_published_whole_and_read_through_the_node_cache(s3_server, tmp_path: Path):
    check_media_round_trip(s3_server.bucket("media"), objects, tmp_path)


def check_media_round_trip(bucket: str, objects: Any, tmp_path: Path) -> None:
    """Written locally then published (no temp key, no scratch left, the file kept in this node's
    cache); read on another node (an empty cache) through one fetch; removed through storage, as
    the janitor does. `objects(url)`: the keys under a URL (the backend's own client)."""
    from pipeline import janitor, storage
    from pipeline.media.files import write_npy
    from pipeline.media.staging import MediaStore

    scheme, name = bucket.split("://")
    here = MediaStore(f"{bucket}/media", str(tmp_path / "here"), 1.0)
    array = np.arange(2000, dtype=np.int16).reshape(4, 500)
    with here.writing("tokens", "k_000.npy", cache=True) as partial:
        write_npy(partial, array)
    uri = here.uri("tokens", "k_000.npy")
    assert uri == f"{scheme}://{name}/media/tokens/k_000.npy" and objects(bucket) == ["media/media/tokens/k_000.npy"]
    assert not list((tmp_path / "here" / "scratch").rglob("*.*")), "the scratch file went into the cache"
    assert here.cache.used_bytes() == storage.file_size(uri)
    with pytest.raises(RuntimeError):
        with here.writing("tokens", "k_001.npy") as partial:
            partial.write_bytes(b"half an array")
            raise RuntimeError("killed mid-write")
    assert objects(bucket) == ["media/media/tokens/k_000.npy"], "a failed write publishes nothing"

    there = MediaStore(f"{bucket}/media", str(tmp_path / "there"), 1.0)
    assert there.is_file(uri) and not there.is_file(here.uri("tokens", "k_001.npy"))
    for _ in range(2):
        with there.local(uri) as path:
            assert path.is_relative_to(tmp_path / "there") and np.array_equal(np.load(path), array)
    assert len(list(there.cache.objects.glob("*.npy"))) == 1
    assert there.read_bytes(uri) == (tmp_path / "there" / "objects").joinpath(path.name).read_bytes()
    with pytest.raises(FileNotFoundError):
        with there.local(here.uri("tokens", "missing.npy")):
            pass
    assert janitor._size(uri) == array.nbytes + 128
    storage.remove_file(uri)
    storage.remove_file(uri)  # gone already: nothing to do
    assert objects(bucket) == [] and janitor._size(uri) is None


E2E_N = 12


def discomv(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.tools.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(*args: str, timeout: float = 900) -> str:
    proc = discomv(*args)
    out = proc.communicate(timeout=timeout)[0].decode()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_pipeline_with_every_root_on_a_bucket_survives_a_kill(s3_server, tmp_path: Path):
    """`discomv run` with run.manifest_root, run.shard_root and run.media_root on the bucket: SIGKILLed part-way
    (once the shards stage has begun writing), then run to the end → every candidate in exactly one
    terminal state, every sharded clip in exactly one shard, verify clean; status, cost and audit read
    the bucket; the trainer streams the shards from it."""
    import yaml

    from pipeline.tools import synth
    from pipeline.tools.audit import audit_table
    from pipeline.tools.demo import SMALL_MODELS
    from pipeline.tools.localserver import LocalServer

    bucket = s3_server.bucket("e2e")
    names = synth.make_copies_corpus(tmp_path / "corpus", E2E_N, broken_every=6)
    with LocalServer(tmp_path / "corpus") as server:
        (tmp_path / "urls.txt").write_text("".join(f"{server.url}/{n}?n={i}\n" for i, n in enumerate(names)))
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({
            "run": {"manifest_root": f"{bucket}/manifests", "media_root": f"{bucket}/media",
                    "media_cache": str(tmp_path / "cache"), "shard_root": f"{bucket}/shards",
                    "weights": "random", "flush_rows": 2},
            "ingest": {"inputs": [str(tmp_path / "urls.txt")]},
            **SMALL_MODELS,
            "download": {"allow_private_hosts": True, "concurrency": 2, "retries": 1, "backoff_s": 0.05},
            "clips": {"max_clips": 2},
            "beats": {"frame_size": "128x72"},
            "shards": {"max_samples": 3},
        }))
        proc = discomv("run", "-c", str(config), "--no-progress")
        shards = shard_root(f"{bucket}/shards")
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline and not [n for n in shards.names() if n.endswith(".tar")]:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the kill: " + proc.communicate()[0].decode()[-3000:]
        kill_group(proc)
        finish("run", "-c", str(config), "--no-progress")

    store = ManifestStore(f"{bucket}/manifests")
    audit = audit_table(store).to_pylist()
    assert Counter(Counter(r["key"] for r in audit).values()) == {1: E2E_N}, "every candidate in exactly one row"
    assert not [r for r in audit if r["terminal"].startswith("pending")]
    for stage in store.stages():
        for part in store.parts(stage):
            assert store._parquet(part).metadata.num_rows > 0
    sharded = {r["key"] for r in store.latest("shards").to_pylist() if r["status"] == "ok"}
    in_shards = Counter(k for info in read_shards(shards).values() for k in info.keys)
    assert sharded and set(in_shards) == sharded and set(in_shards.values()) == {1}
    assert not [o for o in objects(bucket) if o.endswith(".tmp")]
    assert "OK" in finish("verify", "-c", str(config))
    status = finish("status", "-c", str(config))
    assert "s3://e2e/manifests" in status and "shards" in status
    assert "testing-secret" not in status
    finish("cost", "-c", str(config))
    finish("audit", "-c", str(config), "--out", str(tmp_path / "audit.parquet"))
    runs = tmp_path / "runs"
    out = finish("train", "--shards", f"{bucket}/shards", "--config", "tiny", "--steps", "3", "--out", str(runs),
                 "--set", "data.batch_size=2", "--set", "eval_interval=2")
    assert (runs / "log.csv").is_file(), out[-2000:]


def shard_samples(url: str) -> dict[str, dict]:
    """Every shard sample's members by key, from a folder or a bucket (test_stream.samples' view:
    bytes, the provenance JSON without what differs between runs)."""
    import tarfile

    from test_stream import _without_volatile

    root = shard_root(url)
    out: dict[str, dict] = {}
    for info in read_shards(root).values():
        opened = open(root / info.shard, "rb") if isinstance(root, Path) else root.open(info.shard)
        with opened as f, tarfile.open(fileobj=f) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                out.setdefault(key, {})[ext] = _without_volatile(json.loads(data)) if ext == "json" else data
    return out


@pytest.mark.slow
def test_all_three_roots_on_a_bucket_give_the_shards_of_a_local_run(s3_server, tmp_path: Path):
    """`discomv run` with run.media_root, run.manifest_root and run.shard_root on the bucket ends with
    the same shard samples as the same run on local disk; the manifests name media by their s3://
    URIs, nothing is written under a local media folder, the node cache stays within its bound
    (beside files in use) and the janitor removes the media no later stage needs from the bucket,
    recorded as on disk."""
    import yaml
    from test_stream import FAST, same

    from pipeline.media.cache import NodeCache
    from pipeline.tools import synth
    from pipeline.tools.localserver import LocalServer

    bucket = s3_server.bucket("three")
    names = synth.make_copies_corpus(tmp_path / "corpus", 6, broken_every=6)
    cache_gb = 0.0015  # under the run's videos and stems (~3.5 MB): the cache must evict during the run
    roots = {
        "local": {"manifest_root": str(tmp_path / "local" / "manifests"), "media_root": str(tmp_path / "local" / "media"),
                  "shard_root": str(tmp_path / "local" / "shards")},
        "bucket": {"manifest_root": f"{bucket}/manifests", "media_root": f"{bucket}/media",
                   "shard_root": f"{bucket}/shards", "media_cache": str(tmp_path / "cache"),
                   "media_cache_gb": cache_gb},
    }
    with LocalServer(tmp_path / "corpus") as server:
        (tmp_path / "urls.txt").write_text("".join(f"{server.url}/{n}?n={i}\n" for i, n in enumerate(names)))
        for name, run_roots in roots.items():
            config = tmp_path / f"{name}.yaml"
            config.write_text(yaml.safe_dump({"run": {**run_roots, "weights": "random", "flush_rows": 2},
                                              "ingest": {"inputs": [str(tmp_path / "urls.txt")]}, **FAST}))
            finish("run", "-c", str(config), "--no-progress")

    local, remote = shard_samples(roots["local"]["shard_root"]), shard_samples(roots["bucket"]["shard_root"])
    assert len(local) >= 2 and local.keys() == remote.keys()
    for key in local:
        assert local[key].keys() == remote[key].keys()
        assert same(local[key].pop("json"), remote[key].pop("json")), key
        assert local[key] == remote[key], key  # tokens, hiera and beat arrays: the same bytes

    store = ManifestStore(f"{bucket}/manifests")
    paths = {column: [r[column] for r in store.latest(stage).to_pylist() if r["status"] == "ok"]
             for stage, column in [("download", "video_path"), ("separate", "instrumental32k_path"),
                                   ("beats", "beats_path"), ("tokens", "tokens_path"), ("features", "features_path")]}
    for column, values in paths.items():
        kind = {"video_path": "video", "instrumental32k_path": "instrumental32k"}.get(column, column[:-5])
        assert values and all(v.startswith(f"{bucket}/media/{kind}/") for v in values), (column, values[:2])
    present = set(objects(bucket))
    assert {p.split("://", 1)[1] for p in paths["tokens_path"] + paths["features_path"]} <= present
    removed = [p for r in store.latest("media").to_pylist() for p in r["removed"]]
    assert {p.split("://", 1)[1] for p in paths["video_path"]} <= {p.split("://", 1)[1] for p in removed}
    assert removed and all(p.startswith(f"{bucket}/media/") and p.split("://", 1)[1] not in present for p in removed)
    assert not [o for o in present if o.endswith((".tmp", ".part"))]
    assert not Path("s3:").exists(), "a URI taken for a local path"
    cache = NodeCache(tmp_path / "cache", int(cache_gb * 1e9))
    sizes = [p.stat().st_size for p in cache.objects.iterdir() if not p.name.endswith(".lock")]
    assert sizes and not [p for p in cache.objects.iterdir() if p.name.endswith(".fetch")]
    assert sum(sizes) <= cache.max_bytes + max(sizes), "within the bound, beside the file last in use"
    assert not [p for p in (tmp_path / "cache" / "scratch").rglob("*") if p.is_file()], "scratch emptied"
