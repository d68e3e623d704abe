"""`discomv browse` on a demo's output, driven with headless Chromium (playwright on Debian's
chromium; playwright's own browser download is not used), and the demo's console: our lines, none
of the Ray messages pipeline/rayconsole.py silences, and a real Ray error still shown."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.manifest import ManifestStore
from pipeline.tools import audit

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
# what Ray printed into `discomv demo` before pipeline/rayconsole.py (one pattern per message)
RAY_NOISE = [
    r"Token authentication is enabled for this Ray cluster",
    r"Progress bars disabled\. To enable",
    r"The minimum number of concurrent actors for",
    r"^\s*warnings\.warn\($",
    r"issue_detector_manager|Found \d+ issues\. To disable issue detection",
]
# what Ray still prints, once per process: no switch silences it without giving up actor restarts (docs/browse.md)
RAY_KEPT = r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"
OUR_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d discomv: ")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def demo(demo_run) -> tuple[Path, str, str]:
    """The session's demo output (tests/conftest.py), and what it printed (stderr: the log lines; stdout)."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "demo-console.txt").write_text(f"== stderr\n{demo_run.stderr}\n== stdout\n{demo_run.stdout}")
    assert demo_run.returncode == 0, (demo_run.stdout + demo_run.stderr)[-3000:]
    return demo_run.out, demo_run.stderr, demo_run.stdout


