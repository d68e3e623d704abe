from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa

from pipeline.manifest import ManifestStore, full_schema, params_hash

SCHEMA = full_schema(pa.schema([("score", pa.float64())]))
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(key: str, status: str = "ok", minutes: int = 0, version: str = "1", phash: str = "p", score: float = 0.0):
    return {
        "key": key, "status": status, "reason": "", "stage_version": version, "params_hash": phash,
        "weights": "none", "run_id": "r", "finished_at": T0 + timedelta(minutes=minutes), "elapsed_s": 0.1,
        "node": "n", "score": score,
    }


def test_latest_row_per_key_wins(tmp_path: Path):
    store = ManifestStore(tmp_path)
    store.append("s", SCHEMA, [row("a", "failed", 0), row("b", "ok", 0)])
    store.append("s", SCHEMA, [row("a", "ok", 5, score=1.0)])
    latest = {r["key"]: r for r in store.latest("s").to_pylist()}
    assert latest["a"]["status"] == "ok" and latest["a"]["score"] == 1.0
    assert set(latest) == {"a", "b"}
    assert store.read("s").num_rows == 3


def test_temp_parts_are_ignored_and_compaction_removes_them(tmp_path: Path):
    store = ManifestStore(tmp_path)
    store.append("s", SCHEMA, [row("a")])
    (tmp_path / "s" / "part-999.parquet.tmp").write_bytes(b"half a file")
    assert store.read("s").num_rows == 1
    store.append("s", SCHEMA, [row("b"), row("a", "failed", 3)])
    parts, rows = store.compact("s")
    assert (parts, rows) == (2, 2)
    assert len(store.parts("s")) == 1
    assert not list((tmp_path / "s").glob("*.tmp"))
    latest = {r["key"]: r["status"] for r in store.latest("s").to_pylist()}
    assert latest == {"a": "failed", "b": "ok"}


def test_done_keys_depend_on_version_params_and_retry(tmp_path: Path):
    store = ManifestStore(tmp_path)
    store.append("s", SCHEMA, [row("a"), row("b", "failed"), row("c", version="0"), row("d", phash="other")])
    assert store.done_keys("s", "1", "p") == {"a", "b"}
    assert store.done_keys("s", "1", "p", retry_failed=True) == {"a"}


def test_params_hash_is_order_independent():
    assert params_hash({"a": 1, "b": [1, 2]}) == params_hash({"b": [1, 2], "a": 1})
    assert params_hash({"a": 1}) != params_hash({"a": 2})
