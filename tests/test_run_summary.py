"""The run's summary says per stage how fast it went and how busy its workers were, and which stage
bound the run."""

from collections import Counter

from pipeline.runner import RunSummary
from pipeline.tools.summary import print_run


def summary(stage: str, processed: int, seconds: float, busy_s: float, workers: int) -> RunSummary:
    return RunSummary(stage=stage, processed=processed, seconds=seconds, busy_s=busy_s, workers=workers,
                      statuses=Counter(ok=processed))


def test_busy_is_worker_seconds_over_workers_times_wall_seconds():
    s = summary("filter", processed=40, seconds=10.0, busy_s=15.0, workers=2)
    assert s.rows_per_s == 4.0
    assert s.busy == 0.75  # 15 worker-seconds of 2 workers × 10 s
    assert "2 workers 75% busy" in s.line()
    assert summary("x", 1, 0.0, 1.0, 2).busy is None and summary("x", 1, 1.0, 1.0, 0).busy is None


def test_the_run_table_names_the_stage_that_bound_the_run(capsys):
    print_run([summary("download", 100, 20.0, 30.0, 4), summary("separate", 10, 60.0, 58.0, 1),
               RunSummary(stage="clips")])
    out = capsys.readouterr().out
    assert "separate bound this run (75% of the time); its workers were busy" in out
    assert "clips" not in out  # nothing processed: not a row
