"""One-screen summary of the manifests: per stage, counts per status and the top failure reasons."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.config import Config
from pipeline.manifest import ManifestStore, connect


def stage_counts(store: ManifestStore, stage: str) -> dict[str, Any]:
    """Counts of the stage's latest rows, grouped in duckdb over its parts (reasons in the order a
    key-sorted scan first meets them, as `most_common` breaks ties by)."""
    sql = store.latest_sql(stage, ["key", "status", "reason", "weights"])
    if sql is None:
        return {"rows": 0, "status": Counter(), "reasons": Counter(), "random_init": 0}
    with connect() as con:
        groups = con.execute(
            "SELECT status, CASE WHEN status <> 'ok' THEN status || ': ' || split_part(coalesce(reason, ''), ':', 1) "
            "END AS reason, count(*), count_if(weights = 'random-init'), min(key) AS first FROM " + sql +
            " GROUP BY ALL ORDER BY first"
        ).fetchall()
    status: Counter = Counter()
    reasons: Counter = Counter()
    for st, reason, n, _, _ in groups:
        status[st] += n
        if reason is not None:
            reasons[reason] += n
    return {"rows": sum(status.values()), "status": status, "reasons": reasons,
            "random_init": sum(g[3] for g in groups)}


def print_status(cfg: Config) -> None:
    from rich.console import Console
    from rich.table import Table

    from stages import STAGES

    store = ManifestStore(cfg.run.manifest_root)
    table = Table(title=f"discomv manifests in {store.root if store.remote else store.root.resolve()}")
    for col in ("stage", "rows", "ok", "dropped", "failed", "reasons (top 5)"):
        table.add_column(col, justify="left" if col in ("stage", "reasons (top 5)") else "right")
    for name in STAGES:
        c = stage_counts(store, name)
        if not c["rows"]:
            continue
        reasons = ", ".join(f"{r} ×{n}" for r, n in c["reasons"].most_common(5))
        label = name + (r" \[random-init]" if c["random_init"] else "")
        table.add_row(
            label, str(c["rows"]), str(c["status"]["ok"]), str(c["status"]["dropped"]),
            str(c["status"]["failed"]), reasons or "-",
        )
    Console().print(table)


def print_run(summaries: list[Any]) -> None:
    """After a run: per stage, rows/s and how busy its workers were, and the stage that bound the run
    (the longest), so a user sees where to add workers or GPUs."""
    from rich.console import Console
    from rich.table import Table

    ran = [s for s in summaries if s.processed]
    if not ran:
        return
    table = Table(title="this run, per stage")
    for col in ("stage", "rows", "seconds", "rows/s", "workers", "busy"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in ran:
        table.add_row(s.stage, str(s.processed), f"{s.seconds:.1f}", f"{s.rows_per_s:.2f}", str(s.workers or "-"),
                      f"{s.busy:.0%}" if s.busy is not None else "-")
    console = Console()
    console.print(table)
    streamed = [s for s in ran if s.streamed]
    if streamed:  # its stages ran at once, over the same seconds: the busiest one bounds it
        busiest = max(streamed, key=lambda s: s.busy or 0.0)
        hint = ("add workers or GPUs there" if (busiest.busy or 0) >= 0.6
                else "no stage was busy most of the time: the run waited on its input or on start-up")
        console.print(f"{busiest.stage} was the busiest stage of this streaming run ({busiest.busy or 0:.0%}); {hint}")
        return
    slowest = max(ran, key=lambda s: s.seconds)
    share = slowest.seconds / sum(s.seconds for s in ran)
    hint = ("its workers were busy: add workers or GPUs there" if (slowest.busy or 0) >= 0.6
            else "its workers often waited: look at its input, batch size or start-up")
    console.print(f"{slowest.stage} bound this run ({share:.0%} of the time); {hint}")
