"""The bad-inputs suite (issue #9): every kind of bad input goes through the real stages and ends
with its expected status and reason; none crashes a stage and none loses a row.

`CASES` is the one table of all kinds: kind → how the input is made → stage → expected status →
reason prefix. ingest and download run through the Ray runner against a 127.0.0.1 server (real
yt-dlp), so the manifests prove no row is lost; the other stages run in the runner's own worker
(`StageWorker.process_safely`, what every Ray task runs) on one mixed batch each, with the cheap
model settings of the other tests. Input files and configs that are wrong as a whole fail fast
(`fatal: <Error>`) naming the field or file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import ManifestStore
from pipeline.options import ConfigError
from pipeline.runner import run_stage
from pipeline.tools import synth
from pipeline.tools.localserver import LocalServer
from pipeline.worker import StageWorker
from stages import STAGES, load_config
from stages.ingest import InputError

REPO = Path(__file__).resolve().parents[1]
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
KEY = re.compile(r"^(yt_[A-Za-z0-9_-]{11}|url_[0-9a-f]{16}|bad_[0-9a-f]{16})$")


@dataclass(frozen=True)
class Case:
    kind: str
    made: str  # how the input is made
    stage: str
    input: str  # the input's name in that stage's batch
    status: str  # ok | dropped | failed | fatal: <exception raised before any row>
    reason: str  # what the reason starts with ("" for ok)


CASES = [
    # ---- ingest: rows are validated, keys never come from the input's text
    Case("file:// URL", "URL list row", "ingest", "file", "failed", "bad_url: only http(s) URLs"),
    Case("ftp:// URL", "URL list row", "ingest", "ftp", "failed", "bad_url: only http(s) URLs"),
    Case("javascript: URL", "URL list row", "ingest", "javascript", "failed", "bad_url: only http(s) URLs"),
    Case("shell metacharacters as an id", "`$(touch${IFS}MARKER);` in a YouTube-8M id list", "ingest",
         "shell_id", "failed", "bad_url: only http(s) URLs or 11-char YouTube ids"),
    Case("shell metacharacters in URL and title", "`/$(touch${IFS}MARKER);.mp4` URL, `$(touch MARKER); `...`` "
         "title", "ingest", "shell_url", "ok", ""),
    Case("path-traversal title", "title `../../etc/passwd` in a URL list", "ingest", "traversal_title", "ok", ""),
    Case("non-UTF-8 title (CSV)", "Latin-1 bytes in a CSV title", "ingest", "latin1_title", "ok", ""),
    Case("DISCO parquet, missing columns", "only the URL and a binary non-UTF-8 title column", "ingest",
         "disco_sparse", "ok", ""),
    Case("DISCO parquet, renamed URL column", "`link` instead of `video_url_youtube`", "ingest",
         "disco_renamed", "fatal: InputError", "ingest input"),
    Case("empty input file", "0-byte URL list", "ingest", "empty_list", "fatal: InputError", "ingest input"),
    Case("YAML config with wrong types", "`download: {retries: three}`", "config", "wrong_types",
         "fatal: ConfigError", "config key 'download.retries' must be int"),
    Case("unknown config key", "`download: {rate_limt: 2M}`", "config", "typo", "fatal: ConfigError",
         "unknown config key 'download.rate_limt' (did you mean 'rate_limit'?)"),
    # ---- download: real yt-dlp against 127.0.0.1
    Case("0-byte file", "empty .mp4 served", "download", "empty", "failed", "empty_file: "),
    Case("truncated mp4", "first 60% of an mp4 (moov in front)", "download", "truncated", "failed", "truncated: "),
    Case("mp4 with only audio", "AAC in mp4, no video", "download", "audio_only", "failed", "no_video_stream: "),
    Case("mp4 with only video", "H.264 in mp4, no audio", "download", "video_only", "failed", "no_audio_stream: "),
    Case("corrupt audio stream", "AAC packets damaged (ffmpeg noise bsf), container intact", "download",
         "corrupt_audio", "failed", "corrupt_audio: the audio stream (aac) does not decode"),
    Case("HTML page instead of a video", "page.html", "download", "page", "failed", "unsupported: "),
    Case("HTTP 404", "/status/404/...", "download", "gone", "failed", "not_found: "),
    Case("shell metacharacters in URL", "404 on the server; nothing executed", "download", "shell_url", "failed",
         "not_found: "),
    Case("10 h static video", "1 min at 1 fps stream-copied 600× (3.6 MB)", "download", "ten_hours", "failed",
         "too_long: 36000s > 1800s"),
    Case("1×1 video", "Game of Life scaled to 1×1, yuv444p", "download", "one_by_one", "failed",
         "too_small: 1x1 video"),
    Case("4K video", "3840×2160, 2 s at 5 fps", "download", "uhd", "ok", ""),
    Case("VFR video", "25 fps for 2 s, then 5 fps (timestamps kept)", "download", "vfr", "ok", ""),
    Case("rotated video", "display rotation 90° (stream copy)", "download", "rotated", "ok", ""),
    Case("8 kHz mono audio", "AAC 8 kHz, 1 channel", "download", "mono8k", "ok", ""),
    Case("silent audio", "AAC of digital silence", "download", "silent", "ok", ""),
    Case("internal host: localhost", "allow_private_hosts=false", "download_private", "localhost", "failed",
         "blocked_host: localhost resolves to non-public 127.0.0.1"),
    Case("internal host: private IP", "http://10.1.2.3/, allow_private_hosts=false", "download_private",
         "private_ip", "failed", "blocked_host: 10.1.2.3"),
    Case("internal host: cloud metadata", "http://169.254.169.254/, allow_private_hosts=false",
         "download_private", "metadata", "failed", "blocked_host: 169.254.169.254"),
    Case("internal host: IPv6 loopback", "http://[::1]/, allow_private_hosts=false", "download_private", "ipv6",
         "failed", "blocked_host: ::1"),
    Case("non-http URL past ingest", "a `file://` row handed to download", "download_private", "file", "failed",
         "bad_url: only http(s) URLs reach the downloader"),
    # ---- filter (pixels embedder)
    Case("0-byte file", "empty .mp4", "filter", "empty", "failed", "unreadable: "),
    Case("garbage bytes", "ftyp header then noise", "filter", "garbage", "failed", "unreadable: "),
    Case("mp4 with only audio", "AAC in mp4", "filter", "audio_only", "failed", "no_video_stream: "),
    Case("1 s video", "1 s of video", "filter", "short", "failed", "too_short: "),
    Case("file gone", "path to no file", "filter", "missing", "failed", "missing_file: "),
    Case("1×1 video", "decord mis-sizes the frames: falls back to ffmpeg", "filter", "one_by_one", "dropped",
         "similar_frames: "),
    Case("4K video", "3840×2160", "filter", "uhd", "ok", ""),
    Case("VFR video", "25 then 5 fps", "filter", "vfr", "ok", ""),
    Case("rotated video", "rotation 90°", "filter", "rotated", "ok", ""),
    Case("10 h static video", "download.max_duration_s lifted", "filter", "ten_hours", "dropped", "static: "),
    # ---- separate (random tiny8k Demucs)
    Case("0-byte file", "empty .mp4", "separate", "empty", "failed", "corrupt: "),
    Case("mp4 with only video", "no audio stream", "separate", "video_only", "failed", "no_audio_stream: "),
    Case("corrupt audio stream", "damaged AAC packets", "separate", "corrupt_audio", "failed", "corrupt: "),
    Case("silent audio", "digital silence", "separate", "silent", "dropped", "silent: "),
    Case("8 kHz mono audio", "resampled by ffmpeg (soxr)", "separate", "mono8k", "ok", ""),
    # ---- clips
    Case("10 h static video", "36000 s", "clips", "ten_hours", "ok", ""),
    Case("1 s video", "shorter than one clip", "clips", "short", "dropped", "too_short: "),
    Case("no duration upstream", "row without durations", "clips", "no_duration", "failed", "no_duration: "),
    # ---- beats (Farneback)
    Case("VFR video", "frames picked by timestamp (fps filter)", "beats", "vfr", "ok", ""),
    Case("rotated video", "ffmpeg applies the rotation", "beats", "rotated", "ok", ""),
    Case("1×1 video", "scaled up by ffmpeg", "beats", "one_by_one", "ok", ""),
    Case("4K video", "scaled down by ffmpeg", "beats", "uhd", "ok", ""),
    Case("silent audio", "32 kHz digital silence", "beats", "silent", "ok", ""),
    Case("8 kHz mono audio", "8 kHz instrumental", "beats", "mono8k", "ok", ""),
    Case("0-byte audio", "empty .flac", "beats", "empty", "failed", "unreadable_audio: "),
    Case("clip past the end", "clip at 20 s of a 12 s file", "beats", "past_end", "failed", "no_audio: "),
    # ---- tokens (EnCodec, test size)
    Case("silent audio", "32 kHz digital silence", "tokens", "silent", "ok", ""),
    Case("8 kHz mono audio", "resampled to 32 kHz by ffmpeg", "tokens", "mono8k", "ok", ""),
    Case("0-byte audio", "empty .flac", "tokens", "empty", "failed", "unreadable: "),
    Case("truncated instrumental", "3 s of audio for a 10 s clip", "tokens", "short", "failed", "short_audio: "),
    # ---- features (Hiera, test size)
    Case("VFR video", "decord", "features", "vfr", "ok", ""),
    Case("rotated video", "decord", "features", "rotated", "ok", ""),
    Case("1×1 video", "ffmpeg fallback, upscaled", "features", "one_by_one", "ok", ""),
    Case("4K video", "resized frame by frame as decoded", "features", "uhd", "ok", ""),
    Case("0-byte file", "empty .mp4", "features", "empty", "failed", "unreadable: "),
    Case("clip past the end", "clip at 20 s of a 12 s video", "features", "past_end", "failed", "no_frames: "),
]

MODELS = {
    "filter": {"embedder": "pixels", "concurrency": 1},
    "separate": {"random_init": "tiny8k", "skip_instrumental": False, "residual_segments": 0, "shifts": 0},
    "tokens": {"model": "encodec_32khz_test"},
    "features": {"model": "hiera_test_16x224", "batch_size": 8},
}


def test_the_table_covers_at_least_20_kinds_and_every_stage() -> None:
    assert len({case.kind for case in CASES}) >= 20
    assert {case.stage for case in CASES} >= set(STAGES) - {"shards"}
    assert len({(case.stage, case.input) for case in CASES}) == len(CASES)


# ---------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, media_dir: Path, synthetic_media) -> dict[str, Path]:
    """Every input file, in one folder that the 127.0.0.1 server serves."""
    d = tmp_path_factory.mktemp("bad_inputs_media")
    files = {name: Path(shutil.copyfile(media_dir / f"{name}.mp4", d / f"{name}.mp4"))
             for name in ("moving", "empty", "truncated", "audio_only", "video_only")}
    files["page"] = Path(shutil.copyfile(media_dir / "page.html", d / "page.html"))
    files["garbage"] = d / "garbage.mp4"
    files["garbage"].write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    files["corrupt_audio"] = synth.make_corrupt_stream(files["moving"], d / "corrupt_audio.mp4", "a")
    files["ten_hours"] = synthetic_media(d / "ten_hours.mp4", synth.make_long_static, hours=10)
    files["one_minute"] = synthetic_media(d / "one_minute.mp4", synth.make_long_static, hours=1 / 60)
    files["one_by_one"] = synthetic_media(d / "one_by_one.mp4", synth.make_test_video, size="1x1")
    files["uhd"] = synthetic_media(d / "uhd.mp4", synth.make_test_video, size="3840x2160", duration_s=2, fps=5)
    files["vfr"] = synthetic_media(d / "vfr.mp4", synth.make_vfr, duration_s=12)
    files["rotated"] = synth.make_rotated(files["vfr"], d / "rotated.mp4", 90)
    files["mono8k"] = synthetic_media(d / "mono8k.mp4", synth.make_test_video, sample_rate=8000, channels=1)
    files["silent"] = synthetic_media(d / "silent.mp4", synth.make_test_video, soundtrack="silent")
    files["short"] = synthetic_media(d / "short.mp4", synth.make_test_video, duration_s=1)
    # instrumentals (what separate hands to beats and tokens)
    music = f"aevalsrc={synth.music_expr(4)}:s=32000:d=12"
    synth.ffmpeg("-f", "lavfi", "-i", music, "-ac", "1", "-c:a", "flac", str(d / "music32k.flac"))
    synth.ffmpeg("-f", "lavfi", "-i", "anullsrc=r=32000:cl=mono", "-t", "12", "-c:a", "flac", str(d / "silent32k.flac"))
    synth.ffmpeg("-f", "lavfi", "-i", f"aevalsrc={synth.music_expr(5)}:s=8000:d=12", "-ac", "1", "-c:a", "flac",
                 str(d / "mono8k.flac"))
    synth.ffmpeg("-f", "lavfi", "-i", music, "-ac", "1", "-t", "3", "-c:a", "flac", str(d / "short32k.flac"))
    (d / "empty.flac").write_bytes(b"")
    files.update({"music32k": d / "music32k.flac", "silent32k": d / "silent32k.flac", "short32k": d / "short32k.flac",
                  "mono8k_flac": d / "mono8k.flac", "empty_flac": d / "empty.flac"})
    return files


# ---------------------------------------------------------------- ingest + download through the runner


SERVED = ("empty", "truncated", "audio_only", "video_only", "corrupt_audio", "ten_hours", "one_by_one", "uhd",
          "vfr", "rotated")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path], ray_local: None,
                 make_config) -> dict[str, Any]:
    """ingest (URL list, id list, sparse DISCO parquet) then download, both through the runner."""
    tmp = tmp_path_factory.mktemp("bad_inputs_run")
    marker = tmp / "pwned"
    with LocalServer(media["moving"].parent) as server:
        urls: dict[str, str] = {name: f"{server.url}/{media[name].name}" for name in SERVED}
        urls.update({
            "page": f"{server.url}/page.html", "gone": f"{server.url}/status/404/gone.mp4",
            "file": "file:///etc/passwd", "ftp": "ftp://example.org/x.mp4", "javascript": "javascript:alert(1)",
            "shell_url": f"{server.url}/$(touch${{IFS}}{marker});.mp4",
            "traversal_title": f"{server.url}/{media['moving'].name}",
            "latin1_title": f"{server.url}/{media['moving'].name}?v=2",
            "shell_id": f"$(touch${{IFS}}{marker});",
            "mono8k": f"{server.url}/{media['mono8k'].name}", "silent": f"{server.url}/{media['silent'].name}",
        })
        titles = {"traversal_title": b"../../etc/passwd", "latin1_title": b"caf\xe9 \xff\xfe",
                  "shell_url": f"$(touch {marker}); `touch {marker}`".encode()}
        listed = [name for name in urls if name not in ("shell_id", "mono8k", "silent")]
        url_list = tmp / "urls.csv"
        url_list.write_bytes(b"url,title\n" + b"".join(
            urls[name].encode() + b"," + titles.get(name, b"") + b"\n" for name in listed))
        ids = tmp / "ids.txt"
        ids.write_text(urls["shell_id"] + "\n")
        disco = tmp / "disco.parquet"  # no artist, track, duration or license columns; titles as raw bytes
        pq.write_table(pa.table({"video_url_youtube": [urls["mono8k"], urls["silent"]],
                                 "video_title_youtube": pa.array([b"\xff\xfe", b"ok"], pa.binary())}), disco)
        cfg = make_config(tmp, [str(url_list), f"yt8m={ids}", f"disco10m={disco}"], download={"retries": 0})
        run_stage("ingest", cfg, progress=False)
        run_stage("download", cfg, progress=False)
    store = ManifestStore(cfg.run.manifest_root)
    ingest = store.latest("ingest").to_pylist()
    download = {row["key"]: row for row in store.latest("download").to_pylist()}
    by_url = {row["url"]: row for row in ingest}
    by_name = {name: by_url[url] for name, url in urls.items()}
    return {"urls": urls, "ingest": ingest, "download": download, "by_name": by_name, "marker": marker,
            "media_root": Path(cfg.run.media_root),
            "disco_rows": sorted((r for r in ingest if r["source"] == "disco10m"), key=lambda r: r["input_row"])}


def ingest_outcomes(run: dict[str, Any], tmp: Path, make_stage) -> dict[str, tuple[str, str]]:
    def source_rows(tmp: Path, inputs: list[str]) -> list[dict[str, Any]]:
        return make_stage(tmp, "ingest", inputs).source_rows()

    out = {name: (row["status"], row["reason"] or "") for name, row in run["by_name"].items()}
    sparse = run["disco_rows"]
    out["disco_sparse"] = ("ok", "") if [r["status"] for r in sparse] == ["ok", "ok"] else ("failed", str(sparse))
    renamed = tmp / "renamed.parquet"
    pq.write_table(pa.table({"link": ["https://example.org/a.mp4"], "name": ["a"]}), renamed)
    out["disco_renamed"] = fatal(lambda: source_rows(tmp, [str(renamed)]))
    (tmp / "empty.txt").write_bytes(b"")
    out["empty_list"] = fatal(lambda: source_rows(tmp, [str(tmp / "empty.txt")]))
    return out


def fatal(action: Any) -> tuple[str, str]:
    try:
        action()
    except (InputError, ConfigError) as e:
        return f"fatal: {type(e).__name__}", str(e)
    return "no error", ""


def config_outcomes(tmp: Path) -> dict[str, tuple[str, str]]:
    (tmp / "wrong_types.yaml").write_text("download:\n  retries: three\n")
    (tmp / "typo.yaml").write_text("download:\n  rate_limt: 2M\n")
    return {name: fatal(lambda name=name: load_config(tmp / f"{name}.yaml")) for name in ("wrong_types", "typo")}


def download_outcomes(run: dict[str, Any]) -> dict[str, tuple[str, str]]:
    rows = {name: run["download"].get(row["key"]) for name, row in run["by_name"].items() if row["status"] == "ok"}
    return {name: (row["status"], row["reason"] or "") if row else ("no row", "") for name, row in rows.items()}


def private_host_outcomes(stage_worker, tmp: Path) -> dict[str, tuple[str, str]]:
    urls = {"localhost": "http://localhost:9/x.mp4", "private_ip": "http://10.1.2.3/x.mp4",
            "metadata": "http://169.254.169.254/latest/meta-data/", "ipv6": "http://[::1]:9/x.mp4",
            "file": "file:///etc/passwd"}
    rows = [{"key": f"url_{name}", "url": url} for name, url in urls.items()]
    results = stage_worker("download", tmp, allow_private_hosts=False).process_safely(rows)
    return {r["key"][4:]: (r["status"], r["reason"]) for r in results}


# ---------------------------------------------------------------- the other stages, one mixed batch each


@pytest.fixture(scope="module")
def stage_worker(make_stage):
    """stage_worker(name, tmp, **options): the runner's worker around a stage with the small test models."""

    def build(name: str, tmp: Path, **options: Any) -> StageWorker:
        return StageWorker(make_stage(tmp, name, **{**MODELS.get(name, {}), **options}))

    return build


