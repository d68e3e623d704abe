"""`discomv audit`: every stage's manifest joined into one table (latest row per key), where each
candidate ends (exactly one terminal state), SQL over it with duckdb, and one key's lineage."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.manifest import COMMON_NAMES, ManifestStore
from pipeline.runner import reason_class

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


def _joined(store: ManifestStore, names: list[str], where: str = "") -> pa.Table | None:
    import duckdb

    names = [n for n in names if store.latest(n) is not None]
    if not names:
        return None
    con = duckdb.connect()
    for name in names:
        table = store.latest(name)
        renamed = [f"{name}_{c}" if c in PREFIXED else c for c in table.column_names]
        con.register(f"m_{name}", table.rename_columns(renamed))
    joins = " ".join(f"LEFT JOIN m_{n} USING (key)" for n in names[1:])
    return con.sql(f"SELECT * FROM m_{names[0]} {joins} {where} ORDER BY key").to_arrow_table()


def clip_table(store: ManifestStore) -> pa.Table | None:
    """One row per clip: every clip-level stage's latest row, joined on the clip key."""
    _, clip_stages = levels()
    return _joined(store, clip_stages, "WHERE key <> video_key")


def audit_table(store: ManifestStore) -> pa.Table | None:
    """One row per candidate: every video-level stage's latest row (common columns prefixed by the
    stage name), per-stage counts of its ok clips, and `terminal` — where the candidate ends:
    `<status> at <stage>`, `pending at <stage>`, or `ok through <last stage>`."""
    video_stages, clip_stages = levels()
    joined = _joined(store, video_stages)
    if joined is None:
        return None
    clips = clip_table(store)
    clip_rows = clips.to_pylist() if clips is not None else []
    per_video: dict[str, list[dict[str, Any]]] = {}
    for row in clip_rows:
        per_video.setdefault(row["video_key"], []).append(row)
    video_rows = store.latest_rows(clip_stages[0]) if clip_stages else {}
    for stage in clip_stages:
        counts = [sum(r.get(f"{stage}_status") == "ok" for r in per_video.get(k, [])) for k in joined["key"].to_pylist()]
        joined = joined.append_column(f"{stage}_clips_ok", pa.array(counts, pa.int64()))
    statuses = {n: joined.column(f"{n}_status").to_pylist() for n in video_stages if f"{n}_status" in joined.column_names}
    terminal = []
    for i, key in enumerate(joined["key"].to_pylist()):
        state = _video_terminal(i, statuses, video_stages)
        if state is None:
            state = _clip_terminal(video_rows.get(key), per_video.get(key, []), clip_stages)
        terminal.append(state)
    return joined.append_column("terminal", pa.array(terminal, pa.string()))


def _video_terminal(i: int, statuses: dict[str, list[Any]], order: list[str]) -> str | None:
    for name in order:
        status = statuses[name][i] if name in statuses else None
        if status is None:
            return f"pending at {name}"
        if status != "ok":
            return f"{status} at {name}"
    return None if order else "ok"


def _clip_terminal(video_row: dict | None, clips: list[dict[str, Any]], order: list[str]) -> str:
    """A candidate past the fan-out ends where the furthest of its clips stops."""
    if not order:
        return "ok through separate"
    if video_row is not None and video_row["status"] != "ok":
        return f"{video_row['status']} at {order[0]}"
    for name in order:
        status = [c.get(f"{name}_status") for c in clips]
        if "ok" in status:
            continue
        if not clips or None in status:
            return f"pending at {name}"
        return f"{'failed' if 'failed' in status else 'dropped'} at {name}"
    return f"ok through {order[-1]}"


def query(store: ManifestStore, sql: str) -> pa.Table:
    """Run SQL with `audit` (one row per candidate), `clips_audit` (one row per clip) and each
    stage's latest manifest (by stage name) as views."""
    import duckdb

    con = duckdb.connect()
    table = audit_table(store)
    if table is None:
        raise ValueError(f"no manifests under {store.root}: run a stage first")
    con.register("audit", table)
    clips = clip_table(store)
    if clips is not None:
        con.register("clips_audit", clips)
    for name in stage_names():
        latest = store.latest(name)
        if latest is not None:
            con.register(name, latest)
    return con.sql(sql).to_arrow_table()


def lineage(store: ManifestStore, key: str) -> list[dict[str, Any]]:
    """Every row ever written for `key`, stage by stage, oldest first (history included)."""
    out = []
    for name in stage_names():
        table = store.read(name)
        if table is None:
            continue
        rows = table.filter(pc.equal(table["key"], key)).to_pylist()
        for row in sorted(rows, key=lambda r: r["finished_at"]):
            out.append({"stage": name, **row})
    return out


def summarize(table: pa.Table) -> dict[str, Any]:
    """Funnel counts, hours and failure reasons by class and source."""
    rows = table.to_pylist()
    names = [n for n in stage_names() if f"{n}_status" in table.column_names]
    funnel = {n: sum(r[f"{n}_status"] == "ok" for r in rows) for n in names}
    funnel.update({n if n == "clips" else f"{n} (clips)": sum(r[f"{n}_clips_ok"] for r in rows)
                   for n in stage_names() if f"{n}_clips_ok" in table.column_names})
    hours = {
        "listed (ingest)": sum(r.get("duration_s") or 0 for r in rows) / 3600,
        "downloaded": sum(r.get("media_duration_s") or 0 for r in rows if r.get("download_status") == "ok") / 3600,
        "kept (filter)": sum(r.get("media_duration_s") or 0 for r in rows if r.get("filter_status") == "ok") / 3600,
    }
    reasons: Counter = Counter()
    for r in rows:
        for n in names:
            status = r[f"{n}_status"]
            if status in ("failed", "dropped"):
                reasons[(n, status, reason_class(r[f"{n}_reason"]), r.get("source"))] += 1
    return {
        "candidates": len(rows),
        "funnel": funnel,
        "terminal": Counter(r["terminal"] for r in rows),
        "hours": hours,
        "reasons": reasons,
    }


def print_audit(store: ManifestStore, out: Path | None) -> pa.Table | None:
    from rich.console import Console
    from rich.table import Table

    table = audit_table(store)
    console = Console()
    if table is None:
        console.print(f"no manifests under {store.root}: run a stage first")
        return None
    s = summarize(table)
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
        import pyarrow.parquet as pq

        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
        console.print(f"audit table: {out} ({table.num_rows} rows × {table.num_columns} columns)")
    return table
