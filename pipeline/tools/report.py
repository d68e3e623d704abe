"""`discomv audit --html report.html --card DATASET_CARD.md`: a self-contained HTML report (plots
embedded as PNG data URIs, no external assets) and a Markdown dataset card, from the audit table.

A plot whose stage has not run yet is shown as a placeholder saying which command fills it, so the
report never pretends to data it doesn't have.
"""

from __future__ import annotations

import base64
import html
import io
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.tools.audit import summarize

PAPER = {"similarity_input": 0.91, "similarity_kept": 0.61, "vocal_success": 0.95, "keep_rate": 2.2 / 15.3}


@dataclass
class Plot:
    name: str
    title: str
    needs: tuple[str, ...]  # columns that must hold data
    fill_with: str  # command that produces the data
    draw: Callable[[Any, list[dict[str, Any]], dict[str, Any]], None] | None  # None: stage not built yet
    level: str = "video"  # video: one row per candidate; clip: one row per clip


def _values(rows: list[dict[str, Any]], column: str, where: Callable[[dict], bool] = lambda r: True) -> list:
    return [r[column] for r in rows if r.get(column) is not None and where(r)]


def draw_funnel(ax, rows, ctx) -> None:
    funnel = ctx["summary"]["funnel"]
    ax.bar(["candidates", *funnel], [len(rows), *funnel.values()], color="#4c72b0")
    ax.set_ylabel("videos (clips after the fan-out)")
    ax.tick_params(axis="x", labelrotation=30)


def draw_reasons(ax, rows, ctx) -> None:
    counts: Counter = Counter()
    for (stage, _status, cls, source), n in ctx["summary"]["reasons"].items():
        counts[(f"{stage}: {cls}", str(source))] += n
    labels = sorted({k[0] for k in counts})
    sources = sorted({k[1] for k in counts})
    left = [0] * len(labels)
    for source in sources:
        widths = [counts[(label, source)] for label in labels]
        ax.barh(labels, widths, left=left, label=source)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("videos")
    ax.legend(title="source")


def draw_durations(ax, rows, ctx) -> None:
    ax.hist([d / 60 for d in _values(rows, "media_duration_s")], bins=20, color="#55a868")
    ax.set_xlabel("minutes (downloaded videos)")


def draw_similarity(ax, rows, ctx) -> None:
    values = _values(rows, "frame_similarity")
    ax.hist(values, bins=20, range=(min(0.0, *values), 1.0), color="#8172b2")
    threshold = ctx.get("threshold")
    if threshold is not None:
        ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold}")
        ax.legend()
    ax.set_xlabel("mean pairwise frame similarity")


def draw_vocals(ax, rows, ctx) -> None:
    ax.hist(_values(rows, ctx["vocal_column"]), bins=20, color="#c44e52")
    ax.set_xlabel(f"{ctx['vocal_column']} (vocal energy / mix after separation)")


def draw_alignment(ax, rows, ctx) -> None:
    ax.hist(_values(rows, "alignment_score"), bins=20, range=(0, 1), color="#937860")
    ax.set_xlabel("fraction of video beats matched by a music beat (per clip)")


def draw_shards(ax, rows, ctx) -> None:
    counts = Counter((r["split"], r["shard"]) for r in rows if r.get("shards_status") == "ok" and r.get("shard"))
    splits = sorted({split for split, _ in counts})
    for split in splits:
        names = sorted(shard for s, shard in counts if s == split)
        ax.bar(names, [counts[(split, n)] for n in names], label=split)
    ax.set_ylabel("samples")
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(title="split")


PLOTS = [
    Plot("funnel", "Candidates through the stages", ("key",), "make ingest", draw_funnel),
    Plot("reasons", "Drops and failures by reason class and source", ("key",), "make ingest", draw_reasons),
    Plot("durations", "Durations of downloaded videos", ("media_duration_s",), "make download", draw_durations),
    Plot("similarity", "Intra-video frame similarity", ("frame_similarity",), "make filter", draw_similarity),
    Plot("vocal_residual", "Vocal residual after separation", ("vocal_ratio_after",), "make separate", draw_vocals),
    Plot("beat_alignment", "Beat-alignment score per clip", ("alignment_score",), "make beats", draw_alignment, "clip"),
    Plot("shards", "Samples per shard and split", ("shard",), "make shards", draw_shards, "clip"),
]


def render_png(plot: Plot, rows: list[dict[str, Any]], ctx: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=90)
    plot.draw(ax, rows, ctx)
    ax.set_title(plot.title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def thumbnail_strip(video_path: str, frames: int = 4, height: int = 72) -> str | None:
    """A horizontal strip of `frames` evenly spaced thumbnails (ffmpeg), as base64 PNG."""
    if not video_path or not Path(video_path).is_file():
        return None
    vf = f"fps=1/3,scale=-2:{height},tile={frames}x1"
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", video_path, "-vf", vf, "-frames:v", "1",
           "-f", "image2pipe", "-vcodec", "png", "-"]
    out = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    return base64.b64encode(out.stdout).decode() if out.returncode == 0 and out.stdout else None


