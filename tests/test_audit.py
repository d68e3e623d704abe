"""Audit over a real pipeline run: counts add up, SQL works, lineage lists every stage."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import make_config, write_lines

from pipeline import audit
from pipeline.cli import main
from pipeline.manifest import ManifestStore
from pipeline.runner import run_stage


@pytest.fixture(scope="module")
def run(tmp_path_factory, server, ray_local):
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