def run_batch(stage_worker, name: str, tmp: Path, rows: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """One batch of every input of a stage, with the input's name as its key; for the clips fan-out,
    the first result of each video."""
    keyed = [{**row, "key": input_name} for input_name, row in rows.items()]
    results = stage_worker(name, tmp / name).process_safely(keyed)
    out: dict[str, tuple[str, str]] = {}
    for result in results:
        input_name = result["video_key"] if name == "clips" else result["key"]
        out.setdefault(input_name, (result["status"], result["reason"] or ""))
    assert set(out) == set(rows), f"{name} lost rows: {set(rows) - set(out)}"
    return out


def video_rows(media: dict[str, Path], names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: {"video_path": str(media.get(name, media["moving"].with_name(f"{name}.mp4")))} for name in names}


def clip_row(video: Path, audio: Path, start_s: float = 0.0, duration_s: float = 12.0) -> dict[str, Any]:
    return {"video_key": "v", "clip_index": 0, "start_s": start_s, "end_s": start_s + 10.0,
            "padded_s": max(0.0, start_s + 10.0 - duration_s), "video_path": str(video),
            "instrumental32k_path": str(audio), "media_duration_s": duration_s}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path], pipeline_run: dict[str, Any],
             make_stage, stage_worker) -> dict[str, dict[str, tuple[str, str]]]:
    tmp = tmp_path_factory.mktemp("bad_inputs_stages")
    m = media
    music = m["music32k"]
    return {
        "ingest": ingest_outcomes(pipeline_run, tmp, make_stage),
        "config": config_outcomes(tmp),
        "download": download_outcomes(pipeline_run),
        "download_private": private_host_outcomes(stage_worker, tmp),
        "filter": run_batch(stage_worker, "filter", tmp, video_rows(m, [
            "moving", "empty", "garbage", "audio_only", "short", "missing", "one_by_one", "uhd", "vfr", "rotated",
            "ten_hours"])),
        "separate": run_batch(stage_worker, "separate", tmp, video_rows(m, ["empty", "video_only", "corrupt_audio", "silent",
                                                              "mono8k"])),
        "clips": run_batch(stage_worker, "clips", tmp, {"ten_hours": {"media_duration_s": 36000.128, "audio_duration_s": 36000.0},
                                          "short": {"media_duration_s": 1.0}, "no_duration": {}}),
        "beats": run_batch(stage_worker, "beats", tmp, {
            "vfr": clip_row(m["vfr"], music), "rotated": clip_row(m["rotated"], music),
            "one_by_one": clip_row(m["one_by_one"], music, duration_s=4.0),
            "uhd": clip_row(m["uhd"], music, duration_s=2.0),
            "silent": clip_row(m["vfr"], m["silent32k"]), "mono8k": clip_row(m["vfr"], m["mono8k_flac"]),
            "empty": clip_row(m["vfr"], m["empty_flac"]), "past_end": clip_row(m["vfr"], music, start_s=20.0)}),
        "tokens": run_batch(stage_worker, "tokens", tmp, {
            "silent": clip_row(m["vfr"], m["silent32k"]), "mono8k": clip_row(m["vfr"], m["mono8k_flac"]),
            "empty": clip_row(m["vfr"], m["empty_flac"]), "short": clip_row(m["vfr"], m["short32k"])}),
        "features": run_batch(stage_worker, "features", tmp, {
            "vfr": clip_row(m["vfr"], music), "rotated": clip_row(m["rotated"], music),
            "one_by_one": clip_row(m["one_by_one"], music, duration_s=4.0),
            "uhd": clip_row(m["uhd"], music, duration_s=2.0), "empty": clip_row(m["empty"], music),
            "past_end": clip_row(m["vfr"], music, start_s=20.0)}),
    }


