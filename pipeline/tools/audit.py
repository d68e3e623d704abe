"""`discomv audit`: every stage's manifest joined into one table (latest row per key), where each
candidate ends (exactly one terminal state), SQL over it with duckdb, and one key's lineage."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.manifest import COMMON_NAMES, ManifestStore, conform, connect

PREFIXED = sorted(COMMON_NAMES - {"key"})  # status, reason, ... become <stage>_status, ...


def stage_names() -> list[str]:
    from stages import STAGES

    return list(STAGES)


def levels() -> tuple[list[str], list[str]]:
    """(video-level stages, clip-level stages): the fan-out stage starts the clip level."""
    from stages import STAGES

    names = list(STAGES)
    cut = next((i for i, n in enumerate(names) if STAGES[n].fans_out), len(names))
    return names[:cut], names[cut:]


def _latest_view(store: ManifestStore, name: str) -> str:
    """The stage's latest rows with its common columns prefixed by the stage name."""
    schema = store.schema(name)
    cols = ", ".join(f'"{c}" AS "{name}_{c}"' if c in PREFIXED else f'"{c}"' for c in schema.names)
    return f"(SELECT {cols} FROM {store.latest_sql(name, schema.names)})"


def _joined_sql(store: ManifestStore, names: list[str], where: str = "") -> str | None:
    names = [n for n in names if store.parts(n)]
    if not names:
        return None
    joins = " ".join(f"LEFT JOIN {_latest_view(store, n)} USING (key)" for n in names[1:])
    return f"(SELECT * FROM {_latest_view(store, names[0])} {joins} {where})"


def clip_sql(store: ManifestStore) -> str | None:
    _, clip_stages = levels()
    return _joined_sql(store, clip_stages, "WHERE key <> video_key")


def clip_table(store: ManifestStore) -> pa.Table | None:
    """One row per clip: every clip-level stage's latest row, joined on the clip key."""
    return _by_key(clip_sql(store))


def _by_key(sql: str | None) -> pa.Table | None:
    """A relation's rows as one Arrow table sorted by key (None for no relation)."""
    if sql is None:
        return None
    with connect() as con:
        return con.sql(f"SELECT * FROM {sql} ORDER BY key").to_arrow_table()


def audit_sql(store: ManifestStore) -> str | None:
    """SQL for one row per candidate: every video-level stage's latest row (common columns
    prefixed by the stage name), per-stage counts of its ok clips, and `terminal` — where the
    candidate ends: `<status> at <stage>`, `pending at <stage>`, or `ok through <last stage>`.
    Joins and counts run in duckdb over the part files, never as Python rows."""
    video_stages, clip_stages = levels()
    joined = _joined_sql(store, video_stages)
    if joined is None:
        return None
    clips = clip_sql(store)
    clip_cols = set() if clips is None else {c for c in _columns(store, clip_stages) if c.endswith("_status")}
    aggs = ["count(*) AS n"]
    for s in clip_stages:
        col = f'"{s}_status"' if f"{s}_status" in clip_cols else "NULL::VARCHAR"
        aggs += [f"count_if({col} = 'ok') AS \"{s}_ok\"", f"bool_or({col} IS NULL) AS \"{s}_null\"",
                 f"bool_or({col} = 'failed') AS \"{s}_failed\""]
    per_video = f"(SELECT video_key, {', '.join(aggs)} FROM {clips} GROUP BY video_key)" if clips else None
    first = store.latest_sql(clip_stages[0], ["key", "status"]) if clip_stages else None
    tail = "'ok through separate'" if not clip_stages else f"'ok through {clip_stages[-1]}'"
    for s in reversed(clip_stages):
        tail = (f"CASE WHEN coalesce(c.\"{s}_ok\", 0) > 0 THEN {tail} WHEN c.n IS NULL OR c.\"{s}_null\" "
                f"THEN 'pending at {s}' WHEN c.\"{s}_failed\" THEN 'failed at {s}' ELSE 'dropped at {s}' END")
    if first:
        tail = f"CASE WHEN v.status IS NOT NULL AND v.status <> 'ok' THEN v.status || ' at {clip_stages[0]}' ELSE {tail} END"
    present = set(_columns(store, video_stages))
    whens = []
    for name in video_stages:
        col = f'j."{name}_status"'
        if f"{name}_status" not in present:
            whens.append(f"WHEN true THEN 'pending at {name}'")
            continue
        whens += [f"WHEN {col} IS NULL THEN 'pending at {name}'", f"WHEN {col} <> 'ok' THEN {col} || ' at {name}'"]
    terminal = f"CASE {' '.join(whens)} ELSE {tail} END" if whens else "'ok'"
    counts = ", ".join(f'coalesce(c."{s}_ok", 0)::BIGINT AS "{s}_clips_ok"' for s in clip_stages)
    return (
        f"(SELECT j.*{', ' + counts if counts else ''}, {terminal} AS terminal FROM {joined} j "
        + (f"LEFT JOIN {per_video} c ON c.video_key = j.key " if per_video else
           "LEFT JOIN (SELECT NULL::VARCHAR AS video_key, NULL::BIGINT AS n"
           + "".join(f', 0 AS "{s}_ok", NULL::BOOLEAN AS "{s}_null", NULL::BOOLEAN AS "{s}_failed"' for s in clip_stages)
           + ") c ON false ")
        + (f"LEFT JOIN {first} v ON v.key = j.key" if first and store.parts(clip_stages[0]) else
           "LEFT JOIN (SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS status) v ON false")
        + ")"
    )


