"""Real yt-dlp against a 127.0.0.1 server, through the Ray runner."""

from pathlib import Path

import pytest

from pipeline.manifest import ManifestStore
from pipeline.runner import run_stage
from stages.download import check_url, classify

CASES = {
    "moving.mp4": ("ok", ""),
    "status/404/gone.mp4": ("failed", "not_found"),
    "truncated.mp4": ("failed", "truncated"),
    "page.html": ("failed", "unsupported"),
    "audio_only.mp4": ("failed", "no_video_stream"),
    "video_only.mp4": ("failed", "no_audio_stream"),
    "empty.mp4": ("failed", "empty_file"),
    "status/429/busy.mp4": ("failed", "rate_limited"),
    "status/503/down.mp4": ("failed", "server_error"),
    "flaky/1/moving.mp4": ("ok", ""),
}


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, server, ray_local, make_config, write_lines):
    tmp_path = tmp_path_factory.mktemp("download")
    urls = write_lines(tmp_path / "urls.txt", [f"{server.url}/{path}" for path in CASES])
    # a 429 without Retry-After cools the one egress ("direct") down: briefly here
    cfg = make_config(tmp_path, [urls], download={"retries": 2, "egress_cooldown_s": 0.1})
    run_stage("ingest", cfg, progress=False)
    summary = run_stage("download", cfg, progress=False)
    store = ManifestStore(cfg.run.manifest_root)
    ingest = {r["key"]: r["url"] for r in store.latest("ingest").to_pylist()}
    rows = {ingest[r["key"]].split("/", 3)[3]: r for r in store.latest("download").to_pylist()}
    return cfg, summary, rows


def test_every_case_gets_its_status_and_reason(downloaded):
    _, summary, rows = downloaded
    assert set(rows) == set(CASES)
    for path, (status, reason_class) in CASES.items():
        assert rows[path]["status"] == status, (path, rows[path]["reason"])
        assert rows[path]["reason"].split(":")[0] == reason_class, (path, rows[path]["reason"])
    assert summary.processed == len(CASES)


def test_ok_rows_have_probe_columns_and_files(downloaded):
    _, _, rows = downloaded
    ok = rows["moving.mp4"]
    assert Path(ok["video_path"]).is_file()
    assert ok["width"] == 160 and ok["height"] == 120
    assert ok["media_duration_s"] == pytest.approx(6.0, abs=0.2)
    assert ok["acodec"] == "aac" and ok["vcodec"] == "h264"
    # failed downloads leave no file under a final name
    assert len(list(Path(ok["video_path"]).parent.glob("*.mp4"))) == 2


def test_transient_errors_are_retried_permanent_are_not(downloaded):
    _, _, rows = downloaded
    assert rows["flaky/1/moving.mp4"]["attempts"] == 2
    assert rows["status/429/busy.mp4"]["attempts"] == 3
    assert "after 3 attempts" in rows["status/429/busy.mp4"]["reason"]
    assert rows["status/404/gone.mp4"]["attempts"] == 1


def test_rerun_does_nothing_and_says_so(downloaded, caplog):
    cfg, _, _ = downloaded
    with caplog.at_level("INFO", logger="discomv"):
        summary = run_stage("download", cfg, progress=False)
    assert summary.processed == 0 and summary.already_done == len(CASES)
    assert "nothing to do" in caplog.text


def test_private_hosts_blocked_by_default(tmp_path: Path, server, ray_local, make_config, write_lines):
    urls = write_lines(tmp_path / "urls.txt", [f"{server.url}/moving.mp4", "http://localhost:1/x.mp4"])
    cfg = make_config(tmp_path, [urls], download={"allow_private_hosts": False})
    run_stage("ingest", cfg, progress=False)
    run_stage("download", cfg, progress=False)
    rows = ManifestStore(cfg.run.manifest_root).latest("download").to_pylist()
    assert [r["reason"].split(":")[0] for r in rows] == ["blocked_host", "blocked_host"]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x.org/a", "javascript:alert(1)", "http://"])
def test_only_http_urls_reach_yt_dlp(url):
    assert check_url(url, allow_private_hosts=True).startswith("bad_url")


@pytest.mark.parametrize("message, expected", [
    ("ERROR: [youtube] x: Private video. Sign in if you've been granted access", ("private", False)),
    ("ERROR: [youtube] x: Video unavailable. This video has been removed by the uploader", ("unavailable", False)),
    ("ERROR: [youtube] x: Sign in to confirm you're not a bot", ("bot_check", True)),
    ("ERROR: unable to download video data: HTTP Error 429: Too Many Requests", ("rate_limited", True)),
    ("ERROR: Read timed out.", ("network", True)),
    ("ERROR: something new", ("download_error", False)),
])
def test_error_classes(message, expected):
    assert classify(message) == expected


@pytest.fixture
def download_stage(tmp_path: Path, make_stage):
    """download_stage(**options): a Download stage, set up, with these options over the test config."""

    def build(**options):
        stage = make_stage(tmp_path, "download", **options)
        stage.setup()
        return stage

    return build


def test_options_are_passed_through_to_yt_dlp(download_stage):
    stage = download_stage(rate_limit="2M", concurrency=4, cookies_file="c.txt", proxy="http://p:3128",
                       user_agent="discomv-test", sections="*10-70")
    opts = stage._ydl_options("yt_dQw4w9WgXcQ")
    assert "ratelimit" not in opts  # the governor caps bytes/s for the fleet (tests/test_governor.py)
    assert stage.governor.settings.bytes_per_s == 2 * 1024 * 1024
    assert opts["cookiefile"] == "c.txt" and opts["proxy"] == "http://p:3128"
    assert opts["http_headers"] == {"User-Agent": "discomv-test"}
    assert opts["outtmpl"]["default"].endswith("video/yt_dQw4w9WgXcQ.%(ext)s")
    assert callable(opts["download_ranges"]) and callable(opts["match_filter"])


def test_circuit_breaker_pauses_when_most_recent_attempts_fail(download_stage):
    from pipeline.governor import local

    stage = download_stage(breaker_window=4, breaker_threshold=0.75, breaker_cooldown_s=7)
    slept, now = [], [0.0]

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    stage.governor = local(stage.governor_settings(), sleep=sleep, clock=lambda: now[0])
    for transient in (True, True, False, False):
        stage.governor.report("direct", "network" if transient else "", transient)
    stage.governor.acquire_request()
    assert slept == []
    for _ in range(3):  # the last 4 are now F T T T: 75% transient failures
        stage.governor.report("direct", "network", True)
    stage.governor.acquire_request()
    assert slept == [7]