@pytest.fixture(scope="module")
def server(demo):
    out = demo[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.tools.cli", "browse", "-c", str(out / "config.yaml"), "--port", "0"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://([\d.]+):(\d+)/", line)
        assert m, line
        yield f"http://{m.group(1)}:{m.group(2)}", (m.group(1), int(m.group(2)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server, unavailable):
    if not Path(CHROMIUM).exists():
        unavailable("chromium not installed here; .ci/run installs it (apt: chromium)")
    from playwright import sync_api  # a dev dependency: missing, the test fails (it is never skipped)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1300, "height": 900})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.errors = errors
        yield pg
        browser.close()


def _open(page, base: str, route: str) -> None:
    page.evaluate("() => { if (document.body) delete document.body.dataset.ready; }")
    page.goto(f"{base}/{route}")
    page.wait_for_function(f"document.body.dataset.ready === {route!r}", timeout=60_000)
    assert not page.errors, page.errors


def _get(address: tuple[str, int], path: str, headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection(*address, timeout=60)
    conn.request("GET", path, headers=headers or {})  # sent as written: no normalising of `..` or `%2F`
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def _store(demo) -> ManifestStore:
    return ManifestStore(demo[0] / "manifests")


def test_table_lists_every_candidate_with_its_status(demo, server, page):
    base, _ = server
    _open(page, base, "#/candidates?limit=500")
    shown = {r.get_attribute("data-key"): r.get_attribute("data-status") for r in page.locator("tr.row").all()}
    table = audit.audit_table(_store(demo))
    expected = {k: t.split(" ")[0] for k, t in zip(table["key"].to_pylist(), table["terminal"].to_pylist(), strict=True)}
    assert shown == expected
    page.screenshot(path=str(ARTIFACTS / "browse-candidates.png"), full_page=True)
    _open(page, base, "#/clips?limit=500")
    clips = audit.clip_table(_store(demo))
    assert page.locator("tr.row").count() == clips.num_rows > 0
    page.screenshot(path=str(ARTIFACTS / "browse-clips.png"), full_page=True)


def test_clip_page_plays_with_its_beats(demo, server, page):
    base, _ = server
    beats = _store(demo).latest("beats").to_pylist()
    clip = next(r for r in beats if r["status"] == "ok")
    _open(page, base, f"#/clip/{clip['key']}")
    page.wait_for_selector("#video")
    page.evaluate("() => { const v = document.getElementById('video'); v.muted = true; return v.play(); }")
    page.wait_for_function("document.getElementById('video').readyState >= 2", timeout=60_000)
    start = page.evaluate("document.getElementById('video').currentTime")
    page.wait_for_function(f"document.getElementById('video').currentTime > {start} + 0.3", timeout=60_000)
    assert page.locator(".mark.music").count() == sum(clip["music_beats"]) == clip["n_music_beats"]
    assert page.locator(".mark.video").count() == sum(clip["video_beats"]) == clip["n_video_beats"]
    assert float(page.locator("#playhead").get_attribute("x1")) > 0  # the playhead follows currentTime
    page.wait_for_selector("#matrix tr", timeout=120_000)
    assert page.locator("#frames img").count() == page.locator("#matrix tr").count() == 16
    page.screenshot(path=str(ARTIFACTS / "browse-clip.png"), full_page=True)


def test_dropped_candidate_page_shows_frames_reason_and_retry(demo, server, page):
    base, _ = server
    rows = _store(demo).latest("filter").to_pylist()
    dropped = next(r for r in rows if r["status"] == "dropped")
    _open(page, base, f"#/candidate/{dropped['key']}")
    assert dropped["reason"] in page.locator("#outcome").inner_text()
    assert page.locator("#retry").inner_text().startswith("discomv filter -c ")
    page.wait_for_selector("#matrix tr", timeout=120_000)
    assert page.locator("#frames img").count() == 16
    page.screenshot(path=str(ARTIFACTS / "browse-dropped.png"), full_page=True)
    failed = next(r for r in _store(demo).latest("download").to_pylist() if r["status"] == "failed")
    _open(page, base, f"#/candidate/{failed['key']}")
    assert "run.retry_failed=true" in page.locator("#retry").inner_text()
    page.screenshot(path=str(ARTIFACTS / "browse-failed.png"), full_page=True)


def test_media_range_requests(demo, server):
    _, address = server
    row = next(r for r in _store(demo).latest("download").to_pylist() if r["status"] == "ok")
    data = Path(row["video_path"]).read_bytes()
    status, headers, body = _get(address, f"/media/{row['key']}/video", {"Range": "bytes=100-1099"})
    assert status == 206 and body == data[100:1100]
    assert headers["Content-Range"] == f"bytes 100-1099/{len(data)}"
    status, headers, body = _get(address, f"/media/{row['key']}/video", {"Range": "bytes=-500"})
    assert status == 206 and body == data[-500:]
    status, _, body = _get(address, f"/media/{row['key']}/video")
    assert status == 200 and body == data
    status, headers, _ = _get(address, f"/media/{row['key']}/video", {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"


def test_shard_members_are_read_in_place(demo):
    import json
    import tarfile

    from pipeline.tools.browse.media import Roots, ShardMembers

    shards = demo[0] / "shards"
    tar_path = next(shards.glob("*.tar"))
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        expected = tar.extractfile(member).read()
    members = ShardMembers(Roots(demo[0] / "media", shards, demo[0] / "cache"))
    key = member.name.split(".")[0]
    assert members.read(key, "json") == expected and json.loads(expected)


@pytest.mark.parametrize("path", [
    "/media/..%2F..%2F..%2Fetc%2Fpasswd/video", "/media/../../etc/passwd", "/media/%2Fetc%2Fpasswd/video",
    "/static/../../../etc/passwd", "/static/..%2F__init__.py", "/static/%2Fetc%2Fpasswd", "//etc/passwd",
    "/api/clip/..%2F..%2Fetc%2Fpasswd", "/api/frames/%2E%2E", "/frames/..%2F..%2F/00.jpg", "/frames/x/..%2F00.jpg",
    "/media/x/..%2F..%2Fetc%2Fpasswd", "/api/table/..%2Fcandidates", "/api/table/candidates?sort=key;drop",
])
def test_paths_cannot_escape_the_roots(server, path):
    _, address = server
    status, _, body = _get(address, path)
    if path.endswith("sort=key;drop"):  # an unknown sort column falls back to the key
        assert status == 200
        return
    assert status in (400, 404), (path, status)
    assert b"root:" not in body and b"import" not in body


def test_demo_console_is_ours(demo):
    _, stderr, stdout = demo
    logged = stderr.splitlines()
    lines = logged + stdout.splitlines()
    for pattern in RAY_NOISE:
        noisy = [line for line in lines if re.search(pattern, line)]
        assert not noisy, noisy
    foreign = [line for line in logged if line.strip() and not OUR_LOG_LINE.match(line)]
    assert len(foreign) <= 1 and all(re.search(RAY_KEPT, line) for line in foreign), foreign  # Ray's lines: 1 of ~110
    first_ray = next(i for i, line in enumerate(logged) if "discomv: ray: " in line)
    assert first_ray == 0 and "dashboard" in logged[first_ray], logged[:3]
    for ours in ("discomv: ingest: processed", "discomv: shards: processed", "verify ", "report: "):
        assert any(ours in line for line in lines), ours
    assert not any("|" in line and "%" in line and "row/s" in line for line in lines)  # no bars in a log


def test_a_real_ray_error_still_shows(tmp_path: Path):
    """The settings silence named messages only: a task that raises, an error from the quieted
    logger, and another UserWarning from Ray Data all reach the console."""
    script = tmp_path / "err.py"
    script.write_text(
        "import logging, warnings\n"
        "import ray\n"
        "from pipeline.runner import ensure_ray\n"
        "ensure_ray(1)\n"
        "logging.getLogger('ray.data._internal.progress').error('INJECTED progress error')\n"
        "warnings.warn_explicit('INJECTED other warning', UserWarning, 'x.py', 1,\n"
        "    module='ray.data._internal.execution.operators.actor_pool_map_operator')\n"
        "@ray.remote\n"
        "def boom():\n"
        "    raise ValueError('INJECTED task failure')\n"
        "ray.get(boom.remote())\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for injected in ("INJECTED task failure", "INJECTED progress error", "INJECTED other warning"):
        assert injected in out, out[-2000:]
    assert "Token authentication is enabled" not in out


def test_artifacts_dir_is_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", str(ARTIFACTS / "x.png")], cwd=ROOT, check=False)
    assert ignored.returncode == 0 or shutil.which("git") is None
