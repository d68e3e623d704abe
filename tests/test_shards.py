"""Shards: written by the stage, read back by webdataset, wids and HF datasets unmodified; verify
catches corruption; a kill mid-write, or a full disk, then a re-run gives every clip once; takedown."""

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pipeline.manifest import ManifestStore, full_schema
from pipeline.options import RunConfig
from pipeline.webds import writer as shard_writer
from pipeline.webds.index import read_shards
from pipeline.webds.sample import ShardError
from pipeline.webds.takedown import mark_in_manifests, remove_from_shards
from pipeline.webds.verify import verify
from pipeline.webds.writer import FileMember, TarShardWriter, member_header
from stages.shards import Shards, ShardsConfig

ARTISTS = ["Ana", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]


def clip_rows(folder: Path, videos: int = 12, clips: int = 3) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for v in range(videos):
        for c in range(clips):
            key = f"yt_vid{v:08d}_{c:03d}"
            tokens, feats = folder / f"{key}.tokens.npy", folder / f"{key}.hiera.npy"
            np.save(tokens, rng.integers(0, 2048, (4, 500)).astype(np.int16))
            np.save(feats, rng.standard_normal((96, 64)).astype(np.float16))
            beats = (np.arange(500) % 25 == 0).astype(int).tolist()
            rows.append({
                "key": key, "video_key": key[:-4], "artist": ARTISTS[v % len(ARTISTS)], "title": "t ../../x",
                "url": f"https://example.org/{v}", "license": "cc-by", "start_s": 10.0 * c, "end_s": 10.0 * c + 10,
                "tokens_path": str(tokens), "features_path": str(feats), "music_beats": beats,
                "video_beats": beats, "beat_weights": [1.0 + b for b in beats],
                "upstream_weights": {"tokens": "random-init"},
            })
    return rows


def make_stage(tmp_path: Path, **shards) -> Shards:
    run = RunConfig(shard_root=str(tmp_path / "shards"), manifest_root=str(tmp_path / "m"))
    stage = Shards(ShardsConfig(**shards), run)
    stage.setup()
    return stage


@pytest.fixture
def written(tmp_path: Path):
    rows = clip_rows(tmp_path / "art")
    stage = make_stage(tmp_path, max_samples=10)
    results = stage.process(rows)
    return tmp_path, stage, rows, results


def test_every_clip_is_in_exactly_one_shard(written):
    _, stage, rows, results = written
    assert [r.status for r in results] == ["ok"] * len(rows)
    shards = read_shards(stage.root)
    keys = [k for info in shards.values() for k in info.keys]
    assert sorted(keys) == sorted(r["key"] for r in rows)
    assert all(info.num_samples <= 10 for info in shards.values())
    report = verify(stage.root, {r["key"] for r in rows})
    assert report.ok, report.faults
    assert report.samples == len(rows)


def test_splits_keep_each_artist_in_one_split(written):
    _, stage, rows, results = written
    split_of = {r.key: r.metrics["split"] for r in results}
    by_artist: dict[str, set] = {}
    for row in rows:
        by_artist.setdefault(row["artist"], set()).add(split_of[row["key"]])
    assert all(len(splits) == 1 for splits in by_artist.values())
    names = {info.shard for info in read_shards(stage.root).values()}
    assert all(n.split("-")[0] in ("train", "val", "test") and n.endswith(".tar") for n in names)


def test_heldout_keys_go_to_their_split(tmp_path: Path):
    rows = clip_rows(tmp_path / "art", videos=4)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("yt_vid00000001\n")
    stage = make_stage(tmp_path, heldout_keys=str(heldout), heldout_split="val", train_fraction=1.0, val_fraction=0.0)
    splits = {r.key: r.metrics["split"] for r in stage.process(rows)}
    assert {k for k, s in splits.items() if s == "val"} == {f"yt_vid00000001_{c:03d}" for c in range(3)}