def gallery(rows: list[dict[str, Any]], threshold: float | None, per_side: int = 4) -> str:
    scored = [r for r in rows if r.get("frame_similarity") is not None and r.get("video_path")]
    if not scored or threshold is None:
        return _placeholder("gallery", "Kept and dropped videos near the threshold", "make filter")
    near = sorted(scored, key=lambda r: abs(r["frame_similarity"] - threshold))
    parts = ['<figure id="plot-gallery"><figcaption>Kept and dropped videos nearest the threshold</figcaption>']
    for label, side in (("kept", lambda r: r["frame_similarity"] <= threshold),
                        ("dropped", lambda r: r["frame_similarity"] > threshold)):
        parts.append(f"<h3>{label}</h3>")
        for r in [r for r in near if side(r)][:per_side]:
            strip = thumbnail_strip(r["video_path"])
            img = f'<img alt="frames of {html.escape(r["key"])}" src="data:image/png;base64,{strip}">' if strip else ""
            parts.append(f'<div class="thumb">{img}<p>{html.escape(r["key"])} — similarity '
                         f'{r["frame_similarity"]:.3f} — {html.escape(str(r.get("title") or ""))}</p></div>')
    parts.append("</figure>")
    return "\n".join(parts)


def _placeholder(name: str, title: str, command: str) -> str:
    return (f'<figure id="plot-{name}" class="empty"><figcaption>{html.escape(title)}</figcaption>'
            f"<p>No data yet: run <code>{html.escape(command)}</code>.</p></figure>")


def paper_rows(rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    def mean(values: list[float]) -> str:
        return f"{sum(values) / len(values):.2f}" if values else "—"

    sims = _values(rows, "frame_similarity")
    kept = _values(rows, "frame_similarity", lambda r: r.get("filter_status") == "ok")
    removed = _values(rows, "vocals_removed")
    n = summary["candidates"]
    kept_n = summary["funnel"].get("filter")
    return [
        ("mean intra-video similarity, input", mean(sims), f"{PAPER['similarity_input']}"),
        ("mean intra-video similarity, kept", mean(kept), f"{PAPER['similarity_kept']}"),
        ("vocal removal success", f"{sum(removed) / len(removed):.0%}" if removed else "—", "~95%"),
        ("keep rate (kept / candidates)", f"{kept_n / n:.1%}" if kept_n is not None and n else "—",
         f"{PAPER['keep_rate']:.1%} (2.2M of 15.3M)"),
    ]


def write_html(table: pa.Table, path: Path, threshold: float | None = None, clips: pa.Table | None = None) -> Path:
    rows = table.to_pylist()
    clip_rows = clips.to_pylist() if clips is not None else []
    summary = summarize(table)
    ctx = {"summary": summary, "threshold": threshold, "vocal_column": "vocal_ratio_after"}
    body = [f"<h1>discomv audit</h1><p>{summary['candidates']} candidates, generated "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.</p>"]
    body.append("<h2>Against the paper</h2><table><tr><th>measure</th><th>this run</th><th>paper</th></tr>")
    body += [f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in paper_rows(rows, summary)]
    body.append("</table><h2>Where each candidate ends</h2><table><tr><th>terminal state</th><th>count</th></tr>")
    body += [f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in sorted(summary["terminal"].items())]
    body.append("</table>")
    for plot in PLOTS:
        source = clips if plot.level == "clip" else table
        has_data = source is not None and all(
            c in source.column_names and source.column(c).null_count < source.num_rows for c in plot.needs)
        if not has_data or plot.draw is None:
            body.append(_placeholder(plot.name, plot.title, plot.fill_with))
            continue
        png = render_png(plot, clip_rows if plot.level == "clip" else rows, ctx)
        body.append(f'<figure id="plot-{plot.name}"><img alt="{html.escape(plot.title)}" '
                    f'src="data:image/png;base64,{png}"><figcaption>{html.escape(plot.title)}</figcaption></figure>')
    body.append(gallery(rows, threshold))
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>discomv audit</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .6em}figure{margin:1.5em 0}.empty{color:#777}"
        ".thumb{display:inline-block;margin:.3em}</style></head><body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def write_card(table: pa.Table, path: Path) -> Path:
    """A Markdown dataset card: sources, licenses, counts, models and weights used, limitations."""
    rows = table.to_pylist()
    summary = summarize(table)
    lines = ["# Dataset card (generated by `discomv audit --card`)", "", "## Sources", ""]
    lines += [f"- {s}: {n} candidates" for s, n in Counter(r.get("source") for r in rows).most_common()]
    lines += ["", "## Licenses", ""]
    lines += [f"- {lic}: {n}" for lic, n in Counter(r.get("license") for r in rows).most_common()]
    lines += ["", "## Counts", "", "| stage | ok |", "|---|---|", f"| candidates | {summary['candidates']} |"]
    lines += [f"| {stage} | {n} |" for stage, n in summary["funnel"].items()]
    lines += ["", "## Models and weights", ""]
    weights = Counter(
        (stage, r.get(f"{stage}_weights")) for r in rows for stage in summary["funnel"]
        if r.get(f"{stage}_weights") not in (None, "none")
    )
    models = Counter((c, r[c]) for r in rows for c in r if c.endswith(("model", "weights_sha256")) and r[c])
    lines += [f"- {stage}: weights={w} ({n} rows)" for (stage, w), n in weights.items()] or ["- no model-based stage has run"]
    lines += [f"- {c}: {v} ({n} rows)" for (c, v), n in models.items()]
    if any(w == "random-init" for (_, w) in weights):
        lines += ["", "**Warning: some outputs were made with randomly initialised models (`random-init`);"
                  " they are for testing the pipeline, not for training.**"]
    reasons = Counter(f"{stage} {status}: {cls}" for (stage, status, cls, _), n in summary["reasons"].items()
                      for _ in range(n))
    lines += ["", "## Known limitations", "",
              "- Licenses are as listed by the inputs; YouTube videos default to "
              "`youtube-standard (unverified)`: check before redistribution.",
              "- Drops and failures: " + (", ".join(f"{k} ×{v}" for k, v in reasons.most_common(8)) or "none") + "."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

