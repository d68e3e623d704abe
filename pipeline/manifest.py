"""Parquet manifest store: `<root>/<stage>/part-*.parquet`, one row per key per stage run.

Part files are written to a temp name, fsynced and renamed, so a kill leaves either a whole part
or none. Readers take the latest row per key; `compact` rewrites a stage into one part. On an object
store (`s3://…`, `gs://…` root) a part is written whole to a local temp file, then published by one
upload (S3, GCS) or a temp key and a copy (other backends; pipeline/storage.py): visible whole or not at all;
readers list only `part-*.parquet`, never `*.tmp`.

At DISCO-10M scale (15.3M candidates, a download part every 16 rows) nothing here may hold a stage
as Python objects or concatenate every part: readers are duckdb SQL over the part files (latest row
per key by a window over `read_parquet([...], union_by_name)`), and `append` keeps the part count
bounded by merging a run of MERGE_FANIN parts of one level into one part of the next level (an LSM:
~16 parts per level, log16(rows) levels). A merged part is in place before the parts it replaces
go; a kill in between leaves duplicate rows, which readers resolve, never a loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
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
MERGE_FANIN = 16  # parts of one level merged into one part of the next
COMPACT_LEVEL = 9  # a compacted part is merged again only when 16 of them pile up
WRITE_ROWS = 65_536  # rows per row group when merging or compacting
_LEVEL = re.compile(r"-L(\d+)$")
_REMOTE: dict[str, storage.Root] = {}  # protocol → the last remote root opened: duckdb reads it
Part = Path | str  # a local part file, or the URL of a remote one


def full_schema(stage_schema: pa.Schema) -> pa.Schema:
    clash = COMMON_NAMES & set(stage_schema.names)
    if clash:
        raise ValueError(f"stage schema redefines common manifest columns: {sorted(clash)}")
    return pa.schema(COMMON_FIELDS + list(stage_schema))


def params_hash(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ManifestStore:
    def __init__(self, root: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.remote: storage.Root | None = None
        if storage.is_remote(root):
            self.remote = storage.open_root(root, storage_options)
            _REMOTE[self.remote.protocol] = self.remote
            self.root: Any = self.remote.url
        else:
            self.root = storage.local_path(root)

    def stage_dir(self, stage: str) -> Path | str:
        return self.remote.url_of(stage) if self.remote else self.root / stage

    def parts(self, stage: str) -> list[Part]:
        if self.remote:
            names = [n for n in self.remote.names(stage) if n.startswith("part-") and n.endswith(".parquet")]
            return [self.remote.url_of(stage, n) for n in names]
        d = self.stage_dir(stage)
        return sorted(d.glob("part-*.parquet")) if d.is_dir() else []

    def _parquet(self, part: Part) -> pq.ParquetFile:
        # 1 MiB reads remotely: a footer or a column chunk, not the client's default 50 MiB block
        return pq.ParquetFile(self.remote.fs.open(part, "rb", block_size=1 << 20) if self.remote else part)

    def _unlink(self, part: Part) -> None:
        if self.remote:
            self.remote.fs.rm_file(part)
        else:
            part.unlink()

    def _sync(self, stage: str) -> None:
        if not self.remote:
            _fsync_dir(self.stage_dir(stage))

    def _writer(self, stage: str, name: str, schema: pa.Schema) -> _AtomicPart:
        """A part written whole under `name`: locally by rename, remotely by `Root.publish_file`."""
        if self.remote:
            return _RemotePart(self.remote, f"{stage}/{name}", schema)
        return _AtomicPart(self.stage_dir(stage) / name, schema)

    def append(self, stage: str, schema: pa.Schema, rows: list[dict[str, Any]]) -> Path | None:
        """Durably add rows as one new part file (temp name, fsync, rename, fsync dir), then merge
        the newest parts when MERGE_FANIN of one level have piled up."""
        if not rows:
            return None
        return self.append_table(stage, pa.Table.from_pylist(rows, schema=schema))

    def append_table(self, stage: str, table: pa.Table) -> Path | str | None:
        """append() of rows that are an Arrow table already."""
        if not table.num_rows:
            return None
        d = self.stage_dir(stage)
        if not self.remote:
            d.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        with self._writer(stage, name, table.schema) as out:
            out.write(table)
        self.merge(stage)
        return f"{d}/{name}" if self.remote else d / name

    def merge(self, stage: str, fanin: int = MERGE_FANIN) -> int:
        """Merge each run of `fanin` consecutive parts of one level (every row, history kept) into
        one part of the next level, until none is left; returns how many merges ran. After each
        append only the newest parts can form a run (levels never rise along part order, like a
        counter in base `fanin`); a pile of parts left by older code is merged oldest run first.
        The merged part is named after the newest part it holds, so it keeps their place in the
        order readers break finished_at ties by."""
        parts = self.parts(stage)
        levels = [part_level(p) for p in parts]
        merges, i = 0, 0
        while i + fanin <= len(parts):
            if len(set(levels[i:i + fanin])) > 1:
                i += 1
                continue
            run = parts[i:i + fanin]
            base = _LEVEL.sub("", part_name(run[-1]).removesuffix(".parquet"))
            target_name = f"{base}-L{levels[i] + 1}.parquet"
            with self._writer(stage, target_name, self.schema(stage, run)) as out:
                for p in run:
                    for batch in self._parquet(p).iter_batches(batch_size=WRITE_ROWS):
                        out.write(pa.Table.from_batches([batch]))
            for p in run:  # the merged part is durable: the old ones may go (a kill here: duplicates)
                if part_name(p) != target_name:
                    self._unlink(p)
            self._sync(stage)
            target = f"{self.stage_dir(stage)}/{target_name}" if self.remote else self.stage_dir(stage) / target_name
            parts[i:i + fanin], levels[i:i + fanin] = [target], [levels[i] + 1]
            merges, i = merges + 1, max(0, i - fanin)
        return merges

    def schema(self, stage: str, parts: list[Path] | None = None) -> pa.Schema | None:
        """The schema every part of the stage fits (as concatenating them would give)."""
        parts = self.parts(stage) if parts is None else parts
        if not parts:
            return None
        return pa.unify_schemas([self._parquet(p).schema_arrow for p in parts], promote_options="permissive")

    def latest_sql(self, stage: str, columns: list[str] | None = None) -> str | None:
        """SQL for the latest row per key (by finished_at, a null being newest as in a sort with
        nulls last, then part order, then row order), over every part; None when there is none.
        The window runs over the key and ordering columns only (a window holds its whole input);
        the winners' columns are then read by (file, row)."""
        parts = self.parts(stage)
        if not parts:
            return None
        files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in parts)
        scan = f"read_parquet([{files}], union_by_name=true, file_row_number=true)"
        columns = self.schema(stage, parts).names if columns is None else columns
        cols = ", ".join("t." + _quote(c) for c in columns)
        return (
            f"(SELECT {cols} FROM {scan} t SEMI JOIN (SELECT file_index AS fi, file_row_number AS rn FROM {scan} "
            "QUALIFY row_number() OVER (PARTITION BY key ORDER BY finished_at DESC NULLS FIRST, file_index DESC, "
            "file_row_number DESC) = 1) w ON t.file_index = w.fi AND t.file_row_number = w.rn)"
        )

    def read(self, stage: str) -> pa.Table | None:
        """Every row ever written for the stage (all parts), or None when there is none."""
        parts = self.parts(stage)
        if not parts:
            return None
        tables = [self._parquet(p).read() for p in parts]
        return pa.concat_tables(tables, promote_options="permissive")

    def latest(self, stage: str) -> pa.Table | None:
        """The latest row per key, sorted by key (duckdb over the parts)."""
        schema = self.schema(stage)
        if schema is None:
            return None
        with connect() as con:
            sql = self.latest_sql(stage, schema.names)
            return conform(con.sql(f"SELECT * FROM {sql} ORDER BY key").to_arrow_table(), schema)

    def latest_rows(self, stage: str) -> dict[str, dict[str, Any]]:
        table = self.latest(stage)
        return {} if table is None else {r["key"]: r for r in table.to_pylist()}

    def done_sql(self, stage: str, version: str, phash: str, retry_failed: bool = False, by: str = "key") -> str:
        """SQL for the keys (or, for a fan-out stage, `by="video_key"`: inputs) whose latest rows
        were made by this stage version with these params; an empty relation when none."""
        schema = self.schema(stage)
        if schema is None or by not in schema.names:
            return "(SELECT NULL::VARCHAR AS key WHERE false)"
        sql = self.latest_sql(stage, ["key", "status", "stage_version", "params_hash", by])
        retry = f" AND status <> '{FAILED}'" if retry_failed else ""
        return (
            f"(SELECT DISTINCT {_quote(by)} AS key FROM {sql} WHERE stage_version = {_literal(version)} "
            f"AND params_hash = {_literal(phash)}{retry})"
        )

    def done_keys(
        self, stage: str, version: str, phash: str, retry_failed: bool = False, by: str = "key"
    ) -> set[str]:
        """Keys (or, for a fan-out stage, `by="video_key"`: inputs) whose latest rows were made by
        this stage version with these params."""
        with connect() as con:
            keys = con.sql(f"SELECT key FROM {self.done_sql(stage, version, phash, retry_failed, by)}")
            return set(keys.to_arrow_table().column("key").to_pylist())

    def ok_sql(self, stage: str) -> str | None:
        sql = self.latest_sql(stage, ["key", "status"])
        return None if sql is None else f"(SELECT key FROM {sql} WHERE status = '{OK}')"

    def ok_keys(self, stage: str) -> list[str]:
        sql = self.ok_sql(stage)
        if sql is None:
            return []
        with connect() as con:
            return con.sql(f"SELECT key FROM {sql} ORDER BY key").to_arrow_table().column("key").to_pylist()

    def compact(self, stage: str) -> tuple[int, int]:
        """Rewrite the stage as one part holding the latest row per key. Returns (parts, rows).

        Streamed from duckdb in row groups; the new part is in place before old parts go, so a
        kill in between leaves duplicates that `latest` resolves, never a loss.
        """
        old = self.parts(stage)
        schema = self.schema(stage)
        if schema is None or len(old) <= 1:
            self._remove_temp(stage)
            if schema is None:
                return 0, 0
            with connect() as con:
                return 1, con.execute(f"SELECT count(*) FROM {self.latest_sql(stage, ['key'])}").fetchone()[0]
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}-L{COMPACT_LEVEL}.parquet"
        rows = 0
        with connect() as con, self._writer(stage, name, schema) as out:
            rel = con.sql(f"SELECT * FROM {self.latest_sql(stage, schema.names)} ORDER BY key")
            for batch in rel.to_arrow_reader(WRITE_ROWS):
                out.write(conform(pa.Table.from_batches([batch]), schema))
                rows += batch.num_rows
        for p in old:
            if part_name(p) != name:
                self._unlink(p)
        self._remove_temp(stage)
        self._sync(stage)
        return len(old), rows

    def _remove_temp(self, stage: str) -> None:
        """Temp files (and, remotely, temp keys) a killed writer left behind."""
        if self.remote:
            for name in self.remote.names(stage):
                if name.endswith(TMP_SUFFIX):
                    self.remote.remove(stage, name)
            return
        d = self.stage_dir(stage)
        if d.is_dir():
            for p in d.glob(f"*{TMP_SUFFIX}"):
                p.unlink()

    def stages(self) -> Iterable[str]:
        if self.remote:
            return self.remote.folders()
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []


