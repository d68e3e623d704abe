"""The streaming `discomv run` (pipeline/stream.py): the same outcome as stage after stage, media
removed once nothing needs them (and kept where run.keep_media says), and a plan that enters each row
at the first stage it is pending at."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipeline.manifest import ManifestStore, full_schema
from pipeline.plan import plan_stream
from pipeline.runner import stage_params_hash
from pipeline.tools import synth
from pipeline.tools.demo import SMALL_MODELS
from pipeline.tools.localserver import LocalServer
from pipeline.webds.index import read_shards
from stages import STAGES

FAST = {
    **SMALL_MODELS,
    "download": {"allow_private_hosts": True, "concurrency": 2, "retries": 1, "backoff_s": 0.05},
    "clips": {"max_clips": 2},
    "beats": {"frame_size": "128x72"},
    "shards": {"max_samples": 4},
}
VOLATILE = {"run_id", "finished_at", "elapsed_s", "node"}  # differ between any two runs


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stream_media")
    names = synth.make_copies_corpus(root, 10, broken_every=5)
    with LocalServer(root) as server:
        yield [f"{server.url}/{name}?n={i}" for i, name in enumerate(names)]


def run(folder: Path, urls: list[str], stages: dict | None = None, **run_options) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "urls.txt").write_text("\n".join(urls) + "\n")
    raw = {"run": {"manifest_root": str(folder / "manifests"), "media_root": str(folder / "media"),
                   "shard_root": str(folder / "shards"), "weights": "random", **run_options},
           "ingest": {"inputs": [str(folder / "urls.txt")]}, **FAST}
    for name, options in (stages or {}).items():
        raw[name] = {**raw.get(name, {}), **options}
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "pipeline.tools.cli", "run", "-c", str(folder / "config.yaml"),
                           "--no-progress"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def outcomes(folder: Path) -> dict[str, dict[str, tuple[str, str]]]:
    store = ManifestStore(folder / "manifests")
    return {name: {r["key"]: (r["status"], r["reason"]) for r in store.latest(name).to_pylist()}
            for name in STAGES if store.latest(name) is not None}


def samples(folder: Path) -> dict[str, dict]:
    """Every shard sample's members by key (bytes; the provenance JSON parsed, without what differs
    between runs)."""
    out = {}
    for info in read_shards(folder / "shards").values():
        with tarfile.open(folder / "shards" / info.shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if ext == "json":
                    data = _without_volatile(json.loads(data))
                out.setdefault(key, {})[ext] = data
    return out


def _without_volatile(value):
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def same(a, b) -> bool:
    """Equal, floats within 1e-6 relative: a model's float sums differ in the last bits with its
    thread count (Demucs' vocal ratios by ~2e-9 between 1 and 2 torch threads)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def both(urls: list[str], tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("stream_runs")
    logs = {executor: run(base / executor, urls, executor=executor) for executor in ("stages", "stream")}
    return base, logs


def test_streaming_gives_the_stage_after_stage_outcome(both):
    base, logs = both
    assert "stream: download" in logs["stream"] and "rows enter" in logs["stream"]
    stages, stream = outcomes(base / "stages"), outcomes(base / "stream")
    assert stream == stages
    assert sum(s == ("ok", "") for s in stream["shards"].values()) >= 4, "most candidates reach the shards"
    assert same(samples(base / "stream"), samples(base / "stages")), "same samples, byte for byte but run ids and times"
    assert "busiest stage of this streaming run" in logs["stream"]


def test_media_no_later_stage_needs_is_removed_and_recorded(both):
    base, logs = both
    store = ManifestStore(base / "stream" / "manifests")
    removed = {r["key"]: r for r in store.latest("media").to_pylist()}
    filtered = {r["key"]: r for r in store.latest("filter").to_pylist()}
    dropped = {k for k, r in filtered.items() if r["status"] == "dropped"}
    sharded_videos = {r["video_key"] for r in store.latest("clips").to_pylist()} - dropped
    assert dropped and sharded_videos
    assert set(removed) == dropped | sharded_videos
    for key in dropped:
        assert removed[key]["reason"] == "dropped at filter" and removed[key]["removed_kinds"] == ["video"]
    for key in sharded_videos:
        assert removed[key]["reason"] == "sharded" and removed[key]["removed_kinds"] == ["stems", "video"]
    for row in removed.values():
        assert row["removed_bytes"] > 0 and not any(Path(p).exists() for p in row["removed"])
    kept = list((base / "stages" / "media" / "video").glob("*.mp4"))
    assert len(kept) == len(dropped | sharded_videos), "stage after stage removes nothing"
    assert not list((base / "stream" / "media" / "video").glob("*.mp4"))
    assert "media: removed" in logs["stream"]


def test_keep_media_keeps_what_it_names(urls: list[str], tmp_path: Path):
    run(tmp_path, urls[:4], keep_media=["video", "stems"])
    assert ManifestStore(tmp_path / "manifests").latest("media") is None
    assert len(list((tmp_path / "media" / "video").glob("*.mp4"))) == 4


MEDIA_FOLDERS = ("video", "instrumental", "instrumental32k")  # what download and separate make


def test_the_media_window_bounds_the_videos_on_disk(urls: list[str], tmp_path: Path):
    """Downloads from 127.0.0.1 outrun every later stage: without the window every video is on disk
    before the first is removed. Every batch one row and one download worker: the least window is 7
    videos (6 stages' batches between download and features, + the download worker), against 16
    candidates. A sampler counts the videos with media on disk (failed rows keep theirs: not counted)."""
    more = urls + [f"{u}&again={i}" for i, u in enumerate(urls[:6])]
    one = {"batch_size": 1}
    snapshots: list[set[str]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            snapshots.append({p.name.split(".")[0] for folder in MEDIA_FOLDERS
                              for p in (tmp_path / "media" / folder).glob("*") if p.is_file()})

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        logs = run(tmp_path, more, stages={"download": {"concurrency": 1}, **{n: one for n in (
            "filter", "separate", "clips", "beats", "tokens", "features")}})
    finally:
        stop.set()
        sampler.join()
    window = int(re.search(r"media window: at most (\d+) videos past download and not yet through features", logs)[1])
    peak, same_window = map(int, re.search(r"media window: at most (\d+) of (\d+) videos in flight", logs).groups())
    assert window == same_window == 7 and peak == window, "the window was full: it bound the run"
    store = ManifestStore(tmp_path / "manifests")
    failed = {r["key"] for name in STAGES if store.latest(name) is not None
              for r in store.latest(name).to_pylist() if r["status"] == "failed"}
    on_disk = max(len(s - failed) for s in snapshots)
    downloaded = sum(r["status"] == "ok" for r in store.latest("download").to_pylist())
    assert downloaded > window and 0 < on_disk <= window, (downloaded, on_disk, window)
    assert not any(s - failed for s in snapshots[-1:]), "all removed at the end"


def _rows(store: ManifestStore, stage, rows: list[dict]) -> None:
    phash = stage_params_hash(stage)
    store.append(stage.name, full_schema(stage.schema), [
        {"stage_version": stage.version, "params_hash": phash, "reason": "", **row} for row in rows])


def test_a_row_enters_at_the_first_stage_it_is_pending_at(tmp_path: Path, make_config):
    """Manifests as a killed run leaves them: each candidate and clip enters where it stopped, and the
    clips of a video that is redone at or before the fan-out enter with their video, not on their own."""
    cfg = make_config(tmp_path, [])
    names = ["download", "filter", "separate", "clips", "beats", "tokens"]
    stages = [STAGES[n](cfg.stage(n), cfg.run) for n in names]
    by = dict(zip(names, stages, strict=True))
    store = ManifestStore(cfg.run.manifest_root)
    ingest = STAGES["ingest"](cfg.stage("ingest"), cfg.run)
    _rows(store, ingest, [{"key": k, "status": "ok"} for k in ("v1", "v2", "v3", "v4", "v5")])
    _rows(store, by["download"], [{"key": k, "status": "ok"} for k in ("v1", "v2", "v3", "v5")])
    _rows(store, by["filter"], [{"key": "v1", "status": "ok"}, {"key": "v2", "status": "dropped"},
                                {"key": "v5", "status": "ok"}])
    _rows(store, by["separate"], [{"key": "v1", "status": "ok"}])
    _rows(store, by["clips"], [{"key": f"v1_c{i}", "status": "ok", "video_key": "v1"} for i in range(3)]
          + [{"key": "v5_c0", "status": "ok", "video_key": "v5"}])  # v5: clips of an older run, v5 not separated
    _rows(store, by["beats"], [{"key": "v1_c0", "status": "ok"}, {"key": "v1_c1", "status": "failed"}])
    plan = plan_stream(stages, store, cfg.registry, [stage_params_hash(s) for s in stages])
    entered = {}
    for k, rows in plan.windows():
        for row in rows:
            entered.setdefault(names[k], set()).add(row["key"])
    assert entered == {"download": {"v4"}, "filter": {"v3"}, "separate": {"v5"}, "beats": {"v1_c2"},
                       "tokens": {"v1_c0"}}
    assert plan.entering == [1, 1, 1, 0, 1, 1]
    assert plan.totals[:2] == [5, 4] and plan.pending[:2] == [1, 1]


def test_the_entry_rows_carry_every_upstream_column(tmp_path: Path, make_config):
    cfg = make_config(tmp_path, [])
    stages = [STAGES[n](cfg.stage(n), cfg.run) for n in ("filter", "separate")]
    store = ManifestStore(cfg.run.manifest_root)
    ingest, download = (STAGES[n](cfg.stage(n), cfg.run) for n in ("ingest", "download"))
    _rows(store, ingest, [{"key": "v1", "status": "ok", "title": "a song"}])
    _rows(store, download, [{"key": "v1", "status": "ok", "video_path": "/m/v1.mp4", "file_bytes": 7}])
    plan = plan_stream(stages, store, cfg.registry, [stage_params_hash(s) for s in stages])
    [(k, [row])] = list(plan.windows())
    assert k == 0 and row["title"] == "a song" and row["video_path"] == "/m/v1.mp4" and row["file_bytes"] == 7
    assert pa.types.is_string(full_schema(download.schema).field("video_path").type)


def test_bad_keep_media_fails_fast_naming_the_key(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"keep_media": ["videos"]}}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.tools.cli", "status", "-c", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "run.keep_media" in proc.stderr and "did you mean 'video'" in proc.stderr
