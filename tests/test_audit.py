"""Audit over a real pipeline run: counts add up, SQL works, lineage lists every stage."""

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.manifest import ManifestStore
from pipeline.runner import run_stage
from pipeline.tools import audit
from pipeline.tools.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, server, ray_local, make_config, write_lines):
    tmp = tmp_path_factory.mktemp("audit")
    urls = write_lines(tmp / "urls.txt", [
        f"{server.url}/moving.mp4", f"{server.url}/still.mp4", f"{server.url}/status/404/x.mp4",
        f"{server.url}/audio_only.mp4", "ftp://example.org/a.mp4", "not-an-id",
    ])
    cfg = make_config(tmp, [urls])
    for stage in ("ingest", "download"):
        run_stage(stage, cfg, progress=False)
    return cfg, ManifestStore(cfg.run.manifest_root)


def test_every_candidate_has_exactly_one_terminal_state(run):
    _, store = run
    table = audit.audit_table(store)
    assert table.num_rows == 6 == store.latest("ingest").num_rows
    assert len(set(table.column("key").to_pylist())) == 6
    summary = audit.summarize(table)
    assert sum(summary["terminal"].values()) == summary["candidates"] == 6
    assert summary["terminal"]["failed at ingest"] == 2
    assert summary["terminal"]["failed at download"] == 2
    assert summary["funnel"]["download"] == 2


def test_sql_over_the_joined_table(run):
    _, store = run
    result = audit.query(store, "select download_status, count(*) as n from audit "
                                "where ingest_status = 'ok' group by 1 order by 1").to_pylist()
    assert result == [{"download_status": "failed", "n": 2}, {"download_status": "ok", "n": 2}]
    per_stage = audit.query(store, "select count(*) as n from download").to_pylist()
    assert per_stage == [{"n": 4}]


def test_lineage_lists_every_stage(run):
    _, store = run
    key = store.ok_keys("download")[0]
    stages = [row["stage"] for row in audit.lineage(store, key)]
    assert stages == ["ingest", "download"]


def test_cli_audit_writes_parquet_and_prints_lineage(run, tmp_path: Path, capsys):
    cfg, store = run
    out = tmp_path / "audit.parquet"
    base = ["--set", f"run.manifest_root={cfg.run.manifest_root}"]
    assert main(["audit", *base, "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 6
    printed = capsys.readouterr().out
    assert "where each candidate ends" in printed and "not_found" in printed
    key = store.ok_keys("download")[0]
    assert main(["audit", *base, "--key", key]) == 0
    lineage = capsys.readouterr().out
    assert "ingest ok" in lineage and "download ok" in lineage and "video_path" in lineage
    assert main(["audit", *base, "--key", "nope"]) == 1


def test_cli_audit_report_and_card_from_the_written_table(run, tmp_path: Path):
    """`discomv audit --html --card` (what `make audit` and the demo run) reads the Parquet it wrote."""
    cfg, _ = run
    base = ["--set", f"run.manifest_root={cfg.run.manifest_root}"]
    html, card = tmp_path / "report.html", tmp_path / "CARD.md"
    assert main(["audit", *base, "--out", str(tmp_path / "a.parquet"), "--html", str(html), "--card", str(card)]) == 0
    assert "failed at download" in html.read_text() and card.read_text().strip()


class _Balance(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.figures: dict[str, str] = {}
        self._figure: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self._figure = attrs.get("id")
            self.figures[self._figure] = ""
        if tag == "img" and self._figure:
            self.figures[self._figure] = attrs.get("src", "")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")
        if tag == "figure":
            self._figure = None


def test_html_report_is_valid_and_holds_each_plot(run, tmp_path: Path):
    from pipeline.tools import report

    _, store = run
    path = report.write_html(audit.audit_table(store), tmp_path / "report.html", threshold=0.7)
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    parser = _Balance()
    parser.feed(text)
    assert parser.errors == [] and parser.stack == []
    assert set(parser.figures) == {f"plot-{p.name}" for p in report.PLOTS} | {"plot-gallery"}
    for name in ("funnel", "reasons", "durations"):  # the stages that ran have real, decodable plots
        src = parser.figures[f"plot-{name}"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("similarity", "vocal_residual", "beat_alignment", "shards", "gallery"):  # not run: said so
        assert parser.figures[f"plot-{name}"] == ""
    assert "No data yet: run <code>make beats</code>" in text
    assert "http://" not in text.replace("http://127.0.0.1", "")  # self-contained: no external assets


def test_dataset_card(run, tmp_path: Path):
    from pipeline.tools import report

    _, store = run
    card = report.write_card(audit.audit_table(store), tmp_path / "card.md").read_text()
    assert "## Sources" in card and "urls: 6 candidates" in card
    assert "| download | 2 |" in card
    assert "download failed: not_found ×1" in card


def test_report_renders_in_headless_chromium(run, tmp_path: Path, unavailable):
    from pipeline.tools import report

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        unavailable("chromium not installed here; .ci/run installs it (apt: chromium)")
    _, store = run
    page = report.write_html(audit.audit_table(store), tmp_path / "report.html", threshold=0.7)
    artifacts = Path(__file__).resolve().parent.parent / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "audit-report.png"
    shot.unlink(missing_ok=True)
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
        capture_output=True, timeout=120,
    )
    log = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, log[-2000:]
    assert shot.is_file() and shot.stat().st_size > 20_000
    assert [line for line in log.splitlines() if "CONSOLE" in line] == []  # the page logged no errors