def _columns(store: ManifestStore, names: list[str]) -> list[str]:
    """Column names the joined view of these stages has."""
    out: list[str] = []
    for n in names:
        schema = store.schema(n)
        if schema is not None:
            out += [f"{n}_{c}" if c in PREFIXED else c for c in schema.names]
    return out


def audit_table(store: ManifestStore) -> pa.Table | None:
    """The audit relation (audit_sql) as one Arrow table, sorted by key."""
    return _by_key(audit_sql(store))


def query(store: ManifestStore, sql: str) -> pa.Table:
    """Run SQL with `audit` (one row per candidate), `clips_audit` (one row per clip) and each
    stage's latest manifest (by stage name) as views."""
    audit = audit_sql(store)
    if audit is None:
        raise ValueError(f"no manifests under {store.root}: run a stage first")
    with connect() as con:
        _views(con, store, audit)
        return con.sql(sql).to_arrow_table()


def _views(con: Any, store: ManifestStore, audit: str) -> None:
    con.execute(f"CREATE TEMP VIEW audit AS SELECT * FROM {audit}")
    clips = clip_sql(store)
    if clips is not None:
        con.execute(f"CREATE TEMP VIEW clips_audit AS SELECT * FROM {clips}")
    for name in stage_names():
        schema = store.schema(name)
        if schema is not None:
            con.execute(f'CREATE TEMP VIEW "{name}" AS SELECT * FROM {store.latest_sql(name, schema.names)}')


def lineage(store: ManifestStore, key: str) -> list[dict[str, Any]]:
    """Every row ever written for `key`, stage by stage, oldest first (history included)."""
    out = []
    with connect() as con:
        for name in stage_names():
            schema = store.schema(name)
            if schema is None:
                continue
            files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in store.parts(name))
            cols = ", ".join(f'"{c}"' for c in schema.names)
            table = con.sql(
                f"SELECT {cols} FROM read_parquet([{files}], union_by_name=true, filename=true, file_row_number=true) "
                "WHERE key = $key ORDER BY filename, file_row_number", params={"key": key}).to_arrow_table()
            rows = conform(table, schema).to_pylist()
            for row in sorted(rows, key=lambda r: r["finished_at"]):
                out.append({"stage": name, **row})
    return out


def summarize(table: pa.Table | AuditFile | str) -> dict[str, Any]:
    """Funnel counts, hours and failure reasons by class and source, of an audit table (the Parquet
    file `print_audit` wrote, or the SQL of one), counted in duckdb."""
    with connect() as con:
        if isinstance(table, AuditFile):
            table = "read_parquet('" + str(table.path).replace("'", "''") + "')"
        elif isinstance(table, pa.Table):
            con.register("audit_rows", table)
            table = "audit_rows"
        names_present = [d[0] for d in con.sql(f"SELECT * FROM {table} LIMIT 0").description]
        return _summarize(con, table, set(names_present))


