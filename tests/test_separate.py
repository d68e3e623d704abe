"""separate: Demucs vocal removal on fixtures made here (ffmpeg music, an espeak-ng voice on top).

Models are randomly initialised (offline): the real htdemucs architecture once on a short clip,
small HTDemucs variants elsewhere. The stage is called directly, without the runner or `filter`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from pipeline.models.demucs import build_random_htdemucs, save_repo_model
from pipeline.tools import synth
from stages.separate import Separate, SeparateConfig

REPO = Path(__file__).resolve().parents[1]


def make_music(path: Path, seconds: float, rate: int = 44100, channels: int = 2, seed: int = 1) -> Path:
    layout = "stereo" if channels == 2 else "mono"
    synth.ffmpeg("-f", "lavfi", "-i", f"aevalsrc=0.5*({synth.music_expr(seed)}):s={rate}:c={layout}:d={seconds}",
                 str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, synthetic_media) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("separate_inputs")
    files = {
        "voice": synthetic_media(d / "voice.mp4", synth.make_video, "voice", duration_s=4, seed=3, size="160x120"),
        "music": make_music(d / "music.flac", 4.0),
        "mono8k": make_music(d / "mono8k.wav", 5.0, rate=8000, channels=1),
        "long": make_music(d / "long.flac", 8.0),
        "no_audio": synthetic_media(d / "no_audio.mp4", synth.make_video_only, duration_s=2),
    }
    synth.ffmpeg("-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo", "-t", "3", str(d / "silent.wav"))
    files["silent"] = d / "silent.wav"
    files["empty"] = d / "empty.mp4"
    files["empty"].write_bytes(b"")
    return files


def make_stage(tmp_path: Path, weights: str = "random", models_root: str = "models", **options: Any) -> Separate:
    run = SimpleNamespace(media_root=str(tmp_path / "media"), models_root=models_root, weights=weights)
    stage = Separate(SeparateConfig(**options), run)
    stage.setup()
    return stage


def row(key: str, path: Path) -> dict[str, Any]:
    return {"key": key, "video_path": str(path), "media_duration_s": 1.0, "frame_similarity": 0.5}


def decode(path: Path, rate: int) -> np.ndarray:
    """(frames, 2) float32, decoded as the stage decodes."""
    from pipeline.media.audio import stream_audio

    return np.concatenate(list(stream_audio(path, rate, 2)))


def test_real_htdemucs_architecture_on_voice_clip(tmp_path: Path, inputs: dict[str, Path]) -> None:
    # one 7.8 s segment (the full architecture costs ~10-25 s per segment on 2 busy cores)
    stage = make_stage(tmp_path, random_init="htdemucs", shifts=0, skip_instrumental=False, residual_segments=0)
    assert sum(p.numel() for p in stage.bag.models[0].parameters()) > 40_000_000  # the real htdemucs size
    [result] = stage.process([row("yt_voice", inputs["voice"])])

    assert result.status == "ok", result.reason
    m = result.metrics
    table = pa.Table.from_pylist([m], schema=Separate.schema)  # every column, right types
    # random init: no weights file to hash; residual check switched off here (tested below)
    nullable = ["vocal_ratio_after", "vocals_removed", "weights_sha256"]
    assert [c for c in Separate.schema.names if table[c][0].as_py() is None] == nullable
    assert stage.weights_stamp == "random-init"
    assert m["instrumental_path"] == str(tmp_path / "media" / "instrumental" / "yt_voice.flac")

    info = sf.info(m["instrumental_path"])
    frames = len(decode(inputs["voice"], 44100))
    assert (info.samplerate, info.channels, info.frames, info.format) == (44100, 2, frames, "FLAC")
    assert m["audio_duration_s"] == pytest.approx(frames / 44100)
    audio, _ = sf.read(m["instrumental_path"], dtype="float32")
    assert np.isfinite(audio).all() and np.abs(audio).max() > 1e-4

    info32 = sf.info(m["instrumental32k_path"])
    assert (info32.samplerate, info32.channels, info32.format) == (32000, 1, "FLAC")
    assert abs(info32.frames - frames * 32000 / 44100) <= 32
    assert 0 < m["vocal_ratio_before"] < 1
    assert m["segments_separated"] == 1
    assert not list((tmp_path / "media").rglob("*.part"))


def test_edge_inputs_each_end_ok_or_with_a_reason(tmp_path: Path, inputs: dict[str, Path]) -> None:
    stage = make_stage(tmp_path, random_init="tiny", skip_instrumental=False, max_duration_s=7.0,
                       batch_segments=3, residual_segments=0)
    keys = ["empty", "silent", "mono8k", "no_audio", "long", "music"]
    rows = [row(k, inputs[k]) for k in keys] + [row("missing", tmp_path / "nope.mp4")]
    results = {r.key: r for r in stage.process(rows)}

    assert [r.key for r in stage.process([])] == []
    assert set(results) == set(keys) | {"missing"}
    assert (results["empty"].status, results["empty"].reason.split(":")[0]) == ("failed", "corrupt")
    assert (results["silent"].status, results["silent"].reason.split(":")[0]) == ("dropped", "silent")
    assert (results["no_audio"].status, results["no_audio"].reason.split(":")[0]) == ("failed", "no_audio_stream")
    assert (results["long"].status, results["long"].reason.split(":")[0]) == ("failed", "too_long")
    assert (results["missing"].status, results["missing"].reason.split(":")[0]) == ("failed", "missing_input")
    for key, seconds in (("mono8k", 5.0), ("music", 4.0)):
        result = results[key]
        assert result.status == "ok", result.reason
        info = sf.info(result.metrics["instrumental_path"])
        assert (info.samplerate, info.channels) == (44100, 2)
        assert abs(info.frames - seconds * 44100) <= 64
    outputs = sorted(p.name for p in (tmp_path / "media" / "instrumental").iterdir())
    assert outputs == ["mono8k.flac", "music.flac"]  # nothing for failures, no partial files
    assert not list(Path(stage.scratch.name).iterdir())  # scratch audio cleaned up


def test_streamed_separation_equals_demucs_apply_model(tmp_path: Path, inputs: dict[str, Path]) -> None:
    """Segments, overlap-add, shifts and normalisation match one whole-track apply_model call."""
    import demucs.apply
    import torch

    stage = make_stage(tmp_path, random_init="tiny8k", shifts=2, skip_instrumental=False, residual_segments=0,
                       batch_segments=3)
    [result] = stage.process([row("k", inputs["long"])])
    ours, _ = sf.read(result.metrics["instrumental_path"], dtype="float32")

    data = decode(inputs["long"], stage.bag.samplerate)
    wav = torch.from_numpy(data.T.copy())
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    rng = random.Random(zlib.crc32(b"0:k"))  # the stage's shift offsets for key "k", seed 0
    original = demucs.apply.random.randint
    demucs.apply.random.randint = rng.randint
    try:
        out = demucs.apply.apply_model(stage.bag, ((wav - mean) / std)[None], shifts=2, overlap=0.25)
    finally:
        demucs.apply.random.randint = original
    expected = (out[0] * std + mean)[:3].sum(0).numpy().T
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() < 1e-5  # 24-bit FLAC quantisation is 6e-8
    assert result.metrics["segments_separated"] == 2 * 2  # 2 shifts × 2 segments of 8 s


def test_instrumental_probe_keeps_original_and_thresholds_apply(tmp_path: Path, inputs: dict[str, Path]) -> None:
    kept = make_stage(tmp_path / "a", random_init="tiny8k", instrumental_threshold=1e9, probe_segments=2)
    [result] = kept.process([row("k", inputs["music"])])
    m = result.metrics
    assert (m["instrumental_source"], m["vocals_removed"], m["segments_separated"]) == (True, True, 1)
    written, _ = sf.read(m["instrumental_path"], dtype="float32")
    assert sf.info(m["instrumental_path"]).samplerate == kept.bag.samplerate == 8000
    original = decode(inputs["music"], 8000)
    assert np.abs(written - original).max() < 1e-4  # the original audio, not a separation

    separated = make_stage(tmp_path / "b", random_init="tiny8k", instrumental_threshold=0.0,
                           vocals_removed_threshold=0.0, residual_segments=1)
    [result] = separated.process([row("k", inputs["music"])])
    m = result.metrics
    assert (m["instrumental_source"], m["vocals_removed"]) == (False, False)
    assert m["segments_separated"] == 1 + 1 + 1  # probe, separation, residual check
    assert 0 < m["vocal_ratio_after"] and 0 < m["vocal_ratio_before"]
    written, _ = sf.read(m["instrumental_path"], dtype="float32")
    assert np.abs(written - original).max() > 1e-3


@pytest.mark.parametrize("fmt", ["th", "safetensors"])
def test_pretrained_weights_load_from_a_demucs_repo_folder(tmp_path: Path, inputs: dict[str, Path], fmt: str) -> None:
    import torch

    torch.manual_seed(7)
    model = build_random_htdemucs("tiny8k")
    weights = save_repo_model(model, tmp_path / "models" / "demucs" / "htdemucs", "htdemucs", "cafe0001", fmt)
    stage = make_stage(tmp_path, weights="pretrained", models_root=str(tmp_path / "models"),
                       skip_instrumental=False, residual_segments=0)
    loaded = stage.bag.models[0].state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())
    assert stage.weights_stamp == "pretrained"
    assert len(stage.weights_sha256) == 64
    [result] = stage.process([row("k", inputs["music"])])
    assert result.status == "ok" and result.metrics["weights_sha256"] == stage.weights_sha256
    assert weights.exists()


def test_th_weights_that_need_pickle_are_refused(tmp_path: Path) -> None:
    import torch

    folder = tmp_path / "models" / "demucs" / "htdemucs"
    folder.mkdir(parents=True)
    torch.save({"klass": subprocess.Popen, "args": [], "kwargs": {}, "state": {}}, folder / "bad.th")
    (folder / "htdemucs.yaml").write_text("models: [bad]\n")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        make_stage(tmp_path, weights="pretrained", models_root=str(tmp_path / "models"))


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from types import SimpleNamespace
    from stages.separate import Separate, SeparateConfig
    media, source = sys.argv[1], sys.argv[2]
    run = SimpleNamespace(media_root=media, models_root="models", weights="random")
    stage = Separate(SeparateConfig(random_init="tiny8k", shifts=1, skip_instrumental=False, batch_segments=2), run)
    stage.setup()
    [result] = stage.process([{"key": "k", "video_path": source}])
    # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would report the parent's peak
    hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")]
    peak_mib = int(hwm[0].split()[1]) / 1024
    print(json.dumps({"status": result.status, "reason": result.reason, "peak_mib": peak_mib,
                      "duration_s": result.metrics.get("audio_duration_s")}))
    """
)