def part_name(part: Part) -> str:
    return part.name if isinstance(part, Path) else part.rsplit("/", 1)[-1]


def part_level(path: Part) -> int:
    """0 for a part as written, n for one made by merging parts of level n-1."""
    found = _LEVEL.search(part_name(path).removesuffix(".parquet"))
    return int(found.group(1)) if found else 0


def connect() -> Any:
    """A duckdb connection for manifest SQL: a memory cap (spilling to a temp
    directory beyond it) so a 15M-row manifest does not take the driver's memory."""
    import duckdb

    con = duckdb.connect(config={
        "memory_limit": os.environ.get("DISCOMV_DUCKDB_MEMORY", "1GB"),
        "temp_directory": os.path.join(tempfile.gettempdir(), f"discomv-duckdb-{os.getpid()}"),
    })
    storage.duckdb_register(con, list(_REMOTE.values()))
    return con


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns and types (missing columns as nulls): duckdb's types back
    to the manifest's own."""
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema.remove_metadata())


class _AtomicPart:
    """A part written under a temp name in row groups of WRITE_ROWS, fsynced, then renamed."""

    def __init__(self, final: Path, schema: pa.Schema) -> None:
        self.final, self.schema = final, schema
        self.tmp = final.with_name(final.name + TMP_SUFFIX)
        self.pending: list[pa.Table] = []
        self.rows = 0

    def __enter__(self) -> _AtomicPart:
        self.file = open(self.tmp, "wb")
        self.writer = pq.ParquetWriter(self.file, self.schema)
        return self

    def write(self, table: pa.Table) -> None:
        self.pending.append(conform(table, self.schema))
        self.rows += table.num_rows
        if self.rows >= WRITE_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=max(self.rows, 1))
        self.pending, self.rows = [], 0

    def __exit__(self, kind: Any, *_: Any) -> None:
        try:
            if kind is None:
                self._flush()
            self.writer.close()
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()
        if kind is not None:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)


class _RemotePart(_AtomicPart):
    """A part written whole to a local temp file, then published to the object store under its
    key by `Root.publish_file`; on any error nothing is published."""

    def __init__(self, root: storage.Root, key: str, schema: pa.Schema) -> None:
        self.local_dir = tempfile.TemporaryDirectory(prefix="discomv-part-")
        super().__init__(Path(self.local_dir.name) / key.rsplit("/", 1)[-1], schema)
        self.root, self.key = root, key

    def __exit__(self, kind: Any, *rest: Any) -> None:
        try:
            super().__exit__(kind, *rest)
            if kind is None:
                self.root.publish_file(self.final, self.key)
        finally:
            self.local_dir.cleanup()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
