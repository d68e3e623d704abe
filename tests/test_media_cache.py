"""A node's media cache (pipeline/media/cache.py) and the local side of MediaStore
(pipeline/media/staging.py): the bound holds, the least recently used go first, a file in use is
never evicted, and two processes asking for the same object get one whole copy between them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.media.cache import NodeCache
from pipeline.media.staging import MediaStore, cache_name

ROOT = Path(__file__).resolve().parent.parent


def fetcher(data: bytes, log: list[str] | None = None, name: str = ""):
    def fetch(out) -> None:
        if log is not None:
            log.append(name)
        out.write(data)
    return fetch


def get(cache: NodeCache, name: str, size: int = 100, log: list[str] | None = None) -> bytes:
    data = name.encode().ljust(size, b".")
    with cache.pinned(name, fetcher(data, log, name), size) as path:
        return path.read_bytes()


def cached(cache: NodeCache) -> set[str]:
    return {p.name for p in cache.objects.iterdir() if not p.name.endswith(".lock")}


def test_the_bound_holds_and_the_least_recently_used_go_first(tmp_path: Path):
    cache = NodeCache(tmp_path / "c", max_bytes=300)
    fetched: list[str] = []
    for name in ("a", "b", "c"):
        assert get(cache, name, log=fetched) == name.encode().ljust(100, b".")
        time.sleep(0.01)  # distinct mtimes
    assert cached(cache) == {"a", "b", "c"} and cache.used_bytes() == 300
    get(cache, "a", log=fetched)  # used again: now b is the least recently used
    assert fetched == ["a", "b", "c"], "a cached file is not fetched again"
    time.sleep(0.01)
    get(cache, "d", log=fetched)
    assert cached(cache) == {"a", "c", "d"}
    assert cache.used_bytes() <= 300
    time.sleep(0.01)
    get(cache, "e", size=250, log=fetched)  # needs three of them gone
    assert cached(cache) == {"e"} and cache.used_bytes() == 250
    assert not [p for p in cache.objects.iterdir() if p.name.endswith(".fetch")]


def test_a_file_in_use_is_never_evicted(tmp_path: Path):
    cache = NodeCache(tmp_path / "c", max_bytes=250)
    data = b"x" * 100
    with cache.pinned("held", fetcher(data), 100) as held:
        time.sleep(0.01)
        for name in ("b", "c", "d"):
            get(cache, name)
            time.sleep(0.01)
            assert held.read_bytes() == data, "the oldest entry, but in use"
        assert cached(cache) == {"held", "d"}
    time.sleep(0.01)
    get(cache, "e", size=200)  # released: now it may go
    assert cached(cache) == {"e"}


def test_a_pin_held_by_another_process_keeps_the_file(tmp_path: Path):
    cache = NodeCache(tmp_path / "c", max_bytes=150)
    get(cache, "held")
    script = ("import sys, time; from pipeline.media.cache import NodeCache\n"
              "c = NodeCache(sys.argv[1], 150)\n"
              "with c.pinned('held', None, 100) as p:\n"
              "    print('pinned', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "c")], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    try:
        assert proc.stdout.readline().strip() == "pinned"
        get(cache, "other")
        assert "held" in cached(cache), "pinned in another process"
    finally:
        proc.kill()
        proc.wait()
    get(cache, "third")  # the killed process's lock died with it
    assert "held" not in cached(cache)


SLOW_FETCH = """
import os, sys, time
from pipeline.media.cache import NodeCache
folder, source, log = sys.argv[1:4]
def fetch(out):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    data = open(source, "rb").read()
    step = 1 << 16
    for i in range(0, len(data), step):  # slowly: the other process arrives mid-fetch
        out.write(data[i:i + step]); out.flush(); time.sleep(0.04)
c = NodeCache(folder, 1 << 30)
with c.pinned("obj.mp4", fetch, os.path.getsize(source)) as p:
    print(len(p.read_bytes()), p.read_bytes() == open(source, "rb").read())
"""


def test_two_processes_fetching_the_same_object_get_one_whole_copy(tmp_path: Path):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3 << 20))
    log = tmp_path / "fetches.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_FETCH, str(tmp_path / "c"), str(source), str(log)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [[str(3 << 20), "True"]] * 2, "both read the whole object"
    assert len(log.read_text().split()) == 1, "fetched once"
    cache = NodeCache(tmp_path / "c", 1 << 30)
    assert cached(cache) == {"obj.mp4"}


def test_a_failed_fetch_leaves_nothing_and_the_next_one_fetches(tmp_path: Path):
    cache = NodeCache(tmp_path / "c", max_bytes=1000)

    def broken(out) -> None:
        out.write(b"half")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        with cache.pinned("x", broken, 100):
            pass
    assert cached(cache) == set()
    with pytest.raises(OSError, match="expected 100"):  # short: not a whole copy
        with cache.pinned("x", fetcher(b"short"), 100):
            pass
    assert cached(cache) == set()
    assert get(cache, "x") == b"x".ljust(100, b".")


def test_a_local_media_root_is_a_pass_through(tmp_path: Path):
    media = MediaStore(str(tmp_path / "media"))
    assert not media.remote
    with media.writing("tokens", "k.npy") as partial:
        assert partial == tmp_path / "media" / "tokens" / "k.npy.part"  # beside the final name, as before
        partial.write_bytes(b"abc")
    final = tmp_path / "media" / "tokens" / "k.npy"
    assert media.uri("tokens", "k.npy") == str(final) and final.read_bytes() == b"abc"
    assert not partial.exists()
    with media.local(str(final)) as path:
        assert path == final  # no copy
    with pytest.raises(RuntimeError):
        with media.writing("tokens", "bad.npy") as partial:
            partial.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in final.parent.iterdir()) == ["k.npy"]
    assert media.is_file(str(final)) and not media.is_file(None) and not media.is_file(str(final) + "x")


def test_cache_names_come_from_a_hash_not_from_the_uri():
    name = cache_name("s3://b/media/video/../../etc/passwd; rm -rf.mp4")
    assert "/" not in name and name.endswith(".mp4") and len(name) == 44
    assert cache_name("s3://b/x.weird suffix") == cache_name("s3://b/x.weird suffix")
    assert "." not in cache_name("s3://b/x.weird suffix")


def test_a_fetch_file_left_by_a_killed_fetcher_counts_and_goes(tmp_path: Path):
    cache = NodeCache(tmp_path / "c", max_bytes=250)
    (cache.objects / f"gone.mp4.{'0' * 32}.fetch").write_bytes(b"y" * 200)  # its fetcher was killed
    get(cache, "a")
    assert cached(cache) == {"a"} and cache.used_bytes() == 100
