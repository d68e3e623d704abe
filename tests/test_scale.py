"""Bounded driver (issue 23, item 3): manifest readers over parts, pending as an anti-join, part
merging (crash-safe), and ingest streaming with an early-stopping limit."""

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import MERGE_FANIN, ManifestStore, full_schema, part_level
from pipeline.plan import plan_stage
from pipeline.runner import stage_params_hash
from stages import STAGES

SCHEMA = full_schema(pa.schema([("score", pa.float64())]))
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(key: str, status: str = "ok", minutes: int = 0, score: float = 0.0, version: str = "1", phash: str = "p"):
    return {"key": key, "status": status, "reason": None, "stage_version": version, "params_hash": phash,
            "weights": "none", "run_id": "r", "finished_at": T0 + timedelta(minutes=minutes), "elapsed_s": 0.1,
            "node": "n", "score": score}


def test_latest_row_per_key_across_parts_with_duplicates(tmp_path: Path):
    store = ManifestStore(tmp_path)
    store.append("s", SCHEMA, [row("a", "failed", 0), row("b", "ok", 3), row("a", "failed", 1, score=9)])
    store.append("s", SCHEMA, [row("a", "ok", 2, score=1.0), row("b", "dropped", 1)])  # b: older, loses
    store.append("s", SCHEMA, [row("c", "ok", 0, score=1.0), row("c", "ok", 0, score=2.0)])  # tie: last wins
    store.append("s", SCHEMA, [row("c", "ok", 0, score=3.0)])  # tie across parts: the later part wins
    latest = store.latest("s")
    assert latest.schema == SCHEMA.remove_metadata()
    got = {r["key"]: (r["status"], r["score"]) for r in latest.to_pylist()}
    assert got == {"a": ("ok", 1.0), "b": ("ok", 0.0), "c": ("ok", 3.0)}
    assert latest.column("key").to_pylist() == ["a", "b", "c"]
    assert store.ok_keys("s") == ["a", "b", "c"]


def test_pending_is_upstream_ok_minus_done(tmp_path: Path, make_config):
    store = ManifestStore(tmp_path)
    ingest_schema = full_schema(STAGES["ingest"].schema)
    ingest_rows = [{**row(f"k{i}", "ok" if i % 4 else "failed"), "url": f"u{i}"} for i in range(40)]
    for r in ingest_rows:
        r.pop("score")
    store.append("ingest", ingest_schema, ingest_rows)
    cfg = make_config(tmp_path, [])
    download = STAGES["download"]
    stage = download(cfg.stage("download"), cfg.run)

    phash = stage_params_hash(stage)
    done = [{"key": f"k{i}", "status": "ok", "stage_version": stage.version, "params_hash": phash,
             "finished_at": T0} for i in (1, 2, 3)]
    stale = [{"key": "k5", "status": "ok", "stage_version": "old", "params_hash": phash, "finished_at": T0}]
    store.append("download", full_schema(download.schema), done + stale)
    plan = plan_stage(stage, store, STAGES, phash, window=7)
    ok = [f"k{i}" for i in range(40) if i % 4]
    assert (plan.total, plan.pending, plan.already_done) == (len(ok), len(ok) - 3, 3)
    windows = list(plan.windows())
    assert max(len(w) for w in windows) <= 7
    rows = [r for w in windows for r in w]
    assert [r["key"] for r in rows] == sorted(k for k in ok if k not in {"k1", "k2", "k3"})
    assert rows[0]["url"] == "u10" and rows[0]["upstream_weights"] == {"ingest": "none"}


def test_parts_merge_as_they_accumulate(tmp_path: Path):
    store = ManifestStore(tmp_path)
    for i in range(MERGE_FANIN * MERGE_FANIN + 5):
        store.append("s", SCHEMA, [row(f"k{i % 50}", minutes=i, score=float(i))])
    parts = store.parts("s")
    assert len(parts) <= 2 * MERGE_FANIN
    assert [part_level(p) for p in parts] == sorted((part_level(p) for p in parts), reverse=True)
    assert store.read("s").num_rows == MERGE_FANIN * MERGE_FANIN + 5  # history kept
    latest = {r["key"]: r["score"] for r in store.latest("s").to_pylist()}
    assert latest == {f"k{k}": float(max(i for i in range(MERGE_FANIN * MERGE_FANIN + 5) if i % 50 == k))
                      for k in range(50)}


