"""beats: synthetic clicks and picture jumps at known instants, so every expected step is known."""

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.manifest import ManifestStore, full_schema
from pipeline.media.beatgrid import (
    alignment_score,
    beat_overlap,
    beat_weights,
    flow_on_steps,
    load_beats,
    window_peaks,
)
from pipeline.options import ConfigError, RunConfig
from pipeline.tools import synth
from pipeline.worker import StageWorker
from stages.beats import Beats, BeatsConfig
from stages.clips import ClipsConfig, clip_windows

PERIODIC = [0.3 + 0.5 * i for i in range(40)]  # 120 BPM, off the clip edges: steps 15, 40, 65, ...
SPARSE = [3.32, 12.32, 24.0, 33.0]  # one event per clip, the last in the 5 s tail no clip covers


@pytest.fixture(scope="module")
def beat_media(tmp_path_factory: pytest.TempPathFactory, synthetic_media) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("beats_media")
    return {
        "periodic_video": synthetic_media(d / "periodic.mp4", synth.make_jump_video, PERIODIC, 20.0),
        "periodic_audio": synthetic_media(d / "periodic.flac", synth.make_click_track, PERIODIC, 20.0),
        "sparse_video": synthetic_media(d / "sparse.mp4", synth.make_jump_video, SPARSE, 35.0, seed=3),
        "sparse_audio": synthetic_media(d / "sparse.flac", synth.make_click_track, SPARSE, 35.0),
        "still_video": synthetic_media(d / "still.mp4", synth.make_video, "still", duration_s=10.5, seed=2, size="160x120"),
        "moving_video": synthetic_media(d / "moving.mp4", synth.make_video, "moving", duration_s=12, seed=1, size="160x120"),
    }