@pytest.mark.parametrize("case", CASES, ids=[f"{c.stage}-{c.input}" for c in CASES])
def test_each_kind_ends_with_its_status_and_reason(case: Case, outcomes: dict[str, dict[str, tuple[str, str]]]) -> None:
    status, reason = outcomes[case.stage][case.input]
    assert status == case.status, (case.kind, reason)
    assert reason.startswith(case.reason), (case.kind, reason)
    if status == "ok":
        assert reason == ""
    else:
        assert reason and not reason.startswith("error:"), "a crash, not a classified reason"


# ---------------------------------------------------------------- no row lost, nothing executed, safe names


def test_every_input_row_has_one_row_in_each_manifest(pipeline_run: dict[str, Any]) -> None:
    ingest, download = pipeline_run["ingest"], pipeline_run["download"]
    assert len(ingest) == len(pipeline_run["urls"])  # each input line is one candidate, rejected ones included
    assert all(KEY.match(row["key"]) for row in ingest)
    assert set(download) == {row["key"] for row in ingest if row["status"] == "ok"}


def test_shell_metacharacters_are_never_executed_and_names_stay_safe(pipeline_run: dict[str, Any]) -> None:
    assert not pipeline_run["marker"].exists()
    shell_url = pipeline_run["by_name"]["shell_url"]
    assert shell_url["title"].startswith("$(touch ")  # kept as metadata, never used as a name or command
    written = [p for p in pipeline_run["media_root"].rglob("*")]
    assert written and all(SAFE_NAME.match(p.name) for p in written)
    assert all(p.resolve().is_relative_to(pipeline_run["media_root"].resolve()) for p in written)


