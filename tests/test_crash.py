"""Crash anywhere: SIGKILL the driver of a full `discomv run` (ingest → shards) at random points,
re-run, and prove the outcome is the one an uninterrupted run gives — every candidate in exactly one
terminal state, every sharded clip in exactly one shard, `discomv verify` clean, no partial file
under a final name.

CRASH_N candidates (default 100) and CRASH_SEEDS (default "1,2,3"); each seed kills the run twice at
times drawn uniformly over the uninterrupted run's duration, then lets a third run finish.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml
from test_resume import kill_group

from pipeline.manifest import ManifestStore
from pipeline.tools import synth
from pipeline.tools.audit import audit_table
from pipeline.tools.demo import SMALL_MODELS
from pipeline.tools.localserver import LocalServer
from pipeline.webds.index import read_shards

N = int(os.environ.get("CRASH_N", "100"))
SEEDS = [int(s) for s in os.environ.get("CRASH_SEEDS", "1,2,3").split(",")]
KILLS_PER_SEED = 2

# Small models through the real code paths, so a run of 100 candidates takes about a minute.
FAST = {
    **SMALL_MODELS,
    "download": {"allow_private_hosts": True, "concurrency": 2, "retries": 1, "backoff_s": 0.05},
    "clips": {"max_clips": 1},
    "beats": {"frame_size": "128x72"},
    "shards": {"max_samples": 16},  # many shards, so kills land between and inside them
}


ARTIFACTS = (
    ("separate", "instrumental_path", sf.read),
    ("separate", "instrumental32k_path", sf.read),
    ("beats", "beats_path", lambda p: dict(np.load(p, allow_pickle=False))),
    ("tokens", "tokens_path", lambda p: np.load(p, allow_pickle=False)),
    ("features", "features_path", lambda p: np.load(p, allow_pickle=False)),
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """N candidates served from 127.0.0.1: copies of four 12 s videos, every 10th one broken."""
    root = tmp_path_factory.mktemp("crash_media")
    names = synth.make_copies_corpus(root, N, broken_every=10)
    with LocalServer(root) as server:
        yield [f"{server.url}/{name}?n={i}" for i, name in enumerate(names)]


def write_config(folder: Path, urls: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "urls.txt").write_text("\n".join(urls) + "\n")
    raw = {
        "run": {"manifest_root": str(folder / "manifests"), "media_root": str(folder / "media"),
                "shard_root": str(folder / "shards"), "weights": "random", "flush_rows": 4},
        "ingest": {"inputs": [str(folder / "urls.txt")]},
        **FAST,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    return folder / "config.yaml"


def discomv(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.tools.cli", *args, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(config: Path) -> str:
    proc = discomv("run", "-c", str(config))
    out = proc.communicate(timeout=900)[0].decode()
    assert proc.returncode == 0, out[-4000:]
    return out


def outcome(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(terminal state per candidate, shard per sharded clip), checking the invariants on the way."""
    store = ManifestStore(folder / "manifests")
    audit = audit_table(store).to_pylist()
    keys = Counter(row["key"] for row in audit)
    assert set(keys.values()) == {1}, "every candidate in exactly one row of the audit"
    terminal = {row["key"]: row["terminal"] for row in audit}
    assert not [t for t in terminal.values() if t.startswith("pending")], "a finished run leaves nothing pending"

    for stage in store.stages():  # no torn manifest part under a final name
        for part in store.parts(stage):
            assert pq.read_metadata(part).num_rows > 0, part
    shard_rows = store.latest("shards").to_pylist()
    assert len({r["key"] for r in shard_rows}) == len(shard_rows)
    sharded = {r["key"]: r["shard"] for r in shard_rows if r["status"] == "ok"}
    in_shards = Counter(key for info in read_shards(folder / "shards").values() for key in info.keys)
    assert set(in_shards.values()) == {1}, "every clip in exactly one shard"
    assert set(in_shards) == set(sharded), "the shards hold exactly the clips the manifest says are sharded"
    media = store.latest("media")  # what the streaming run removed once nothing needed it
    removed = {p for row in (media.to_pylist() if media is not None else []) for p in row["removed"]}
    for stage, column, read in ARTIFACTS:  # every artifact under a final name is whole, or recorded removed
        for row in store.latest(stage).to_pylist():
            if row["status"] == "ok" and row.get(column) and row[column] not in removed:
                read(row[column])
    verify = subprocess.run([sys.executable, "-m", "pipeline.tools.cli", "verify", "-c", str(folder / "config.yaml")],
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-2000:]
    return terminal, sharded


@pytest.fixture(scope="module")
def reference(corpus: list[str], tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted run: its outcome and how long it took."""
    folder = tmp_path_factory.mktemp("crash_reference")
    config = write_config(folder, corpus)
    started = time.monotonic()
    run_to_end(config)
    seconds = time.monotonic() - started
    terminal, sharded = outcome(folder)
    assert len(sharded) >= N // 2, "most candidates reach the shards"
    return terminal, sharded, seconds


@pytest.mark.parametrize("seed", SEEDS)
def test_kill_anywhere_then_rerun_gives_the_uninterrupted_outcome(seed, corpus, reference, tmp_path: Path):
    ref_terminal, ref_sharded, ref_seconds = reference
    config = write_config(tmp_path / "run", corpus)
    rng = random.Random(seed)
    kills = []
    for _ in range(KILLS_PER_SEED):
        delay = rng.uniform(1.0, ref_seconds)
        proc = discomv("run", "-c", str(config))
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            kills.append(round(delay, 1))
    run_to_end(config)
    terminal, sharded = outcome(tmp_path / "run")
    assert terminal == ref_terminal
    assert set(sharded) == set(ref_sharded)
    print(f"seed {seed}: SIGKILL at {kills} s of a {ref_seconds:.0f} s run; {len(terminal)} candidates, "
          f"{len(sharded)} clips sharded, all exactly once")
    shutil.rmtree(tmp_path / "run" / "media")  # keep /tmp small across seeds


def _stage_actor_pids(stage_class: str) -> list[int]:
    """Processes of the streaming run's actors of one stage (Ray titles them by the worker class)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if f"MapBatches({stage_class}Worker)" in cmdline:
            found.append(int(proc.name))
    return found


def test_a_killed_worker_of_a_middle_stage_is_replaced_and_the_run_ends_as_uninterrupted(
        corpus, reference, tmp_path: Path):
    """SIGKILL one filter actor while the other stages run: Ray Data restarts it and retries its batch
    (a result recorded twice is the same row: the latest wins), and the run ends as the reference."""
    ref_terminal, ref_sharded, _ = reference
    config = write_config(tmp_path / "run", corpus)
    proc = discomv("run", "-c", str(config))
    store = ManifestStore(tmp_path / "run" / "manifests")
    killed, deadline = None, time.monotonic() + 600
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        pids = _stage_actor_pids("Filter")
        if pids and store.parts("filter") and store.parts("download") and not store.parts("shards"):
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.2)
    out = proc.communicate(timeout=900)[0].decode()
    assert killed is not None, "the filter actors were never seen while the run went on:\n" + out[-3000:]
    assert proc.returncode == 0, out[-4000:]
    terminal, sharded = outcome(tmp_path / "run")
    assert terminal == ref_terminal
    assert set(sharded) == set(ref_sharded)