def test_webdataset_reads_back_with_default_decoders(written):
    import webdataset as wds

    tmp_path, stage, rows, _ = written
    urls = sorted(str(p) for p in stage.root.glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == len(rows)
    first = next(s for s in samples if s["__key__"] == rows[0]["key"])
    assert first["tokens.npy"].dtype == np.int16 and first["tokens.npy"].shape == (4, 500)
    assert np.array_equal(first["tokens.npy"], np.load(rows[0]["tokens_path"]))
    assert first["hiera.npy"].dtype == np.float16 and first["beat_weights.npy"].shape == (500,)
    meta = first["json"]
    assert meta["artist"] == rows[0]["artist"] and meta["weights"] == "random-init"
    assert "tokens_path" not in meta  # local paths are not provenance


def test_wids_reads_back(written):
    import wids

    _, stage, _, _ = written
    index = stage.root / "wids-train.json"
    n = sum(s["nsamples"] for s in json.loads(index.read_text())["shardlist"])
    ds = wids.ShardListDataset(str(index), transformations=[], base=str(stage.root), cache_dir=str(stage.root / "cache"))
    assert len(ds) == n > 0
    sample = ds[0]
    assert {".tokens.npy", ".hiera.npy", ".json"} <= set(sample)


def test_huggingface_datasets_reads_back(written):
    from datasets import load_dataset

    tmp_path, stage, rows, _ = written
    files = sorted(str(p) for p in stage.root.glob("*.tar"))
    ds = load_dataset("webdataset", data_files={"shards": files}, split="shards", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(rows)
    assert np.asarray(ds[0]["tokens.npy"]).shape == (4, 500)


def test_tar_lists_plain_members(written):
    _, stage, rows, _ = written
    name = sorted(p.name for p in stage.root.glob("*.tar"))[0]
    listing = subprocess.run(["tar", "tf", name], cwd=stage.root, capture_output=True, text=True, check=True).stdout.split()
    key = listing[0].split(".")[0]
    assert {f"{key}.tokens.npy", f"{key}.hiera.npy", f"{key}.json", f"{key}.music_beats.npy"} <= set(listing)
    assert all("/" not in m for m in listing)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_verify_catches_a_damaged_shard(written, damage):
    _, stage, rows, _ = written
    shard = sorted(stage.root.glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    report = verify(stage.root, {r["key"] for r in rows})
    assert not report.ok
    assert any(shard.name in f and "sha256" in f for f in report.faults)


def test_unsafe_or_incomplete_rows_fail_without_stopping_others(tmp_path: Path):
    rows = clip_rows(tmp_path / "art", videos=1)
    rows[0]["key"] = "../../etc/passwd"
    rows[1]["tokens_path"] = str(tmp_path / "missing.npy")
    results = {r.key: r for r in make_stage(tmp_path).process(rows)}
    assert results["../../etc/passwd"].status == "failed" and "unsafe sample key" in results["../../etc/passwd"].reason
    assert results[rows[1]["key"]].reason.startswith("missing_artifact")
    assert results[rows[2]["key"]].status == "ok"


def test_rows_with_bad_beat_arrays_fail_with_the_reason_and_the_rest_are_written(tmp_path: Path):
    rows = clip_rows(tmp_path / "art", videos=4)
    rows[0]["music_beats"] = rows[0]["music_beats"][:-1]
    rows[1]["video_beats"] = [300] + rows[1]["video_beats"][1:]  # not an int8
    rows[2]["video_beats"] = [0.5] + rows[2]["video_beats"][1:]  # a flag that is not an integer
    rows[3]["beat_weights"] = None
    rows[4]["beat_weights"] = ["x"] + rows[4]["beat_weights"][1:]
    rows[5]["beat_weights"] = [1e40] + rows[5]["beat_weights"][1:]  # beyond float32
    rows[6]["beat_weights"] = [float("nan")] + rows[6]["beat_weights"][1:]
    rows[7]["music_beats"] = [[1, 2], 3]  # ragged
    rows[8]["video_beats"] = np.full(500, 300)  # an array column: the same checks as a list
    rows[9]["music_beats"] = np.asarray(rows[9]["music_beats"], dtype=np.int64)  # fine: values fit int8
    results = {r.key: r for r in make_stage(tmp_path).process(rows)}
    reasons = [results[row["key"]].reason.split(":")[0] for row in rows[:9]]
    assert reasons == ["missing_beats", "bad_beats", "bad_beats", "missing_beats", "bad_beats", "bad_beats",
                       "bad_beats", "missing_beats", "bad_beats"]
    assert [results[row["key"]].status for row in rows[9:]] == ["ok"] * 3
    shards = read_shards(tmp_path / "shards")
    assert sorted(k for info in shards.values() for k in info.keys) == [row["key"] for row in rows[9:]]
    import webdataset as wds

    urls = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    for row in rows[9:]:
        sample = samples[row["key"]]
        assert sample["music_beats.npy"].dtype == np.int8 and sample["beat_weights.npy"].dtype == np.float32
        assert np.array_equal(sample["music_beats.npy"], row["music_beats"])
        assert np.array_equal(sample["beat_weights.npy"], row["beat_weights"])


KILLED_WRITER = """
import json, sys
from pathlib import Path
from test_shards import make_stage
rows = json.loads(Path(sys.argv[1]).read_text())
make_stage(Path(sys.argv[2]), max_samples=2).process(rows)
"""


def test_kill_during_writing_then_rerun_gives_every_clip_once(tmp_path: Path):
    rows = clip_rows(tmp_path / "art", videos=30, clips=2)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "rows.json"), str(tmp_path)], env=env)
    root = tmp_path / "shards"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(root.glob("*.tar"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = len(list(root.glob("*.tar")))
    assert 3 <= finished_before and len(read_shards(root)) < 30, "the kill must land part-way"
    stage = make_stage(tmp_path, max_samples=2)
    results = stage.process(rows)  # the re-run: finds finished samples, writes the rest
    assert Counter(r.status for r in results) == {"ok": len(rows)}
    keys = Counter(k for info in read_shards(root).values() for k in info.keys)
    assert set(keys) == {r["key"] for r in rows} and set(keys.values()) == {1}
    assert not list(root.glob("*.tmp"))
    assert verify(root, {r["key"] for r in rows}).ok


def test_takedown_removes_a_video_everywhere_and_keeps_the_rest(written):
    tmp_path, stage, rows, results = written
    store = ManifestStore(tmp_path / "m")
    now = datetime.now(timezone.utc)
    store.append("shards", full_schema(Shards.schema), [
        {"key": r.key, "status": "ok", "reason": "", "stage_version": "1", "params_hash": "p", "weights": "none",
         "run_id": "r", "finished_at": now, "elapsed_s": 0.0, "node": "n", **r.metrics} for r in results])
    before = {info.shard: info.sha256 for info in read_shards(stage.root).values()}
    removed = remove_from_shards(stage.root, {"yt_vid00000003"})
    assert sorted(k for keys in removed.values() for k in keys) == [f"yt_vid00000003_{c:03d}" for c in range(3)]
    after = read_shards(stage.root)
    all_keys = {k for info in after.values() for k in info.keys}
    assert not any(k.startswith("yt_vid00000003") for k in all_keys)
    assert len(all_keys) == len(rows) - 3
    untouched = [name for name in before if name not in removed]
    assert untouched and all(after[name].sha256 == before[name] for name in untouched)
    assert mark_in_manifests(store, {"yt_vid00000003"}, ["shards"]) == 3
    sharded = set(store.ok_keys("shards"))
    assert len(sharded) == len(rows) - 3
    assert verify(stage.root, sharded).ok


def assert_written_as_tarwriter_would(ours: Path, size_and_sha: tuple[int, str], samples: list[dict]) -> None:
    """`ours` holds the very bytes webdataset's TarWriter writes for `samples`; size and sha256 match."""
    import webdataset as wds

    theirs = wds.TarWriter(str(ours.with_name("theirs.tar")), encoder=False, mtime=0)
    for sample in samples:
        theirs.write(sample)
    theirs.close()
    expected = ours.with_name("theirs.tar").read_bytes()
    assert ours.read_bytes() == expected
    assert size_and_sha == (len(expected), hashlib.sha256(expected).hexdigest())


@pytest.mark.parametrize("durable", [True, False])
def test_shard_bytes_are_exactly_webdatasets_tarwriter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool):
    """Same members, same order, same headers (a long name gets tarfile's PAX header), same end;
    fsynced unless durable=False (shards.fsync)."""
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    writebacks = []
    if hasattr(os, "posix_fadvise"):
        real_fadvise = os.posix_fadvise
        monkeypatch.setattr(os, "posix_fadvise", lambda *a: writebacks.append(a) or real_fadvise(*a))

    rng = np.random.default_rng(1)
    big = tmp_path / "big.npy"
    np.save(big, rng.standard_normal((96, 768)).astype(np.float16))
    samples = [{"__key__": f"yt_k{i:04d}_000", "hiera.npy": big.read_bytes(), "json": b'{"i": %d}' % i,
                "tokens.npy": rng.bytes(int(rng.integers(0, 5000)))} for i in range(40)]
    samples.append({"__key__": "x" * 120, "json": b"{}"})
    writer = TarShardWriter(tmp_path / "ours.tar", durable=durable)
    writer.BATCH_BYTES = 256 << 10  # several batches through the writer thread
    writer.WRITEBACK_BYTES = 1 << 20  # and several early writebacks when durable
    for sample in samples:
        writer.write({**sample, "hiera.npy": FileMember(big)} if "hiera.npy" in sample else sample)
    size, sha = writer.close()
    assert len(fsyncs) == (1 if durable else 0)
    if hasattr(os, "posix_fadvise"):  # early writeback: consecutive ranges of >= 1 MB, only when durable
        assert (len(writebacks) >= 3) if durable else not writebacks
        assert [a[1] for a in writebacks] == [sum(a[2] for a in writebacks[:i]) for i in range(len(writebacks))]
        assert all(a[2] >= writer.WRITEBACK_BYTES for a in writebacks)
    assert_written_as_tarwriter_would(tmp_path / "ours.tar", (size, sha), samples)


def test_long_names_in_early_batches_and_reused_buffers(tmp_path: Path):
    """PAX headers (names over 100 bytes) are longer than 512 bytes: counted as such in every batch,
    not only the last, including when a larger recycled buffer hides a miscount."""
    rng = np.random.default_rng(2)
    samples = [{"__key__": f"big{i}", "flac": rng.bytes(6 << 20)} for i in range(5)]
    samples += [{"__key__": "L" * 120, "json": b"{}"}, {"__key__": "mid", "flac": rng.bytes(5 << 20)},
                {"__key__": "M" * 150, "json": b"{}"}, {"__key__": "end", "json": b"{}"}]
    writer = TarShardWriter(tmp_path / "ours.tar")
    for sample in samples:
        writer.write(sample)
    size, sha = writer.close()
    assert_written_as_tarwriter_would(tmp_path / "ours.tar", (size, sha), samples)


def test_a_finished_writer_refuses_writes_and_keeps_its_file(tmp_path: Path):
    writer = TarShardWriter(tmp_path / "done.tar")
    writer.write({"__key__": "a", "json": b"{}"})
    writer.close()
    writer.abort()  # after a successful close: nothing to undo
    assert (tmp_path / "done.tar").stat().st_size > 0
    for call in (lambda: writer.write({"__key__": "b", "json": b"{}"}), writer.close):
        with pytest.raises(ValueError, match="close"):
            call()
    aborted = TarShardWriter(tmp_path / "aborted.tar")
    aborted.abort()
    with pytest.raises(ValueError, match="abort"):
        aborted.write({"__key__": "c", "flac": b"x" * (5 << 20)})
    assert not (tmp_path / "aborted.tar").exists()


def test_a_slow_hash_never_sees_a_reused_buffer(tmp_path: Path):
    """The writer thread goes on while a batch is still being hashed: its buffer must not be laid
    out again before the hash is done, or the sha256 would cover other bytes."""
    class SlowHash:
        def __init__(self) -> None:
            self.sha = hashlib.sha256()

        def update(self, data: memoryview) -> None:
            time.sleep(0.005)
            self.sha.update(data)

        def hexdigest(self) -> str:
            return self.sha.hexdigest()

    rng = np.random.default_rng(3)
    samples = [{"__key__": f"k{i:03d}", "flac": rng.bytes(int(rng.integers(1, 40_000))), "json": b"{}"}
               for i in range(120)]
    writer = TarShardWriter(tmp_path / "slow.tar")
    writer.BATCH_BYTES = 32 << 10
    writer.sha = SlowHash()
    for sample in samples:
        writer.write(sample)
    assert_written_as_tarwriter_would(tmp_path / "slow.tar", writer.close(), samples)


class BrokenHash:
    def update(self, data: memoryview) -> None:
        raise MemoryError("hash died")


def refuse_work(*_: Any) -> None:
    raise RuntimeError("cannot schedule new futures after interpreter shutdown")


@pytest.mark.parametrize(("attribute", "broken", "error", "message"), [
    ("sha", lambda writer: BrokenHash(), MemoryError, "hash died"),  # no shard with a wrong sha256
    # as at interpreter shutdown: the writer thread must report it, not die and leave a short shard
    ("hasher", lambda writer: SimpleNamespace(submit=refuse_work, shutdown=writer.hasher.shutdown),
     RuntimeError, "interpreter shutdown"),
])
def test_a_failing_hash_fails_the_shard(tmp_path: Path, attribute: str, broken: Any, error: type, message: str):
    writer = TarShardWriter(tmp_path / "broken.tar")
    writer.BATCH_BYTES = 64 << 10
    setattr(writer, attribute, broken(writer))
    with pytest.raises(error, match=message), writer:  # as the stage uses it: aborted on error
        for i in range(40):  # several batches: raised by a later write or by close
            writer.write({"__key__": f"k{i}", "flac": b"x" * (20 << 10)})
        writer.close()
    assert not (tmp_path / "broken.tar").exists()


@pytest.mark.parametrize("length", [1, 99, 100, 101, 150])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 147_584, 8**11 - 1, 8**11])
def test_member_headers_are_tarfiles_at_the_edges(length: int, size: int):
    """The per-size header with the name patched in equals tarfile's own header at the USTAR limits
    (100-byte names, 11-digit octal sizes), where tarfile switches to a PAX header."""
    import tarfile

    name = ("k" * length)[: length - 4] + ".npy" if length > 4 else "k" * length
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
    assert member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_an_npy_that_is_not_what_it_claims_fails_its_row(tmp_path: Path):
    rows = clip_rows(tmp_path / "art", videos=1)
    data = Path(rows[0]["tokens_path"]).read_bytes()
    Path(rows[0]["tokens_path"]).write_bytes(data[: len(data) - 100])  # truncated array data
    np.save(rows[1]["features_path"], np.zeros((3, 96, 64), np.float16))  # 3-D, not [frames, dim]
    results = {r.key: r for r in make_stage(tmp_path).process(rows)}
    assert results[rows[0]["key"]].reason.startswith("bad_array")
    assert results[rows[1]["key"]].reason.startswith("bad_array")
    assert results[rows[2]["key"]].status == "ok"