def clip_row(key: str, video: Path, audio: Path, start_s: float, end_s: float, duration_s: float) -> dict:
    return {
        "key": key, "video_key": key.rsplit("_", 1)[0], "clip_index": int(start_s // 10),
        "start_s": start_s, "end_s": end_s, "padded_s": max(0.0, end_s - duration_s),
        "video_path": str(video), "instrumental32k_path": str(audio), "instrumental_path": str(audio),
        "media_duration_s": duration_s, "fps": 25.0,
    }


def run_stage(tmp_path: Path, rows: list[dict], **options) -> list:
    stage = Beats(BeatsConfig(**options), RunConfig(media_root=str(tmp_path), weights="random"))
    stage.setup()
    return stage.process(rows)


def steps(bits: list[int]) -> np.ndarray:
    return np.flatnonzero(np.asarray(bits))


# ---------------------------------------------------------------- the rules, by hand


def test_window_peaks_hand_example():
    values = [0, 1, 3, 1, 0, 0, 2, 2, 0, 5, 0, 0.4, 0]
    # t=2: 3 beats every neighbour within ±2; t=6/7: a tie, no strict max; t=9: 5; t=11: 0.4 < floor
    assert window_peaks(values, window=2, floor=0.5).tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    # with a wider window the 3 at t=2 still wins, the 2s lose to the 5 at t=9
    assert steps(window_peaks(values, window=4, floor=0.5)).tolist() == [2, 9]


def test_still_flow_has_no_beats():
    assert window_peaks(np.zeros(500), 10, 0.1).sum() == 0
    assert window_peaks(np.full(500, 1.48), 10, 0.1).sum() == 0  # constant, e.g. random-init RAFT
    noise = np.random.default_rng(0).uniform(0, 0.05, 500)  # encoder noise on a still picture
    assert window_peaks(noise, 10, 0.1).sum() == 0


def test_overlap_weights_and_score_hand_example():
    video = np.zeros(60, np.int8)
    video[[10, 30, 50]] = 1
    music = np.zeros(60, np.int8)
    music[[12, 35, 49]] = 1
    overlap = beat_overlap(video, music, tolerance=2)  # 12-10=2 yes, 35-30=5 no, 50-49=1 yes
    assert steps(overlap).tolist() == [10, 50]
    weights = beat_weights(overlap, 0.5)
    assert weights.dtype == np.float32 and weights[10] == weights[50] == 1.5
    assert np.count_nonzero(weights != 1.0) == 2
    assert alignment_score(video, overlap) == pytest.approx(2 / 3)
    assert steps(beat_overlap(video, music, tolerance=5)).tolist() == [10, 30, 50]
    assert beat_overlap(video, music, tolerance=0).sum() == 0
    assert alignment_score(np.zeros(60, np.int8), np.zeros(60, np.int8)) is None


def test_flow_pairs_sit_at_the_midpoint_of_their_frames():
    pairs = np.zeros(95)
    pairs[22] = 4.0  # motion between frames 22 and 23: (22.5 / 9.6) s = step 117.19
    flow = flow_on_steps(pairs, 9.6, 50, 500)
    assert flow.argmax() == 117 and steps(window_peaks(flow, 10, 0.1)).tolist() == [117]


def test_bad_options_fail_fast(tmp_path):
    run = RunConfig(media_root=str(tmp_path), weights="random")
    with pytest.raises(ConfigError, match="beats.flow_method"):
        Beats(BeatsConfig(flow_method="lucas-kanade"), run)
    with pytest.raises(ConfigError, match="beats.frame_size"):
        Beats(BeatsConfig(flow_method="raft_small", frame_size="250x140"), run)


# ---------------------------------------------------------------- synthetic media, end to end


def test_click_track_and_jumps_every_half_second(tmp_path, beat_media):
    """Clicks and picture jumps at 10.3, 10.8, ... s: onsets every 25 steps (±1) from step 15,
    a video beat at each (±3: 9.6 fps frames place a motion to ±2.6 steps), all matched."""
    row = clip_row("per_001", beat_media["periodic_video"], beat_media["periodic_audio"], 10.0, 20.0, 20.0)
    (result,) = run_stage(tmp_path, [row])
    assert result.status == "ok", result.reason
    m = result.metrics
    expected = 15 + 25 * np.arange(20)
    music, video = steps(m["music_beats"]), steps(m["video_beats"])
    assert len(m["music_beats"]) == len(m["video_beats"]) == len(m["beat_weights"]) == 500
    assert len(music) == 20 and np.abs(music - expected).max() <= 1
    assert len(video) == 20 and np.abs(video - expected).max() <= 3
    assert m["alignment_score"] == 1.0 and m["n_matched_beats"] == 20
    assert sorted(set(m["beat_weights"])) == [1.0, 2.0] and sum(w == 2.0 for w in m["beat_weights"]) == 20
    assert m["tempo_bpm"] == pytest.approx(120, abs=3)
    assert (m["frames_read"], m["frames_padded"], m["flow_method"]) == (96, 0, "farneback")


def test_still_video_has_no_video_beats(tmp_path, beat_media):
    row = clip_row("still_000", beat_media["still_video"], beat_media["periodic_audio"], 0.0, 10.0, 10.5)
    (result,) = run_stage(tmp_path, [row])
    assert result.status == "ok", result.reason
    assert result.metrics["n_video_beats"] == 0 and sum(result.metrics["video_beats"]) == 0
    assert result.metrics["n_music_beats"] == 20  # the soundtrack still has its clicks
    assert result.metrics["alignment_score"] is None and set(result.metrics["beat_weights"]) == {1.0}
    assert load_beats(result.metrics["beats_path"])["flow_pairs"].max() < 0.1


def test_35s_video_clips_share_one_timeline(tmp_path, beat_media, monkeypatch):
    """Three clips from clip_windows; each event's click lands on its step (±1) and its jump within
    the 9.6 fps bound (±3) of the same clip; at 12.32 s both land on step 116 ±1. Run through the runner's worker and into a manifest part file (schema).
    12.32 s is a 25 fps frame boundary: the jump shows from frame 308 (12.32 s), between the
    9.6 fps samples at 12.292 s and 12.396 s, whose midpoint is step 117.2 (expected 116)."""
    windows = clip_windows(35.0, ClipsConfig())
    assert windows == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    rows = [clip_row(f"sp_{i:03d}", beat_media["sparse_video"], beat_media["sparse_audio"], s, e, 35.0)
            for i, (s, e) in enumerate(windows)]
    run = RunConfig(media_root=str(tmp_path / "media"), weights="random")
    out = StageWorker(Beats(BeatsConfig(), run)).process_safely(rows)
    assert [r["status"] for r in out] == ["ok", "ok", "ok"], [r["reason"] for r in out]
    for record, (start, _), event in zip(out, windows, SPARSE[:3], strict=True):
        step = round((event - start) * 50)
        assert np.abs(steps(record["music_beats"]) - step).tolist() in ([0], [1])
        assert np.abs(steps(record["video_beats"]) - step).max() <= 3  # the 9.6 fps bound, one beat
        assert record["n_video_beats"] == 1 and record["alignment_score"] == 1.0
    assert steps(out[1]["music_beats"]).tolist() == [116] and steps(out[1]["video_beats"]).tolist() == [117]
    records = [json.loads(json.dumps(r, default=str)) for r in out]  # as the driver receives them
    for record in records:
        record["finished_at"] = datetime.fromisoformat(record["finished_at"])
    ManifestStore(tmp_path / "manifests").append("beats", full_schema(Beats.schema), records)
    table = ManifestStore(tmp_path / "manifests").read("beats")
    assert table.schema.field("music_beats").type == pa.list_(pa.int8())
    assert table.schema.field("beat_weights").type == pa.list_(pa.float32())
    assert table.column("n_video_beats").to_pylist() == [1, 1, 1]


def test_partial_clip_is_padded_and_recorded(tmp_path, beat_media):
    row = clip_row("sp_003", beat_media["sparse_video"], beat_media["sparse_audio"], 30.0, 40.0, 35.0)
    (result,) = run_stage(tmp_path, [row])
    m = result.metrics
    assert result.status == "ok", result.reason
    assert m["frames_padded"] == 48 and m["frames_read"] == 48
    assert m["audio_padded_s"] == pytest.approx(5.0, abs=0.01)
    assert steps(m["music_beats"]).tolist() in ([150], [151])  # the click at 33.0 s
    assert all(s <= 250 for s in steps(m["video_beats"]))  # no beats in the held last frame
    arrays = load_beats(m["beats_path"])
    # repeated identical frames: Farneback leaves < 0.001 px of numerical residue, far below the floor
    assert arrays["flow_magnitude"][260:].max() < 0.01 and arrays["onset_envelope"][260:].max() == 0


def test_artifact_holds_float16_envelopes_without_pickle(tmp_path, beat_media):
    row = clip_row("per_000", beat_media["periodic_video"], beat_media["periodic_audio"], 0.0, 10.0, 20.0)
    (result,) = run_stage(tmp_path, [row])
    path = Path(result.metrics["beats_path"])
    assert path == tmp_path / "beats" / "per_000.npz"
    with np.load(path, allow_pickle=False) as data:
        assert data["onset_envelope"].dtype == data["flow_magnitude"].dtype == np.float16
        assert data["onset_envelope"].shape == data["flow_magnitude"].shape == (500,)
        assert data["music_beats"].dtype == np.int8 and data["flow_pairs"].shape == (95,)
        assert data["music_beats"].tolist() == result.metrics["music_beats"]
        assert "rms" not in data.files  # extras are off by default


def test_unreadable_media_fails_that_clip_only(tmp_path, beat_media):
    text = tmp_path / "page.mp4"
    text.write_text("<html>not a video</html>")
    good = clip_row("per_000", beat_media["periodic_video"], beat_media["periodic_audio"], 0.0, 10.0, 20.0)
    bad_video = {**good, "key": "bad_000", "video_path": str(text)}
    no_audio = {**good, "key": "noaudio_000", "instrumental32k_path": str(tmp_path / "missing.flac")}
    bad_audio = {**good, "key": "badaudio_000", "instrumental32k_path": str(text)}
    results = run_stage(tmp_path, [bad_video, good, no_audio, bad_audio])
    assert [r.status for r in results] == ["failed", "ok", "failed", "failed"]
    assert results[0].reason.startswith("unreadable_video:")
    assert results[2].reason.startswith("missing_input:")
    assert results[3].reason.startswith("unreadable_audio:")


def test_raft_random_weights_runs_and_still_gives_no_beats(tmp_path, beat_media):
    """RAFT path with random weights (2.4 fps, 2 iterations, 128x128 to keep CPU time small):
    right shapes and stamps; a random net's flow of identical frames is constant, so no beats."""
    row = clip_row("still_000", beat_media["still_video"], beat_media["periodic_audio"], 0.0, 10.0, 10.5)
    stage = Beats(BeatsConfig(flow_method="raft_small", frame_size="128x128", raft_iters=2, video_fps=2.4),
                  RunConfig(media_root=str(tmp_path), weights="random"))
    stage.setup()
    (result,) = stage.process([row])
    assert result.status == "ok", result.reason
    assert stage.weights_stamp == "random-init" and stage.resources.concurrency == 1
    assert result.metrics["flow_model"] == "raft_small@random-init" and result.metrics["frames_read"] == 24
    pairs = load_beats(result.metrics["beats_path"])["flow_pairs"]
    assert pairs.shape == (23,) and np.isfinite(pairs).all() and pairs.max() > 0
    assert result.metrics["n_video_beats"] == 0 and len(result.metrics["video_beats"]) == 500


def test_extras_rms_chroma_and_shot_cuts(tmp_path, beat_media):
    """The `moving` synthetic video concatenates three sources: cuts at 4 s and 8 s."""
    row = clip_row("mov_000", beat_media["moving_video"], beat_media["periodic_audio"], 0.0, 10.0, 12.0)
    (result,) = run_stage(tmp_path, [row], extras=True)
    assert result.status == "ok", result.reason
    arrays = load_beats(result.metrics["beats_path"])
    assert arrays["rms"].shape == (500,) and arrays["rms"].dtype == np.float16
    assert arrays["chroma"].shape == (12, 500) and arrays["chroma"].dtype == np.float16
    clicks = 15 + 25 * np.arange(20)
    assert arrays["rms"][clicks + 1].min() > 10 * arrays["rms"][clicks - 5].max()  # loud on clicks only
    assert np.allclose(arrays["shot_cut_s"], [4.0, 8.0], atol=0.11)
    assert result.metrics["n_shot_cuts"] == 2


def test_raft_pretrained_weights_load_from_the_models_folder_without_pickle(tmp_path):
    """run.weights=pretrained reads <models_root>/raft/raft_small/raft_small.pth (a state dict,
    torch.load(weights_only=True)) and stamps its sha256; here the file is a saved random init."""
    import torch
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(1)
    source = raft_small(weights=None)
    folder = tmp_path / "models" / "raft" / "raft_small"
    folder.mkdir(parents=True)
    torch.save(source.state_dict(), folder / "raft_small.pth")
    run = RunConfig(media_root=str(tmp_path), models_root=str(tmp_path / "models"), weights="pretrained")
    stage = Beats(BeatsConfig(flow_method="raft_small"), run)
    stage.setup()
    assert stage.weights_stamp == "pretrained"
    assert stage.flow.model_name.startswith("raft_small@sha256:")
    loaded = stage.flow.model.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in source.state_dict().items())
