from pathlib import Path

import pytest

from pipeline.tools.cli import main
from stages import STAGES


def test_help_lists_every_stage_and_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in STAGES:
        assert name in out
    assert "run.manifest_root" in out


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_documents_its_options(stage, capsys):
    import dataclasses

    with pytest.raises(SystemExit):
        main([stage, "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(STAGES[stage].Config):
        assert f"{stage}.{f.name}" in out


def test_bad_config_exits_2_naming_the_key(capsys):
    assert main(["download", "--set", "download.concurency=3"]) == 2
    assert "download.concurency" in capsys.readouterr().err


def test_bad_input_exits_2_with_message(tmp_path: Path, capsys):
    code = main(["ingest", "--set", f"ingest.inputs=[{tmp_path / 'missing.parquet'}]",
                 "--set", f"run.manifest_root={tmp_path}"])
    assert code == 2 and "no such file" in capsys.readouterr().err



def test_run_checks_every_stage_before_any_work(tmp_path: Path, capsys):
    """A bad option of a late stage fails `run` before ingest writes anything, naming the key."""
    urls = tmp_path / "urls.txt"
    urls.write_text("https://example.com/a.mp4\n")
    code = main(["run", "--set", f"ingest.inputs=[{urls}]", "--set", f"run.manifest_root={tmp_path / 'm'}",
                 "--set", "tokens.model=encodec_64khz", "--set", "run.weights=random", "--no-progress"])
    assert code == 2 and "tokens.model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").rglob("*.parquet"))

def test_demo_runs_offline_end_to_end(demo_run):
    out = demo_run.stdout + demo_run.stderr
    assert demo_run.returncode == 0, out[-3000:]
    demo = demo_run.out
    assert f"manifests: {demo / 'manifests'}" in out
    for line in ("ingest", "download", "not_found", "unsupported", "truncated", "no_audio_stream", "bad_url",
                 "dropped: static", "shards: processed", "checked against the manifest: OK"):
        assert line in out, line
    assert list((demo / "shards").glob("train-*.tar")) and (demo / "runs" / "tiny" / "log.csv").is_file()
    from pipeline.tools.report import PLOTS

    report = (demo / "report.html").read_text()  # a full run: every plot has data, none is a placeholder
    for plot in PLOTS:
        assert f'<figure id="plot-{plot.name}"><img alt=' in report, plot.name
    assert "No data yet" not in report and 'alt="frames of ' in report
    assert "random-init" in (demo / "DATASET_CARD.md").read_text()
    rerun = demo_run.again()
    again = rerun.stdout + rerun.stderr
    for stage in STAGES:
        assert f"{stage}: nothing to do" in again, stage


def test_missing_weights_fail_once_on_the_driver_with_the_fix(tmp_path: Path, capsys):
    """A pretrained run without weights stops before any worker starts, saying how to get them."""
    from datetime import datetime, timezone

    from pipeline.manifest import ManifestStore, full_schema

    store = ManifestStore(tmp_path / "m")
    now = datetime.now(timezone.utc)
    for stage in ("ingest", "download"):
        store.append(stage, full_schema(STAGES[stage].schema), [{
            "key": "url_1", "status": "ok", "reason": "", "stage_version": "1", "params_hash": "p",
            "weights": "none", "run_id": "r", "finished_at": now, "elapsed_s": 0.0, "node": "n"}])
    code = main(["filter", "--set", f"run.manifest_root={tmp_path / 'm'}", "--set", f"run.models_root={tmp_path / 'models'}",
                 "--set", "run.weights=pretrained", "--set", "filter.embedder=clip", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no weights for open_clip/ViT-B-32" in err and "make weights" in err
    assert store.latest("filter") is None  # nothing was recorded as failed for a config problem
