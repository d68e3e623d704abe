"""The Stage.prepare hook: CPU tasks upstream of the workers that run process(), arrays carried
across Ray without pickle, no row lost when prepare fails, and the filter stage run this way."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline.manifest import ManifestStore, full_schema
from pipeline.options import ConfigError
from pipeline.runner import run_stage
from pipeline.stage import Result, Row, Stage
from pipeline.tools import synth
from pipeline.worker import pack_row, prepare_safely, unpack_rows
from stages import STAGES, load_config_dict
from stages.filter import Filter

SIZE = "160x120"


class Toy(Stage):
    name = "toy"
    upstream = None
    version = "1"
    schema = pa.schema([])

    def prepare(self, rows: list[Row]) -> list[Row]:
        if any(r["key"] == "bad" for r in rows):
            raise ValueError("cannot prepare bad")
        return [{**r, "pixels": np.full((r["n"], 2, 3), r["n"], np.uint8), "seen": True} for r in rows]


def test_prepared_arrays_cross_as_npz_and_come_back_equal() -> None:
    rows = [
        {"key": "a", "frames": np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3), "meta": {"decoder": "decord"}},
        {"key": "b", "frames": np.zeros((0, 0, 0, 3), np.uint8), "scores": np.array([0.5, 0.25])},
        {"key": "c", "plain": 1},
    ]
    packed = [pack_row(row) for row in rows]
    assert packed[2][1] == b""  # no arrays: nothing to load
    back = unpack_rows({"row": np.array([p[0] for p in packed], dtype=object),
                        "arrays": np.array([p[1] for p in packed], dtype=object)})
    for original, restored in zip(rows, back, strict=True):
        assert restored.keys() == original.keys()
        for name, value in original.items():
            if isinstance(value, np.ndarray):
                assert restored[name].dtype == value.dtype and np.array_equal(restored[name], value)
            else:
                assert restored[name] == value
    with pytest.raises(ValueError, match="pickle"):
        pack_row({"key": "x", "objects": np.array([{"a": 1}], dtype=object)})


def test_a_row_that_cannot_be_prepared_goes_on_unprepared() -> None:
    rows = [{"key": "one", "n": 1}, {"key": "bad", "n": 2}, {"key": "three", "n": 3}]
    packed = prepare_safely(Toy(None, None), rows)
    back = unpack_rows({"row": [p[0] for p in packed], "arrays": [p[1] for p in packed]})
    assert [r["key"] for r in back] == ["one", "bad", "three"]
    assert back[1] == {"key": "bad", "n": 2}  # as it came: process() will prepare it and record the failure
    assert back[0]["pixels"].shape == (1, 2, 3) and back[2]["pixels"].shape == (3, 2, 3)
    assert back[2]["seen"] is True


class TracedFilter(Filter):
    """The filter, recording which process prepared each row and which processed it; rows keyed
    `boom` raise in prepare (in the task, and again in process)."""

    schema = pa.schema([*Filter.schema, ("prepared_in", pa.int64()), ("processed_in", pa.int64())])

    def prepare_one(self, row: Row) -> Row:
        if row["key"] == "boom":
            raise RuntimeError("prepare exploded")
        return {**super().prepare_one(row), "prepared_in": os.getpid()}

    def process(self, rows: list[Row]) -> list[Result]:
        prepared_in = {r["key"]: r.get("prepared_in") for r in rows}
        results = super().process(rows)
        for result in results:
            result.metrics.update(prepared_in=prepared_in[result.key], processed_in=os.getpid())
        return results


@pytest.fixture(scope="module")
def filter_inputs(tmp_path_factory: pytest.TempPathFactory, synthetic_media) -> dict[str, str]:
    d = tmp_path_factory.mktemp("prepare_media")
    paths = {
        "moving": synthetic_media(d / "moving.mp4", synth.make_video, "moving", duration_s=6, seed=1, size=SIZE),
        "still": synthetic_media(d / "still.mp4", synth.make_video, "still", duration_s=6, seed=2, size=SIZE),
        "slideshow": synthetic_media(d / "slideshow.mp4", synth.make_video, "slideshow", duration_s=6, seed=3, size=SIZE),
        "short": synthetic_media(d / "short.mp4", synth.make_video, "moving", duration_s=1, seed=4, size=SIZE),
    }
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    paths["corrupt"] = d / "corrupt.mp4"
    paths["missing"] = d / "gone.mp4"
    paths["boom"] = paths["moving"]
    return {key: str(path) for key, path in paths.items()}


def downloaded(root: Path, inputs: dict[str, str]) -> None:
    """A download manifest listing the files as downloaded, so the filter's inputs can include
    files download would have rejected."""
    now = datetime.now(timezone.utc)
    rows = [{"key": key, "status": "ok", "reason": "", "stage_version": "1", "params_hash": "p", "weights": "none",
             "run_id": "r", "finished_at": now, "elapsed_s": 0.0, "node": "n", "video_path": path}
            for key, path in inputs.items()]
    ManifestStore(root).append("download", full_schema(STAGES["download"].schema), rows)


def filter_config(root: Path, **filter_options: Any) -> Any:
    return load_config_dict({
        "run": {"manifest_root": str(root), "weights": "random", "flush_rows": 2},
        "filter": {"embedder": "pixels", "batch_size": 2, **filter_options},
    })


def test_filter_decodes_in_cpu_tasks_upstream_of_its_actors(
    tmp_path: Path, filter_inputs: dict[str, str], ray_local: None
) -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers can't import tests/
    root = tmp_path / "manifests"
    downloaded(root, filter_inputs)
    cfg = filter_config(root, decode_cpus=1, concurrency=1, num_cpus=1)
    assert Filter(cfg.stage("filter"), cfg.run).resources.prepare_cpus == 1

    summary = run_stage("filter", cfg, stage_cls=TracedFilter, progress=False)

    rows = ManifestStore(root).read("filter").to_pylist()  # every part file, not only the latest rows
    assert sorted(r["key"] for r in rows) == sorted(filter_inputs)  # each row once
    assert summary.processed == len(filter_inputs)
    by_key = {r["key"]: r for r in rows}
    expected = {
        "moving": ("ok", ""), "still": ("dropped", "static: "), "slideshow": ("dropped", "similar_frames: "),
        "short": ("failed", "too_short: "), "corrupt": ("failed", "unreadable: "),
        "missing": ("failed", "missing_file: "), "boom": ("failed", "error: RuntimeError: prepare exploded"),
    }
    for key, (status, reason) in expected.items():
        assert by_key[key]["status"] == status, (key, by_key[key]["reason"])
        assert by_key[key]["reason"].startswith(reason), (key, by_key[key]["reason"])
    for key in expected.keys() - {"boom"}:  # decoded in a task, scored in the actor: two processes
        row = by_key[key]
        assert row["prepared_in"] is not None and row["prepared_in"] != row["processed_in"], key
    assert by_key["moving"]["decoder"] == "decord" and by_key["moving"]["frames_read"] == 16


def test_actors_that_leave_no_cpu_for_the_prepare_tasks_fail_fast(
    tmp_path: Path, filter_inputs: dict[str, str], ray_local: None
) -> None:
    root = tmp_path / "manifests"
    downloaded(root, {"moving": filter_inputs["moving"]})
    cfg = filter_config(root, decode_cpus=1, concurrency=2, num_cpus=1)  # the embedded Ray has 2 CPUs
    with pytest.raises(ConfigError, match="filter.concurrency"):
        run_stage("filter", cfg, progress=False)
    assert ManifestStore(root).latest("filter") is None


def test_auto_concurrency_fills_the_cluster_but_not_past_the_batches(ray_local: None) -> None:
    import ray

    from pipeline.placement import actors_that_fit
    from pipeline.stage import AUTO, Resources

    cpus = int(ray.cluster_resources()["CPU"])
    assert actors_that_fit(Resources(num_cpus=1, concurrency=AUTO), batches=100) == cpus
    assert actors_that_fit(Resources(num_cpus=1, concurrency=AUTO), batches=1) == 1
    assert actors_that_fit(Resources(num_cpus=1, concurrency=AUTO, prepare_cpus=1), batches=100) == max(1, cpus - 1)
    assert actors_that_fit(Resources(num_cpus=1, num_gpus=1, concurrency=AUTO), batches=100) == 1  # no GPU: one
    assert STAGES["separate"].Config().concurrency == AUTO
    from pipeline.placement import cpus_each

    assert cpus_each(Resources(num_cpus=1, concurrency=AUTO), actors=1) == cpus  # one batch: every core
    assert cpus_each(Resources(num_cpus=1, concurrency=AUTO), actors=cpus) == 1
    assert cpus_each(Resources(num_cpus=1, num_gpus=1, concurrency=AUTO), actors=1) == 1
    memory = ray.cluster_resources()["memory"]  # actors are never packed past the cluster's memory
    assert actors_that_fit(Resources(num_cpus=0.1, concurrency=AUTO, memory_bytes=int(memory // 2)), batches=100) == 2
    assert STAGES["features"](STAGES["features"].Config(), None).resources.memory_bytes > 4 * 2**30


def test_a_gpu_stage_on_a_cluster_without_gpus_fails_fast(ray_local: None) -> None:
    from pipeline.placement import check_gpus_exist
    from pipeline.stage import Resources

    with pytest.raises(ConfigError, match=r"separate\.num_gpus=1 but the Ray cluster has 0 GPUs"):
        check_gpus_exist("separate", Resources(num_gpus=1))
    check_gpus_exist("separate", Resources(num_gpus=0))
