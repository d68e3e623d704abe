"""SIGKILL the driver part-way through `download`, re-run, and prove nothing is lost, doubled or
fetched again."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from pipeline.manifest import ManifestStore

N = 60


def discomv(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.tools.cli", *args, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver first (the fault under test), then whatever it had started."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group had already exited with its driver: nothing left to kill


def wait_until_quiet(server, quiet_s: float = 2.0, limit_s: float = 60.0) -> Counter:
    """Request counts once the killed run's last requests are over: Ray workers of a killed driver
    may finish the download in their hands before they notice and exit, and that is their fetch,
    not the re-run's."""
    deadline = time.time() + limit_s
    counts = Counter(server.counts)
    while time.time() < deadline:
        time.sleep(quiet_s)
        now = Counter(server.counts)
        if now == counts:
            return now
        counts = now
    raise AssertionError("the killed run kept fetching for a minute")


def test_kill_during_download_then_resume(tmp_path: Path, media_dir: Path, server, write_lines, copy_many):
    names = copy_many(media_dir / "moving.mp4", media_dir / "resume", N)
    urls = write_lines(tmp_path / "urls.txt", [f"{server.url}/slow/150/{n}" for n in names])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"manifest_root": str(tmp_path / "m"), "media_root": str(tmp_path / "media"), "flush_rows": 2},
        "ingest": {"inputs": [urls]},
        "download": {"allow_private_hosts": True, "concurrency": 2},
    }))
    assert subprocess.run([sys.executable, "-m", "pipeline.tools.cli", "ingest", "-c", str(config), "--no-progress"],
                          capture_output=True).returncode == 0
    store = ManifestStore(tmp_path / "m")

    driver = discomv("download", "-c", str(config))
    deadline = time.time() + 180
    while time.time() < deadline and (store.read("download") is None or store.read("download").num_rows < 6):
        time.sleep(0.2)
    kill_group(driver)
    before = store.read("download")
    assert before is not None and 6 <= before.num_rows < N, "the kill must land part-way through"
    recorded = set(before.column("key").to_pylist())
    gets_before = wait_until_quiet(server)

    rerun = discomv("download", "-c", str(config))
    output = rerun.communicate(timeout=300)[0].decode()
    assert rerun.returncode == 0, output

    rows = store.read("download").to_pylist()
    per_key = Counter(r["key"] for r in rows)
    assert len(per_key) == N and set(per_key.values()) == {1}, "every candidate exactly once"
    assert {r["status"] for r in rows} == {"ok"}
    ingest_urls = {r["key"]: r["url"] for r in store.latest("ingest").to_pylist()}
    for key in recorded:  # recorded before the kill: not redone, not fetched again
        path = "/" + ingest_urls[key].split("/", 3)[3]
        assert server.counts[("GET", path)] == gets_before[("GET", path)]
    reused = [r for r in rows if r["reused"]]
    for r in reused:  # finished on disk but unrecorded at the kill: picked up without a fetch
        path = "/" + ingest_urls[r["key"]].split("/", 3)[3]
        assert server.counts[("GET", path)] == gets_before[("GET", path)]
    for part in store.parts("download"):  # a kill may leave a *.tmp, never a torn part under a final name
        assert pq.read_metadata(part).num_rows > 0
    assert len(list((tmp_path / "media" / "video").glob("*.mp4"))) == N
    assert "processed" in output and f"{len(recorded)} already done" in output
