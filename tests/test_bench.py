"""bench/run_all.py's table writer: marker replacement, failed-script rows, merging with --only.
No heavy benchmark runs here: scripts are tiny stand-ins written to a temp bench folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def run_all(bench_module):
    return bench_module("run_all")


README = """# x

## Performance

intro

<!-- bench:begin -->
| stage | command | old |
|---|---|---|
| filter | `python bench/filter.py` | 1 |
<!-- bench:end -->

after
"""


def row(stage: str, ratio: float | None = 2.0, note: str = "") -> dict:
    return {"stage": stage, "ours": f"{stage} fast | piped", "baseline": "slow", "ratio": ratio, "note": note,
            "machine": "test box"}


def test_table_replaces_only_between_markers_and_reports_failures(run_all, tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    runs = [run_all.ScriptRun("shards", 0, [row("shards", 0.25, "22% of tar")]),
            run_all.ScriptRun("filter", 3, [], tail=["Traceback", "ValueError: boom", ""]),
            run_all.ScriptRun("train", 0, [])]
    table = run_all.build_table(runs, quick=False, machine="m", readme=readme)
    run_all.write_between_markers(readme, table, "footer line")
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\nintro\n\n<!-- bench:begin -->\n")
    assert text.endswith("footer line\n<!-- bench:end -->\n\nafter\n")
    assert "| stage | command | old |" not in text  # the old-format table is replaced
    lines = run_all.existing_table(readme)
    assert tuple(lines[:2]) == run_all.HEADER
    body = lines[2:]
    assert [run_all.SCRIPT_IN_CELL.search(line).group(1) for line in body] == ["filter", "shards", "train"]
    assert "FAILED: exit code 3" in body[0] and "ValueError: boom" in body[0]
    assert "0.25×; 22% of tar" in body[1] and "shards fast \\| piped" in body[1]
    assert "no result recorded (exit code 0)" in body[2]
    assert all(line.count(" | ") == 4 for line in body[1:])  # five cells: the pipe in a value is escaped


def test_only_keeps_rows_of_scripts_not_run(run_all, tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    first = [run_all.ScriptRun(n, 0, [row(n)]) for n in ("beats", "filter")]
    run_all.write_between_markers(readme, run_all.build_table(first, False, "m", readme), "f1")
    second = [run_all.ScriptRun("filter", 0, [row("filter", 9.0)])]
    run_all.write_between_markers(readme, run_all.build_table(second, False, "m", readme), "f2")
    body = run_all.existing_table(readme)[2:]
    assert len(body) == 2 and "beats" in body[0] and "9.00×" in body[1] and "2.00×" not in body[1]


def test_missing_markers_fail_naming_them(run_all, tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="bench:begin"):
        run_all.check_markers(readme)


def test_run_script_collects_recorded_rows_and_exit_code(run_all, tmp_path: Path, monkeypatch):
    fake = tmp_path / "bench"
    fake.mkdir()
    (fake / "machine.py").write_text((BENCH / "machine.py").read_text())
    (fake / "good.py").write_text(
        "import os, json\n"
        "open(os.environ['BENCH_RESULTS'], 'a').write(json.dumps(" + repr(row("good")) + ") + '\\n')\n")
    (fake / "bad.py").write_text("print('about to fail'); raise SystemExit(4)\n")
    monkeypatch.setattr(run_all, "BENCH", fake)
    assert run_all.discover() == ["bad", "good"]
    assert run_all.discover(["good"]) == ["good"]
    with pytest.raises(SystemExit, match="no benchmark nope"):
        run_all.discover(["nope"])
    good, bad = run_all.run_script("good", quick=False), run_all.run_script("bad", quick=False)
    assert good.exit_code == 0 and good.rows == [json.loads(json.dumps(row("good")))]
    assert bad.exit_code == 4 and bad.rows == [] and bad.tail[-1] == "about to fail"


def test_cpu_meter_counts_a_busy_thread_and_invents_nothing_unmeasured(bench_module):
    import time

    machine = bench_module("machine")
    with machine.CpuMeter() as busy:
        until = time.monotonic() + 0.6
        while time.monotonic() < until:
            pass
    assert busy.busy_s >= 0.4  # this thread alone kept one core busy; other load only adds
    assert 0 < busy.fraction <= 1.05
    assert "cores busy" in busy.describe()
    untouched = machine.CpuMeter()
    assert "not measured" in untouched.describe()  # never entered: no figures invented
    assert "not measured" in untouched.ceiling("a runner")
    assert f"{1 / busy.fraction:.2f}×" in busy.ceiling("a runner")