def make_tone(path: Path, seconds: float) -> Path:
    """A chord with a pulse: like make_music, but an hour of it renders in seconds."""
    synth.ffmpeg("-f", "lavfi", "-i", f"sine=f=220:r=22050:d={seconds}", "-f", "lavfi", "-i",
                 f"sine=f=330:r=22050:d={seconds}", "-filter_complex",
                 "amix=inputs=2,volume='0.6+0.4*sin(2*PI*2*t)':eval=frame", str(path))
    return path


def peak_rss_separating(tmp_path: Path, source: Path) -> dict[str, Any]:
    # glibc's growing mmap threshold and per-thread arenas make peak RSS wander by tens of MiB
    # between identical runs; fixing them leaves the peak to what the code actually holds.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / source.stem), str(source)],
                         capture_output=True, text=True, cwd=REPO, env=env, check=False, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_is_bounded_on_a_long_input(tmp_path: Path) -> None:
    """A 10-minute track peaks at the same RSS as a 1-minute one: audio streams through scratch
    disk and finished samples go straight to FLAC. (An 8 kHz small HTDemucs keeps this fast on
    2 cores; holding the track, as one apply_model call does, would add its input, normalised copy
    and 4 stems: 6 × 600 s × 8000 × 2 ch × 4 B ≈ 220 MiB.)"""
    short = peak_rss_separating(tmp_path, make_tone(tmp_path / "one_minute.flac", 60.0))
    long = peak_rss_separating(tmp_path, make_tone(tmp_path / "ten_minutes.flac", 600.0))
    assert (short["status"], long["status"]) == ("ok", "ok"), (short, long)
    assert long["duration_s"] == pytest.approx(600.0, abs=0.01)
    assert long["peak_mib"] - short["peak_mib"] < 50, (short, long)
