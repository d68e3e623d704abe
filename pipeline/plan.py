"""What a stage is given: pending = upstream-ok keys − keys done by this stage version and params,
as a duckdb anti-join over the manifest parts, and the pending rows built a window at a time.

Nothing here holds the corpus as Python objects: the keys stay in duckdb (which spills beyond its
memory cap) and only one window of rows (WINDOW keys, every upstream stage's columns merged) is a
list of dicts at once. A source stage (ingest) that can name its keys first (`source_keys`) is
planned the same way, then reads back only its pending rows (`source_windows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.manifest import COMMON_NAMES, ManifestStore, conform, connect
from pipeline.stage import Row, SourceStage, Stage

WINDOW = 20_000  # rows built as Python dicts at once
TABLE_WINDOW = 131_072  # rows of an Arrow window (a source stage's rows, recorded in the driver)


@dataclass
class Plan:
    total: int  # rows the stage works on (its input)
    pending: int  # of which not yet done with this stage version and params
    windows: Callable[[], Iterator[list[Row]]]  # the pending rows, in input order
    tables: Callable[[], Iterator[pa.Table]] | None = None  # the same as Arrow tables, where the stage has them

    @property
    def already_done(self) -> int:
        return self.total - self.pending


def upstream_chain(stage_cls: type[Stage], registry: Mapping[str, type[Stage]]) -> list[str]:
    chain: list[str] = []
    up = stage_cls.upstream
    while up:
        chain.insert(0, up)
        up = registry[up].upstream
    return chain


def plan_stage(
    stage: Stage, store: ManifestStore, registry: Mapping[str, type[Stage]], phash: str,
    retry_failed: bool = False, window: int = WINDOW,
) -> Plan:
    done = store.done_sql(stage.name, stage.version, phash, retry_failed,
                          by="video_key" if stage.fans_out else "key")
    if isinstance(stage, SourceStage):
        return _plan_source(stage, done, window)
    chain = upstream_chain(type(stage), registry)
    ok = store.ok_sql(chain[-1])
    if ok is None:
        return Plan(0, 0, lambda: iter(()))
    with connect() as con:
        total, pending = con.execute(
            f"SELECT (SELECT count(*) FROM {ok}), (SELECT count(*) FROM (SELECT key FROM {ok} ANTI JOIN {done} "
            "USING (key)))"
        ).fetchone()
    return Plan(total, pending, lambda: _upstream_windows(store, registry, chain, ok, done, window))


def _plan_source(stage: SourceStage, done: str, window: int) -> Plan:
    if not hasattr(stage, "source_keys"):  # a source without a key pass: its rows as a list
        rows = stage.source_rows()
        with connect() as con:
            con.register("keys", pa.table({"key": pa.array([r["key"] for r in rows], pa.string())}))
            done_keys = set(con.execute(f"SELECT key FROM keys SEMI JOIN {done} USING (key)").fetchnumpy()["key"])
        pending = [r for r in rows if r["key"] not in done_keys]
        return Plan(len(rows), len(pending),
                    lambda: (pending[i:i + window] for i in range(0, len(pending), window)))
    keys = stage.source_keys()  # key, ord: the deduped candidates in input order
    with connect() as con:
        con.register("keys", keys)
        ords = con.execute(f"SELECT ord FROM keys ANTI JOIN {done} USING (key) ORDER BY ord").fetchnumpy()["ord"]
    tables = (lambda: stage.source_tables(ords, TABLE_WINDOW)) if hasattr(stage, "source_tables") else None
    return Plan(keys.num_rows, len(ords), lambda: stage.source_windows(ords, window), tables)


def _upstream_windows(
    store: ManifestStore, registry: Mapping[str, type[Stage]], chain: list[str], ok: str, done: str, window: int
) -> Iterator[list[Row]]:
    """Upstream-ok keys not done here, each with every upstream stage's own columns merged."""
    with connect() as con:
        yield from rows_of(con, store, registry, chain, f"(SELECT key FROM {ok} ANTI JOIN {done} USING (key))", window)


def rows_of(
    con: Any, store: ManifestStore, registry: Mapping[str, type[Stage]], chain: list[str], keys: str, window: int
) -> Iterator[list[Row]]:
    """The rows of `keys` (a relation of one `key` column), each with every stage of `chain`'s own
    columns merged: the most downstream stage's value wins, and video-level stages after a fan-out are
    looked up by the clip's `video_key` (one duckdb query, sorted by key, read a window at a time)."""
    fan_out = next((i for i, name in enumerate(chain) if registry[name].fans_out), len(chain))
    schemas = {name: store.schema(name) for name in chain}
    selects, joins, lookup = [], [], []
    for i in reversed(range(len(chain))):  # clip-level stages first: they name the clip's video
        name, schema = chain[i], schemas[chain[i]]
        if schema is None:
            continue
        cols = [f for f in schema if f.name not in COMMON_NAMES or f.name == "weights"]
        sql = store.latest_sql(name, ["key"] + [f.name for f in cols])
        on = "p.key" if i >= fan_out else ("CASE " + " ".join(lookup) + " ELSE p.key END" if lookup else "p.key")
        joins.append(f"LEFT JOIN {sql} s{i} ON s{i}.key = {on}")
        selects.append(f"s{i}.key IS NOT NULL AS \"{i}:found\"")
        selects += [f's{i}."{f.name}" AS "{i}:{f.name}"' for f in cols]
        if i >= fan_out and "video_key" in schema.names:
            lookup.append(f"WHEN s{i}.key IS NOT NULL THEN s{i}.video_key")
    query = f"SELECT p.key AS key{''.join(', ' + s for s in selects)} FROM {keys} p {' '.join(joins)} ORDER BY p.key"
    for batch in con.sql(query).to_arrow_reader(window):
        yield _rows(pa.Table.from_batches([batch]), chain, schemas)