@contextlib.contextmanager
def tmpfs(path: Path, size: str, unavailable):
    """A small tmpfs at `path`; yields a function that grows it (the space coming back). CI runs as
    root and may mount; elsewhere a machine that may not is skipped."""
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root")
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        if any(s in mounted.stderr.lower() for s in ("permission denied", "not permitted", "superuser")):
            unavailable(f"mount not permitted here: {mounted.stderr.strip()}")
        raise RuntimeError(f"mount failed: {mounted.stderr.strip()}")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def writes_fail_after(monkeypatch, free: int):
    """The shard writer's writes hit ENOSPC once `free` bytes are written, after a short write,
    as on a real full disk; yields a function that gives the space back."""
    real = shard_writer.write_all
    left = [free]

    def write_all(fd: int, data: memoryview) -> None:
        if len(data) > left[0]:
            real(fd, data[: left[0]])
            left[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= len(data)
        real(fd, data)

    monkeypatch.setattr(shard_writer, "write_all", write_all)
    yield lambda _size: monkeypatch.setattr(shard_writer, "write_all", real)


@pytest.mark.parametrize("full", ["tmpfs", "failing_writes"])
def test_disk_full_fails_rows_clearly_leaves_no_partial_shard_and_rerun_completes(tmp_path: Path, monkeypatch, full,
                                                                                 unavailable):
    rows = clip_rows(tmp_path / "art")  # 36 clips of ~25 kB: ~4 shards of 10
    root = tmp_path / "shards"
    with tmpfs(root, "600k", unavailable) if full == "tmpfs" else writes_fail_after(monkeypatch, 600_000) as space_back:
        results = make_stage(tmp_path, max_samples=10).process(rows)
        assert sorted(r.key for r in results) == sorted(row["key"] for row in rows)
        failed = [r for r in results if r.status == "failed"]
        assert failed, "the disk must fill part-way"
        assert all(r.reason.startswith("disk_full:") and "No space left on device" in r.reason for r in failed)
        assert read_shards(root), "shards finished before the disk filled are kept"
        assert not list(root.glob("*.tmp"))
        report = verify(root)  # every tar under a final name matches its sidecar's size and sha256
        assert report.ok, report.faults
        assert {r.key for r in results if r.status == "ok"} <= {k for i in read_shards(root).values() for k in i.keys}

        space_back("16m")
        results = make_stage(tmp_path, max_samples=10).process(rows)
        assert Counter(r.status for r in results) == {"ok": len(rows)}
        keys = Counter(k for info in read_shards(root).values() for k in info.keys)
        assert set(keys) == {r["key"] for r in rows} and set(keys.values()) == {1}
        assert not list(root.glob("*.tmp"))
        report = verify(root, {r["key"] for r in rows})
        assert report.ok, report.faults


@pytest.mark.parametrize("key", ["../escape", "a/b", ".hidden", "k\\x"])
def test_the_writer_refuses_member_names_that_could_escape(tmp_path: Path, key: str):
    writer = TarShardWriter(tmp_path / "s.tar.tmp")
    with pytest.raises(ShardError, match="unsafe"):
        writer.write({"__key__": key, "json": b"{}"})
    writer.abort()
    assert not (tmp_path / "s.tar.tmp").exists()
