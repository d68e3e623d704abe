"""One-screen summary of the manifests: per stage, counts per status and the top failure reasons."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.config import Config
from pipeline.manifest import ManifestStore
from pipeline.runner import reason_class


def stage_counts(store: ManifestStore, stage: str) -> dict[str, Any]:
    table = store.latest(stage)
    if table is None:
        return {"rows": 0, "status": Counter(), "reasons": Counter(), "random_init": 0}
    rows = table.select(["status", "reason", "weights"]).to_pylist()
    return {
        "rows": len(rows),
        "status": Counter(r["status"] for r in rows),
        "reasons": Counter(
            f"{r['status']}: {reason_class(r['reason'])}" for r in rows if r["status"] != "ok"
        ),
        "random_init": sum(r["weights"] == "random-init" for r in rows),
    }


def print_status(cfg: Config) -> None:
    from rich.console import Console
    from rich.table import Table

    from stages import STAGES

    store = ManifestStore(cfg.run.manifest_root)
    table = Table(title=f"discomv manifests in {store.root.resolve()}")
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
    slowest = max(ran, key=lambda s: s.seconds)
    share = slowest.seconds / sum(s.seconds for s in ran)
    hint = ("its workers were busy: add workers or GPUs there" if (slowest.busy or 0) >= 0.6
            else "its workers often waited: look at its input, batch size or start-up")
    console.print(f"{slowest.stage} bound this run ({share:.0%} of the time); {hint}")