def _summarize(con: Any, rel: str, present: set[str]) -> dict[str, Any]:
    names = [n for n in stage_names() if f"{n}_status" in present]
    clip_names = [n for n in stage_names() if f"{n}_clips_ok" in present]

    def col(name: str) -> str:
        return f'"{name}"' if name in present else "NULL"

    sums = [f"count_if(\"{n}_status\" = 'ok')" for n in names]
    sums += [f'coalesce(sum("{n}_clips_ok"), 0)' for n in clip_names]
    sums += [f"coalesce(sum(coalesce({col('duration_s')}, 0)), 0)",
             f"coalesce(sum(coalesce({col('media_duration_s')}, 0)) FILTER ({col('download_status')} = 'ok'), 0)",
             f"coalesce(sum(coalesce({col('media_duration_s')}, 0)) FILTER ({col('filter_status')} = 'ok'), 0)",
             "count(*)"]
    values = con.execute(f"SELECT {', '.join(sums)} FROM {rel}").fetchall()[0]
    funnel = {n: int(v) for n, v in zip(names, values, strict=False)}
    funnel.update({n if n == "clips" else f"{n} (clips)": int(v)
                   for n, v in zip(clip_names, values[len(names):], strict=False)})
    listed, downloaded, kept, candidates = values[-4:]
    terminal = Counter(dict(con.execute(f"SELECT terminal, count(*) FROM {rel} GROUP BY 1").fetchall()))
    reasons: Counter = Counter()
    if names:
        parts = " UNION ALL ".join(
            f"SELECT {i} AS si, '{n}' AS stage, \"{n}_status\" AS status, "
            f"split_part(coalesce(\"{n}_reason\", ''), ':', 1) AS class, {col('source')} AS source, key "
            f"FROM {rel} WHERE \"{n}_status\" IN ('failed', 'dropped')" for i, n in enumerate(names))
        for stage, status, cls, source, n in con.execute(
            f"SELECT stage, status, class, source, count(*) FROM ({parts}) GROUP BY ALL "
            "ORDER BY min(key), min(si)").fetchall():
            reasons[(stage, status, cls, source)] = n
    return {
        "candidates": candidates,
        "funnel": funnel,
        "terminal": terminal,
        "hours": {"listed (ingest)": listed / 3600, "downloaded": downloaded / 3600, "kept (filter)": kept / 3600},
        "reasons": reasons,
    }


class AuditFile:
    """The audit table as written to Parquet, read only when a report asks for it (at DISCO-10M
    scale it is gigabytes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __getattr__(self, name: str) -> Any:
        import pyarrow.parquet as pq

        return getattr(pq.read_table(self.path), name)


def print_audit(store: ManifestStore, out: Path | None) -> pa.Table | AuditFile | None:
    from rich.console import Console
    from rich.table import Table

    sql = audit_sql(store)
    console = Console()
    if sql is None:
        console.print(f"no manifests under {store.root}: run a stage first")
        return None
    with connect() as con:
        con.execute(f"CREATE TEMP VIEW audit AS SELECT * FROM {sql}")
        present = {d[0] for d in con.sql("SELECT * FROM audit LIMIT 0").description}
        s = _summarize(con, "audit", present)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            # In no particular order: sorting 15.3M rows of ~40 columns does not fit the 1 GB cap
            # (duckdb cannot spill the sort's wide payload), and readers query it, never scan it in order.
            con.execute("SET preserve_insertion_order = false")
            con.execute(f"COPY (SELECT * FROM audit) TO '{str(tmp).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
            tmp.replace(out)
    funnel = Table(title=f"discomv audit — {s['candidates']} candidates")
    funnel.add_column("stage")
    funnel.add_column("ok", justify="right")
    funnel.add_column("of candidates", justify="right")
    for name, ok in s["funnel"].items():
        funnel.add_row(name, str(ok), f"{ok / max(1, s['candidates']):.1%}")
    console.print(funnel)
    ends = Table(title="where each candidate ends (sums to the candidates)")
    ends.add_column("terminal state")
    ends.add_column("count", justify="right")
    for state, n in sorted(s["terminal"].items()):
        ends.add_row(state, str(n))
    ends.add_row("[b]total[/b]", f"[b]{sum(s['terminal'].values())}[/b]")
    console.print(ends)
    reasons = Table(title="drops and failures by class and source")
    for col in ("stage", "status", "class", "source", "count"):
        reasons.add_column(col, justify="right" if col == "count" else "left")
    for (stage, status, cls, source), n in s["reasons"].most_common():
        reasons.add_row(stage, status, cls, str(source), str(n))
    console.print(reasons)
    console.print("hours: " + ", ".join(f"{k} {v:.2f} h" for k, v in s["hours"].items()))
    if out:
        console.print(f"audit table: {out} ({s['candidates']} rows × {len(present)} columns)")
        return AuditFile(out)
    return audit_table(store)
