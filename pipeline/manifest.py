"""Parquet manifest store: `<root>/<stage>/part-*.parquet`, one row per key per stage run.

Part files are written to a temp name, fsynced and renamed, so a kill leaves either a whole part
or none. Readers take the latest row per key; `compact` rewrites a stage into one part.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.stage import FAILED, OK

COMMON_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("stage_version", pa.string()),
    pa.field("params_hash", pa.string()),
    pa.field("weights", pa.string()),  # pretrained | random-init | none
    pa.field("run_id", pa.string()),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    pa.field("elapsed_s", pa.float64()),
    pa.field("node", pa.string()),  # Ray node id that ran the row (placement on a cluster)
]
COMMON_NAMES = {f.name for f in COMMON_FIELDS}
TMP_SUFFIX = ".tmp"


def full_schema(stage_schema: pa.Schema) -> pa.Schema:
    clash = COMMON_NAMES & set(stage_schema.names)
    if clash:
        raise ValueError(f"stage schema redefines common manifest columns: {sorted(clash)}")
    return pa.schema(COMMON_FIELDS + list(stage_schema))


def params_hash(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ManifestStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def parts(self, stage: str) -> list[Path]:
        d = self.stage_dir(stage)
        return sorted(d.glob("part-*.parquet")) if d.is_dir() else []

    def append(self, stage: str, schema: pa.Schema, rows: list[dict[str, Any]]) -> Path | None:
        """Durably add rows as one new part file (temp name, fsync, rename, fsync dir)."""
        if not rows:
            return None
        table = pa.Table.from_pylist(rows, schema=schema)
        d = self.stage_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = d / (name + TMP_SUFFIX)
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        final = d / name
        os.replace(tmp, final)
        _fsync_dir(d)
        return final

    def read(self, stage: str) -> pa.Table | None:
        """Every row ever written for the stage (all parts), or None when there is none."""
        parts = self.parts(stage)
        if not parts:
            return None
        tables = [pq.read_table(p) for p in parts]
        return pa.concat_tables(tables, promote_options="permissive")

    def latest(self, stage: str) -> pa.Table | None:
        """The latest row per key (by finished_at, then part order)."""
        table = self.read(stage)
        if table is None or table.num_rows == 0:
            return table
        table = table.append_column("_order", pa.array(np.arange(table.num_rows)))
        order = pc.sort_indices(
            table, [("key", "ascending"), ("finished_at", "ascending"), ("_order", "ascending")]
        )
        table = table.take(order)
        keys = table.column("key").to_numpy(zero_copy_only=False)
        last = np.ones(len(keys), dtype=bool)
        last[:-1] = keys[:-1] != keys[1:]
        return table.filter(pa.array(last)).drop_columns(["_order"])

    def latest_rows(self, stage: str) -> dict[str, dict[str, Any]]:
        table = self.latest(stage)
        return {} if table is None else {r["key"]: r for r in table.to_pylist()}

    def done_keys(
        self, stage: str, version: str, phash: str, retry_failed: bool = False, by: str = "key"
    ) -> set[str]:
        """Keys (or, for a fan-out stage, `by="video_key"`: inputs) whose latest rows were made by
        this stage version with these params."""
        table = self.latest(stage)
        if table is None:
            return set()
        mask = pc.and_(
            pc.equal(table["stage_version"], version), pc.equal(table["params_hash"], phash)
        )
        if retry_failed:
            mask = pc.and_(mask, pc.not_equal(table["status"], FAILED))
        return set(table.filter(mask).column(by).to_pylist())

    def ok_keys(self, stage: str) -> list[str]:
        table = self.latest(stage)
        if table is None:
            return []
        return table.filter(pc.equal(table["status"], OK)).column("key").to_pylist()

    def compact(self, stage: str) -> tuple[int, int]:
        """Rewrite the stage as one part holding the latest row per key. Returns (parts, rows).

        The new part is in place before old parts go, so a kill in between leaves duplicates
        that `latest` resolves, never a loss.
        """
        old = self.parts(stage)
        table = self.latest(stage)
        if table is None or len(old) <= 1:
            self._remove_temp(stage)
            return len(old), 0 if table is None else table.num_rows
        new = self.append(stage, table.schema, table.to_pylist())
        for p in old:
            if p != new:
                p.unlink()
        self._remove_temp(stage)
        _fsync_dir(self.stage_dir(stage))
        return len(old), table.num_rows

    def _remove_temp(self, stage: str) -> None:
        d = self.stage_dir(stage)
        if d.is_dir():
            for p in d.glob(f"*{TMP_SUFFIX}"):
                p.unlink()

    def stages(self) -> Iterable[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
