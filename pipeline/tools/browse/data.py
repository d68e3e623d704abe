"""The browser's tables: audit.py's joined manifests (one row per candidate, one per clip) as duckdb
views, with the columns the table shows derived in SQL. Paging, filtering and sorting run in duckdb,
so a page of a big run never loads every row into Python."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.manifest import ManifestStore
from pipeline.tools import audit

PAGE_MAX = 500
# the filters a table takes: exact-match columns and numeric ranges (name_min / name_max)
EXACT = ("status", "stage", "reason_class", "source", "split", "weights")
RANGES = ("frame_similarity", "vocal_residual", "alignment")
COLUMNS = {
    "candidates": ["key", "source", "title", "status", "stage", "reason_class", "reason", "frame_similarity",
                   "vocal_residual", "clips", "shards", "alignment", "weights"],
    "clips": ["key", "video_key", "clip_index", "start_s", "status", "stage", "reason_class", "reason", "source",
              "frame_similarity", "vocal_residual", "alignment", "n_music_beats", "n_video_beats", "split",
              "shard", "weights"],
}


def _weights_sql(stages: list[str], have: set[str]) -> str:
    cols = [f"{s}_weights" for s in stages if f"{s}_weights" in have]
    if not cols:
        return "'none'"
    any_random = " OR ".join(f"{c} = 'random-init'" for c in cols)
    any_pretrained = " OR ".join(f"{c} = 'pretrained'" for c in cols)
    return f"CASE WHEN {any_random} THEN 'random-init' WHEN {any_pretrained} THEN 'pretrained' ELSE 'none' END"


def _col(name: str, have: set[str], cast: str = "") -> str:
    if name in have:
        return f"{name}{cast}"
    return "NULL"


def _store(con: Any, name: str, table: pa.Table) -> None:
    """A table in the database itself (every cursor sees it; a registered Arrow table is per connection)."""
    con.register("_arrow", table)
    con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _arrow')
    con.unregister("_arrow")


class Tables:
    """The joined manifests of one manifest root, rebuilt when a part file is added or removed."""

    def __init__(self, manifest_root: str | Path, shard_root: str | Path) -> None:
        self.store = ManifestStore(manifest_root)
        self.shard_root = Path(shard_root)
        self.lock = threading.Lock()
        self.stamp: tuple | None = None
        self.con: Any = None

    def _parts_stamp(self) -> tuple:
        parts = [p for name in self.store.stages() for p in self.store.parts(name)]
        return tuple((str(p), p.stat().st_mtime_ns) for p in parts)

    def connection(self) -> Any:
        """A duckdb cursor over the views `candidates`, `clips` and one per stage (latest rows)."""
        with self.lock:
            stamp = self._parts_stamp()
            if stamp != self.stamp or self.con is None:
                self.con = self._build()
                self.stamp = stamp
            return self.con.cursor()

    def _build(self) -> Any:
        import duckdb

        con = duckdb.connect()
        video_stages, clip_stages = audit.levels()
        for name in video_stages + clip_stages:
            latest = self.store.latest(name)
            if latest is not None:
                _store(con, f"m_{name}", latest)
        table = audit.audit_table(self.store)
        clips = audit.clip_table(self.store)
        _store(con, "audit", table if table is not None else pa.table({"key": pa.array([], pa.string())}))
        if clips is None:
            clips = pa.table({"key": pa.array([], pa.string()), "video_key": pa.array([], pa.string())})
        _store(con, "clips_audit", clips)
        have = set(con.sql("SELECT * FROM audit LIMIT 0").columns)
        have_clips = set(clips.column_names)
        ok_clip_stages = [s for s in clip_stages if f"{s}_status" in have_clips]
        # candidates: where each ends (audit's `terminal`), and the reason it ends with
        reason_cases = " ".join(
            f"WHEN '{s}' THEN {s}_reason" for s in video_stages if f"{s}_reason" in have)
        clip_reason = " ".join(
            f"WHEN '{s}' THEN (SELECT first(c.{s}_reason) FROM clips_audit c WHERE c.video_key = a.key "
            f"AND c.{s}_status <> 'ok')" for s in ok_clip_stages)
        last_clip = ok_clip_stages[-1] if ok_clip_stages else None
        con.sql(f"""CREATE VIEW candidates AS SELECT *, split_part(reason, ':', 1) AS reason_class FROM (
            SELECT a.key, {_col('source', have)} AS source, {_col('title', have)} AS title, a.terminal,
              split_part(a.terminal, ' ', 1) AS status, split_part(a.terminal, ' ', -1) AS stage,
              CASE WHEN a.terminal LIKE 'ok%' THEN NULL ELSE CASE split_part(a.terminal, ' ', -1) {reason_cases} {clip_reason} ELSE NULL END END AS reason,
              {_col('frame_similarity', have)} AS frame_similarity,
              {_col('vocal_ratio_after', have)} AS vocal_residual,
              {_col(f'{clip_stages[0]}_clips_ok', have) if clip_stages else 'NULL'} AS clips,
              {_col(f'{last_clip}_clips_ok', have) if last_clip else 'NULL'} AS shards,
              {"(SELECT avg(c.alignment_score) FROM clips_audit c WHERE c.video_key = a.key)"
               if 'alignment_score' in have_clips else 'NULL'} AS alignment,
              {_weights_sql(video_stages + clip_stages, have)} AS weights
            FROM audit a) t""")
        status_case = " ".join(f"WHEN {s}_status IS NULL THEN 'pending {s}' WHEN {s}_status <> 'ok' "
                               f"THEN {s}_status || ' {s}'" for s in ok_clip_stages)
        last = f"'ok {last_clip}'" if last_clip else "'ok -'"
        reason = " ".join(f"WHEN {s}_status <> 'ok' THEN {s}_reason" for s in ok_clip_stages)
        con.sql(f"""CREATE VIEW clips AS SELECT *, split_part(reason, ':', 1) AS reason_class FROM (
            SELECT c.key, c.video_key, {_col('clip_index', have_clips)} AS clip_index,
              {_col('start_s', have_clips)} AS start_s, {_col('end_s', have_clips)} AS end_s,
              split_part(CASE {status_case or 'WHEN false THEN NULL'} ELSE {last} END, ' ', 1) AS status,
              split_part(CASE {status_case or 'WHEN false THEN NULL'} ELSE {last} END, ' ', -1) AS stage,
              CASE {reason or 'WHEN false THEN NULL'} ELSE NULL END AS reason,
              v.source, v.frame_similarity, v.vocal_residual,
              {_col('alignment_score', have_clips)} AS alignment,
              {_col('n_music_beats', have_clips)} AS n_music_beats,
              {_col('n_video_beats', have_clips)} AS n_video_beats,
              {_col('split', have_clips)} AS split, {_col('shard', have_clips)} AS shard,
              CASE WHEN v.weights = 'random-init' OR {_weights_sql(clip_stages, have_clips)} = 'random-init'
                THEN 'random-init' ELSE v.weights END AS weights
            FROM clips_audit c LEFT JOIN candidates v ON v.key = c.video_key) t""")
        return con


def _rows(con: Any, sql: str, args: list[Any]) -> list[dict[str, Any]]:
    """Rows as dicts through Arrow (duckdb's own conversion of timestamps with a zone needs pytz)."""
    return con.sql(sql, params=args).to_arrow_table().to_pylist()


def page(tables: Tables, kind: str, params: dict[str, str]) -> dict[str, Any]:
    """One page of `candidates` or `clips`: exact filters, numeric ranges, one sort column."""
    if kind not in COLUMNS:
        raise KeyError(kind)
    columns = COLUMNS[kind]
    where, args = [], []
    for name in EXACT:
        if params.get(name) and name in columns:
            where.append(f"{name} = ?")
            args.append(params[name])
    for name in RANGES:
        for suffix, op in (("_min", ">="), ("_max", "<=")):
            value = params.get(name + suffix)
            if value not in (None, "") and name in columns:
                where.append(f"{name} {op} ?")
                args.append(float(value))
    if params.get("q"):
        where.append("(key ILIKE ? OR coalesce(reason, '') ILIKE ?)")
        args += [f"%{params['q']}%"] * 2
    sort = params.get("sort") if params.get("sort") in columns else "key"
    order = "DESC" if params.get("order") == "desc" else "ASC"
    limit = max(1, min(PAGE_MAX, int(params.get("limit") or 100)))
    offset = max(0, int(params.get("offset") or 0))
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    con = tables.connection()
    total = con.sql(f"SELECT count(*) FROM {kind} {clause}", params=args).fetchall()[0][0]
    rows = _rows(con, f"SELECT {', '.join(columns)} FROM {kind} {clause} ORDER BY {sort} {order} NULLS LAST, key "
                 f"LIMIT {limit} OFFSET {offset}", args)
    return {"columns": columns, "rows": rows, "total": total, "offset": offset, "limit": limit}


def facets(tables: Tables, kind: str) -> dict[str, list[Any]]:
    """The values each exact filter of a table can take (for its drop-downs)."""
    con = tables.connection()
    return {name: [r[0] for r in con.sql(
        f"SELECT DISTINCT {name} FROM {kind} WHERE {name} IS NOT NULL ORDER BY 1").fetchall()]
        for name in EXACT if name in COLUMNS[kind]}


def one_row(tables: Tables, view: str, key: str) -> dict[str, Any] | None:
    rows = _rows(tables.connection(), f"SELECT * FROM {view} WHERE key = ?", [key])
    return rows[0] if rows else None


def clip_keys(tables: Tables, video_key: str) -> list[dict[str, Any]]:
    return _rows(tables.connection(), "SELECT key, clip_index, start_s, status, stage, reason FROM clips "
                 "WHERE video_key = ? ORDER BY clip_index", [video_key])


def stage_row(tables: Tables, stage: str, key: str) -> dict[str, Any] | None:
    """The latest manifest row of one stage for a key (None when the stage has no row)."""
    con = tables.connection()
    if not con.sql("SELECT 1 FROM information_schema.tables WHERE table_name = ?", params=[f"m_{stage}"]).fetchall():
        return None  # the stage has no manifest yet
    rows = _rows(con, f'SELECT * FROM "m_{stage}" WHERE key = ?', [key])
    return rows[0] if rows else None
