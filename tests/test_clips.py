
import pytest

from pipeline.options import ConfigError
from pipeline.worker import StageWorker
from stages.clips import Clips, ClipsConfig, clip_windows


def test_35s_video_gives_three_clips():
    assert clip_windows(35.0, ClipsConfig()) == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]


def test_pad_keeps_a_long_enough_partial_clip():
    assert clip_windows(35.0, ClipsConfig(last_partial="pad"))[-1] == (30.0, 40.0)
    assert len(clip_windows(31.0, ClipsConfig(last_partial="pad"))) == 3  # 1 s left < min_partial_s


def test_hop_and_max_clips():
    assert clip_windows(30.0, ClipsConfig(hop_s=5.0)) == [(0, 10), (5, 15), (10, 20), (15, 25), (20, 30)]
    assert len(clip_windows(300.0, ClipsConfig(max_clips=4))) == 4


def test_bad_options_fail_fast(tmp_path, make_config):
    cfg = make_config(tmp_path, ["x"])
    with pytest.raises(ConfigError, match="clips.last_partial"):
        Clips(ClipsConfig(last_partial="loop"), cfg.run)


def test_worker_fans_out_and_accounts_for_every_video(tmp_path, make_config):
    """Through the runner's worker: clip rows carry their video; a short video and one without
    duration still get exactly one row each."""
    cfg = make_config(tmp_path, ["x"])
    worker = StageWorker(Clips(cfg.stage("clips"), cfg.run))
    rows = [{"key": "yt_a", "media_duration_s": 35.0}, {"key": "yt_b", "media_duration_s": 4.0},
            {"key": "yt_c"}]
    out = worker.process_safely(rows)
    assert [(r["key"], r["status"]) for r in out] == [
        ("yt_a_000", "ok"), ("yt_a_001", "ok"), ("yt_a_002", "ok"), ("yt_b", "dropped"), ("yt_c", "failed")]
    assert {r["video_key"] for r in out} == {"yt_a", "yt_b", "yt_c"}
    assert out[1]["start_s"] == 10.0 and out[1]["end_s"] == 20.0