def _rows(table: pa.Table, chain: list[str], schemas: dict[str, pa.Schema | None]) -> list[Row]:
    rows: list[Row] = [{"key": k} for k in table.column("key").to_pylist()]
    for i in reversed(range(len(chain))):
        schema = schemas[chain[i]]
        if schema is None:
            continue
        fields = [f for f in schema if f.name not in COMMON_NAMES or f.name == "weights"]
        found = table.column(f"{i}:found").to_pylist()
        part = conform(table.select([f"{i}:{f.name}" for f in fields]).rename_columns([f.name for f in fields]),
                       pa.schema(fields))
        for row, hit, prev in zip(rows, found, part.to_pylist(), strict=True):
            if hit:
                row.update({k: v for k, v in prev.items() if k not in COMMON_NAMES and k not in row})
                row.setdefault("upstream_weights", {})[chain[i]] = prev.get("weights")
    return rows


@dataclass
class StreamPlan:
    """Where each row enters a streaming run (pipeline/stream.py). A row enters at the first stage
    it is pending at (upstream ok, not done with this stage version and params) and flows on through
    every later stage; rows a stage has done already are not entered again there."""

    names: list[str]
    totals: list[int]  # per stage: rows ok upstream when the run starts
    pending: list[int]  # per stage: of which not done
    entering: list[int]  # per stage: rows entering the stream there
    windows: Callable[[], Iterator[tuple[int, list[Row]]]]  # (stage index, rows) a window at a time

    @property
    def rows(self) -> int:
        return sum(self.entering)


def plan_stream(
    stages: list[Stage], store: ManifestStore, registry: Mapping[str, type[Stage]], phashes: list[str],
    retry_failed: bool = False, window: int = WINDOW,
) -> StreamPlan:
    """Pending keys per stage as duckdb temp tables (they spill, never Python objects), then the
    entering keys: pending here and not pending at an earlier stage of the same level. A clip whose
    video is pending at or before the fan-out stage enters with its video (the fan-out makes it again)."""
    con = connect()
    fan = next((k for k, s in enumerate(stages) if s.fans_out), None)
    totals, pending, entering = [], [], []
    for k, stage in enumerate(stages):
        chain = upstream_chain(type(stage), registry)
        ok = store.ok_sql(chain[-1]) or "(SELECT NULL::VARCHAR AS key WHERE false)"
        done = store.done_sql(stage.name, stage.version, phashes[k], retry_failed,
                              by="video_key" if stage.fans_out else "key")
        con.execute(f"CREATE TEMP TABLE ok_{k} AS SELECT key FROM {ok}")
        con.execute(f"CREATE TEMP TABLE pending_{k} AS SELECT key FROM ok_{k} ANTI JOIN {done} USING (key)")
        clip_level = fan is not None and k > fan
        earlier = [f"pending_{j}" for j in range(fan + 1 if clip_level else 0, k)]
        sql = f"SELECT key FROM pending_{k}"
        for table in earlier:
            sql += f" ANTI JOIN {table} USING (key)"
        clips = store.latest_sql(stages[fan].name, ["key", "video_key"]) if clip_level else None
        if clips:  # clips of a video that enters at or before the fan-out are made again there
            videos = " UNION ALL ".join(f"SELECT key FROM pending_{j}" for j in range(fan + 1))
            sql = (f"SELECT e.key FROM ({sql}) e LEFT JOIN {clips} c USING (key) "
                   f"WHERE c.video_key IS NULL OR c.video_key NOT IN ({videos})")
        con.execute(f"CREATE TEMP TABLE enter_{k} AS {sql}")
        counts = con.execute(f"SELECT (SELECT count(*) FROM ok_{k}), (SELECT count(*) FROM pending_{k}), "
                             f"(SELECT count(*) FROM enter_{k})").fetchall()[0]
        totals.append(counts[0])
        pending.append(counts[1])
        entering.append(counts[2])

    def windows() -> Iterator[tuple[int, list[Row]]]:
        try:
            for k, stage in enumerate(stages):
                if entering[k]:
                    chain = upstream_chain(type(stage), registry)
                    for rows in rows_of(con, store, registry, chain, f"enter_{k}", window):
                        yield k, rows
        finally:
            con.close()

    return StreamPlan([s.name for s in stages], totals, pending, entering, windows)