def test_kill_between_merged_part_and_deleting_old_ones(tmp_path: Path, monkeypatch):
    store = ManifestStore(tmp_path)
    for i in range(MERGE_FANIN - 1):
        store.append("s", SCHEMA, [row(f"k{i}", score=float(i)), row("same", minutes=i, score=float(i))])
    real_unlink = Path.unlink
    calls = []

    def dying_unlink(self, *a, **kw):
        calls.append(self)
        if len(calls) == 3:  # merged part durable, two old parts gone, then the driver dies
            raise KeyboardInterrupt("killed")
        return real_unlink(self, *a, **kw)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with pytest.raises(KeyboardInterrupt):
        store.append("s", SCHEMA, [row("last", score=99.0)])
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert store.read("s").num_rows > 2 * (MERGE_FANIN - 1) + 1  # duplicates on disk
    latest = store.latest("s").to_pylist()
    keys = [r["key"] for r in latest]
    assert len(keys) == len(set(keys)) == MERGE_FANIN + 1  # no duplicate, no loss
    assert {r["key"]: r["score"] for r in latest}["same"] == float(MERGE_FANIN - 2)
    store.compact("s")
    assert len(store.parts("s")) == 1 and store.read("s").num_rows == MERGE_FANIN + 1


def test_compact_streams_latest_rows(tmp_path: Path):
    store = ManifestStore(tmp_path)
    store.append("s", SCHEMA, [row("a", "failed"), row("b")])
    store.append("s", SCHEMA, [row("a", "ok", 5)])
    assert store.compact("s") == (2, 2)
    assert {r["key"]: r["status"] for r in store.latest("s").to_pylist()} == {"a": "ok", "b": "ok"}


def test_ingest_reads_only_the_columns_it_records(tmp_path: Path, monkeypatch, make_stage):
    """DISCO-10M's 512-float embedding column is never read (column-selected, row group by row group)."""
    n = 1000
    ids = [f"{i:011d}" for i in range(n)]
    pq.write_table(pa.table({
        "video_url_youtube": [f"https://www.youtube.com/watch?v={v}" for v in ids],
        "video_title_youtube": ["t"] * n,
        "audio_embedding_spotify": pa.array([[0.0] * 512] * n, pa.list_(pa.float32())),
        "similarity_clip": [0.5] * n,
    }), tmp_path / "d.parquet", row_group_size=250)
    read: list[list[str]] = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *args, columns=None, **kwargs):
        read.append(list(columns or []))
        return real(self, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    rows = make_stage(tmp_path, "ingest", [str(tmp_path / "d.parquet")], limit=5).source_rows()
    assert [r["key"] for r in rows] == [f"yt_{v}" for v in ids[:5]]
    assert rows[0]["disco_scores"] == '{"similarity_clip": 0.5}' and rows[0]["title"] == "t"
    assert read and all("audio_embedding_spotify" not in cols for cols in read)
    assert read[0] == ["video_url_youtube"], "pass 1 reads the URL column only"


def test_a_source_stage_is_planned_against_its_done_keys(tmp_path: Path, make_stage):
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"{i:011d}\n" for i in range(30)) + f"{3:011d}\n")  # a duplicate of row 3
    stage = make_stage(tmp_path, "ingest", [str(ids)])
    phash = stage_params_hash(stage)
    store = ManifestStore(tmp_path / "m")
    done = [{"key": f"yt_{i:011d}", "status": "ok", "stage_version": stage.version, "params_hash": phash,
             "finished_at": T0} for i in range(0, 30, 2)]
    store.append("ingest", full_schema(stage.schema), done)
    plan = plan_stage(stage, store, STAGES, phash, window=4)
    rows = [r for w in plan.windows() for r in w]
    assert (plan.total, plan.pending) == (30, 15)
    assert [r["key"] for r in rows] == [f"yt_{i:011d}" for i in range(1, 30, 2)]
    assert rows[1]["also_in"] == [f"ids:{ids}:30"] and rows[1]["input_row"] == 3


def test_a_pile_of_small_parts_is_merged_down(tmp_path: Path):
    store = ManifestStore(tmp_path)
    d = tmp_path / "s"
    d.mkdir()
    for i in range(300):  # as older code left them: never merged
        pq.write_table(pa.Table.from_pylist([row(f"k{i % 70}", minutes=i, score=float(i))], schema=SCHEMA),
                       d / f"part-{i:020d}-00000000.parquet")
    before = {r["key"]: r["score"] for r in store.latest("s").to_pylist()}
    assert store.merge("s") > 0
    assert len(store.parts("s")) < 2 * MERGE_FANIN and store.read("s").num_rows == 300
    assert {r["key"]: r["score"] for r in store.latest("s").to_pylist()} == before