def test_titles_in_no_known_encoding_are_kept_readable(pipeline_run: dict[str, Any]) -> None:
    by_name = pipeline_run["by_name"]
    assert by_name["latin1_title"]["title"].startswith("caf\ufffd")
    assert by_name["traversal_title"]["title"] == "../../etc/passwd"
    assert [r["title"] for r in pipeline_run["disco_rows"]] == ["\ufffd\ufffd", "ok"]
    assert all(r["artist"] is None and r["license"] for r in pipeline_run["disco_rows"])


def test_failed_downloads_leave_no_file(pipeline_run: dict[str, Any]) -> None:
    videos = {p.stem for p in (pipeline_run["media_root"] / "video").iterdir()}
    ok = {key for key, row in pipeline_run["download"].items() if row["status"] == "ok"}
    assert videos == ok


def test_features_resize_4k_frames_as_they_are_decoded(tmp_path: Path, media: dict[str, Path], stage_worker) -> None:
    """10 distinct 3840x2160 frames are 237 MiB as RGB; resized as decoded the clip stays small."""
    import tracemalloc

    stage = stage_worker("features", tmp_path).stage
    tracemalloc.start()
    try:
        clip = stage.read_clip({**clip_row(media["uhd"], media["music32k"], duration_s=2.0), "key": "uhd"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\n4K clip: Python-heap peak while decoding and resizing {peak / 2**20:.1f} MiB")
    assert clip.frames.shape == (96, 224, 224, 3) and clip.frames_read == 20
    assert peak < 80 * 2**20


def test_features_pick_vfr_frames_by_timestamp(tmp_path: Path, media: dict[str, Path], stage_worker) -> None:
    """25 fps for 2 s, then 5 fps: the frame on screen at 5 s is frame 50 + 3 × 5 = 65, where
    5 s × the average rate (8.4 fps) would give frame 42, shown at 1.68 s."""
    from pipeline.media.frames import FrameReader
    from pipeline.models.hiera import resize_frame

    reader = FrameReader(media["vfr"])
    assert reader.indices_at([0.0, 1.0, 5.0, 11.8, 12.5]) == ([0, 25, 65, 99, 99], 4)
    stage = stage_worker("features", tmp_path).stage
    clip = stage.read_clip({**clip_row(media["vfr"], media["music32k"]), "key": "vfr"})
    [expected] = reader.read([65], transform=lambda frame: resize_frame(frame, "center"))
    assert (clip.frames[48] == expected).all()  # frame 48 of the clip: 48 / 9.6 fps = 5 s


# ---------------------------------------------------------------- the 10 h video: bounded time and memory


BOUNDED = textwrap.dedent(
    """
    import json, re, sys, time
    from types import SimpleNamespace
    from stages.clips import Clips, ClipsConfig
    from stages.filter import Filter, FilterConfig

    def peak_mib():
        # VmHWM starts afresh at exec; ru_maxrss would carry the forking pytest's peak over
        status = open("/proc/self/status").read()
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024

    path, duration = sys.argv[1], float(sys.argv[2])
    run = SimpleNamespace(media_root="unused", models_root="models", weights="random")
    stage = Filter(FilterConfig(embedder="pixels"), run)
    stage.setup()
    started = time.perf_counter()
    [result] = stage.process([{"key": "k", "video_path": path}])
    filter_s = time.perf_counter() - started
    clips = Clips(ClipsConfig(), run).process([{"key": "k", "media_duration_s": duration}])
    bounded = Clips(ClipsConfig(max_clips=50), run).process([{"key": "k", "media_duration_s": duration}])
    print(json.dumps({"status": result.status, "reason": result.reason, "filter_s": filter_s,
                      "clips": len(clips), "bounded_clips": len(bounded),
                      "peak_mib": peak_mib()}))
    """
)


def filter_and_clip(path: Path, duration_s: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", BOUNDED, str(path), str(duration_s)], capture_output=True,
                         text=True, cwd=REPO, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ten_hour_static_video_takes_bounded_time_and_memory(media: dict[str, Path]) -> None:
    """filter reads 16 frames by keyframe-aware seeking whatever the length; clips only computes
    windows (max_clips bounds the fan-out). A one-minute video of the same picture is the baseline."""
    minute = filter_and_clip(media["one_minute"], 60.0)
    hours = filter_and_clip(media["ten_hours"], 36000.0)
    print(f"\n10 h static: filter {hours['filter_s']:.2f}s, peak RSS {hours['peak_mib']:.0f} MiB; "
          f"1 min baseline: filter {minute['filter_s']:.2f}s, peak RSS {minute['peak_mib']:.0f} MiB")
    assert (hours["status"], minute["status"]) == ("dropped", "dropped")
    assert hours["reason"].startswith("static: ")
    assert (hours["clips"], minute["clips"]) == (3600, 6)
    assert hours["bounded_clips"] == 50
    assert hours["filter_s"] < 30.0, hours
    assert hours["peak_mib"] - minute["peak_mib"] < 64, (hours, minute)




def test_separate_refuses_a_too_long_track_before_decoding_it(tmp_path: Path, media: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch, stage_worker) -> None:
    import stages.separate
    from pipeline.media.probe import MediaError

    decoded = []

    def refuse(key: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(key)
        raise MediaError("decode_attempted: the whole track would be decoded to scratch")

    monkeypatch.setattr(stages.separate, "decode_to_scratch", refuse)
    stage = stage_worker("separate", tmp_path, max_duration_s=1800.0)
    [result] = stage.process_safely([{"key": "ten_hours", "video_path": str(media["ten_hours"]),
                                      "media_duration_s": 36000.128}])
    assert (result["status"], result["reason"].split(":")[0]) == ("failed", "too_long")
    assert decoded == []
