"""Shared fixtures: media made at test time with ffmpeg (once per session), a 127.0.0.1 server, an
embedded Ray, and factories for configs and input files. Tests take these as fixtures; nothing imports
this module."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config
from pipeline.tools import synth
from pipeline.tools.localserver import LocalServer
from stages import load_config_dict


class SyntheticMedia:
    """Every synthetic file of the session, made once by the synth function and arguments that
    describe it; a module asks for it at its own path and gets a hard link to the one copy."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[str, Path] = {}

    def __call__(self, at: Path, make: Callable[..., Path], *args: Any, **kwargs: Any) -> Path:
        recipe = f"{make.__name__}{args!r}{sorted(kwargs.items())!r}{at.suffix}"
        if recipe not in self.made:
            name = hashlib.sha1(recipe.encode()).hexdigest()[:16] + at.suffix
            self.made[recipe] = make(self.root / name, *args, **kwargs)
        at.parent.mkdir(parents=True, exist_ok=True)
        if not at.exists():
            os.link(self.made[recipe], at)
        return at


@pytest.fixture(scope="session")
def synthetic_media(tmp_path_factory: pytest.TempPathFactory) -> SyntheticMedia:
    """synthetic_media(path, synth.make_video, "moving", duration_s=6, ...) -> path: made once per session."""
    return SyntheticMedia(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_media: SyntheticMedia) -> Path:
    """Short synthetic videos and broken files, served by `server`."""
    d = tmp_path_factory.mktemp("media")
    synthetic_media(d / "moving.mp4", synth.make_video, "moving", duration_s=6, seed=1, size="160x120")
    synthetic_media(d / "still.mp4", synth.make_video, "still", duration_s=6, seed=2, size="160x120")
    synthetic_media(d / "audio_only.mp4", synth.make_audio_only, duration_s=4)
    synthetic_media(d / "video_only.mp4", synth.make_video_only, duration_s=4)
    synth.make_truncated(d / "moving.mp4", d / "truncated.mp4")
    (d / "page.html").write_text("<html><body>not a video</body></html>")
    (d / "empty.mp4").write_bytes(b"")
    return d


@pytest.fixture(scope="session")
def server(media_dir: Path):
    with LocalServer(media_dir) as srv:
        yield srv


@pytest.fixture(scope="session")
def ray_local():
    from pipeline.runner import ensure_ray

    ensure_ray(2)
    yield


@pytest.fixture(scope="session")
def make_config():
    """make_config(tmp_path, inputs, **sections) -> Config: random weights, roots under tmp_path,
    downloads allowed from 127.0.0.1 with short backoffs; `sections` override per stage."""
    return _make_config


def _make_config(tmp_path: Path, inputs: list[str], **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "run": {
            "manifest_root": str(tmp_path / "manifests"),
            "media_root": str(tmp_path / "media"),
            "shard_root": str(tmp_path / "shards"),
            "weights": "random",
            "flush_rows": 4,
        },
        "ingest": {"inputs": inputs},
        "download": {"allow_private_hosts": True, "backoff_s": 0.05, "backoff_max_s": 0.2, "concurrency": 2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return load_config_dict(raw)


@pytest.fixture(scope="session")
def make_stage(make_config):
    """make_stage(tmp_path, name, inputs=["unused"], **options) -> the stage, built the way the runner
    builds it (options checked), from a test config with `options` as its section."""

    def build(tmp_path: Path, name: str, inputs: list[str] | None = None, **options: Any) -> Any:
        cfg = make_config(tmp_path, ["unused"] if inputs is None else inputs, **{name: options})
        return cfg.registry[name](cfg.stage(name), cfg.run)

    return build


@pytest.fixture(scope="module")
def bench_module():
    """bench_module("run_all") -> bench/run_all.py loaded as a module, with bench/ on sys.path (the
    scripts import each other from there) until the test module ends."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    loaded: list[str] = []

    def load(name: str) -> Any:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        loaded.append(spec.name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
    sys.path.remove(str(bench))


@pytest.fixture(scope="session")
def unavailable():
    """unavailable(reason): what a test does when this machine lacks something it needs (chromium, a
    mount): skip here, but fail on CI, whose .ci/run provides it, so a skip never hides a CI failure."""

    def stop(reason: str) -> None:
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)

    return stop


@pytest.fixture(scope="session")
def write_lines():
    """write_lines(path, lines) -> str: a text input file, one line each."""
    return _write_lines


def _write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def copy_many():
    """copy_many(source, folder, n) -> names: n copies of one video, for load and fault tests."""
    return _copy_many


def _copy_many(source: Path, folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        target = folder / f"v{i:03d}.mp4"
        if not target.exists():
            shutil.copyfile(source, target)
        names.append(f"{folder.name}/{target.name}")
    return names


@dataclass(frozen=True)
class DemoRun:
    out: Path
    port: int
    returncode: int
    stdout: str
    stderr: str

    def again(self) -> subprocess.CompletedProcess:
        """The same demo run again (same folder, same port, so the same keys)."""
        return subprocess.run(_demo_command(self.out, self.port), capture_output=True, text=True, timeout=900,
                              check=False)


def _demo_command(out: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "pipeline.tools.cli", "demo", "--out", str(out), "--videos", "4", "--no-progress",
            "--port", str(port)]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`discomv demo --videos 4` once per session, in a subprocess on a free port, with what it printed:
    the CLI test checks the run, the browse tests browse its output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = subprocess.run(_demo_command(out, port), capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return DemoRun(out, port, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1 (its own process) with the AWS_* variables pointing
    at it for this process and every process it starts; stopped at the end of the session."""
    from pipeline.tools.s3server import MotoServer

    with MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator on 127.0.0.1 (its own process, in memory) with STORAGE_EMULATOR_HOST
    pointing gcsfs at it for this process and every process it starts; stopped at the end of the
    session (pipeline/tools/gcsserver.py)."""
    from pipeline.tools.gcsserver import GcsEmulator

    with GcsEmulator() as server:
        yield server
