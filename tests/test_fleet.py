"""Real yt-dlp through local egress proxies against a server that misbehaves like YouTube under
pressure (pipeline/tools/adversary.py): every failure class, egress health, Retry-After, redirects
re-checked hop by hop, the run budget. One download stage in this process (its own governor);
tests/test_fleet_ray.py runs a fleet of workers on Ray with one governor."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.fleet import recorded
from pipeline.governor import DEFERRED, local
from pipeline.tools.adversary import PUBLIC_ADDRESS, AdversarialServer, EgressProxy
from stages.download import egress_pool

SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@pytest.fixture
def net(media_dir: Path):
    """(server, proxies): the adversary and three egresses, each its own source address."""
    with AdversarialServer(media_dir, stall_s=3.0) as server:
        proxies = [EgressProxy(server.port, source) for source in SOURCES]
        for p in proxies:
            p.__enter__()
        yield server, proxies
        for p in proxies:
            p.__exit__()


@pytest.fixture
def stage(tmp_path: Path, make_stage, net):
    """stage(n_proxies=3, **options): a set-up download stage going out through the egress proxies."""

    def build(n_proxies: int = 3, **options):
        options = {"proxies": [p.url for p in net[1][:n_proxies]], "allow_private_hosts": False,
                   "socket_timeout_s": 1.0, "retries": 2, **options}
        s = make_stage(tmp_path, "download", **options)
        s.setup()
        return s

    return build


def fetch(stage, path: str, key: str = "k"):
    return stage.download_one({"key": key, "url": f"http://{PUBLIC_ADDRESS}/{path}"})


CASES = {  # path → (status, reason class, attempts)
    "moving.mp4": ("ok", "", 1),
    "redirect/public/moving.mp4": ("ok", "", 1),
    "redirect/private/moving.mp4": ("failed", "blocked_host", 1),
    "redirect/loopback/moving.mp4": ("failed", "blocked_host", 1),
    "reset/1/moving.mp4": ("ok", "", 2),
    "stall/1/moving.mp4": ("ok", "", 2),
    "reset/9/moving.mp4": ("failed", "network", 3),
    "status/404/gone.mp4": ("failed", "not_found", 1),
    "status/503/down.mp4": ("failed", "server_error", 3),
    "truncated.mp4": ("failed", "truncated", 1),
}


@pytest.mark.parametrize("path", CASES)
def test_every_failure_class_gets_its_status_reason_and_attempts(stage, path):
    status, reason_class, attempts = CASES[path]
    result = fetch(stage(), path)
    assert (result.status, result.reason.split(":")[0], result.metrics["attempts"]) == (status, reason_class, attempts), \
        result.reason
    assert len(result.metrics["egress"].split(",")) == attempts


def test_a_redirect_to_a_private_address_is_refused_before_any_request_reaches_it(stage, net):
    server, _ = net
    result = fetch(stage(), "redirect/private/moving.mp4")
    assert "169.254.169.254" in result.reason and "allow_private_hosts" in result.reason
    assert [h.path for h in server.hits] == ["/redirect/private/moving.mp4"]
    result = fetch(stage(), "redirect/loopback/moving.mp4", key="k2")
    assert [h.path for h in server.hits][1:] == ["/redirect/loopback/moving.mp4"]  # never followed to /moving.mp4


def test_private_redirect_followed_when_private_hosts_allowed(stage):
    result = fetch(stage(allow_private_hosts=True), "redirect/loopback/moving.mp4")
    assert result.status == "ok", result.reason


def test_a_banned_egress_stops_being_used_while_others_go_on(stage, net):
    server, _ = net
    server.banned.add(SOURCES[1])
    s = stage(egress_cooldown_s=60)
    results = [fetch(s, "moving.mp4", key=f"k{i}") for i in range(6)]
    assert [r.status for r in results] == ["ok"] * 6
    banned_hits = [h for h in server.hits if h.client == SOURCES[1]]
    assert len(banned_hits) == 1 and banned_hits[0].status == 403  # one strike, then cooled down
    used = [e for r in results for e in r.metrics["egress"].split(",")]
    assert used.count(net[1][1].url) == 1
    assert {net[1][0].url, net[1][2].url} <= set(used)
    struck = next(r for r in results if r.metrics["attempts"] == 2)
    assert struck.metrics["egress"].startswith(net[1][1].url)


def test_retry_after_is_honoured_before_the_egress_is_used_again(stage, net):
    server, _ = net
    server.retry_after_s = 1.5
    s = stage(n_proxies=1, egress_cooldown_s=30)
    result = fetch(s, "busy/1/moving.mp4")  # the first GET: 429 with Retry-After
    assert result.status == "ok" and result.metrics["attempts"] == 2, result.reason
    refused = [h for h in server.hits if h.status == 429]
    assert len(refused) == 1
    after = [h for h in server.hits if h.t > refused[0].t]
    assert after and after[0].t - refused[0].t >= 1.5 * 0.95  # Retry-After, not the 30 s cooldown, not less
    assert result.metrics["waited_s"] >= 1.4


def test_the_server_refuses_past_its_per_address_limit(media_dir: Path):
    server = AdversarialServer(media_dir, limit_per_s=3)
    at = [0.0, 0.1, 0.2, 0.3, 0.4, 1.35, 1.5, 1.6, 1.7]
    answers = [server._admit("127.0.0.2", "GET /x", 100 + t)[0] for t in at]
    # a sliding second; refused requests count too (at 1.35 the window holds 0.4 and 1.35)
    assert answers == [200, 200, 200, 429, 429, 200, 200, 200, 429]
    assert server._admit("127.0.0.3", "GET /x", 101.5)[0] == 200  # another address: its own budget
    server.banned.add("127.0.0.4")
    assert server._admit("127.0.0.4", "GET /x", 102)[0] == 403
    server.httpd.server_close()


def test_budget_defers_unstarted_downloads_and_the_spine_records_none_of_them(stage, net):
    server, _ = net
    s = stage(max_bytes="1")
    first = fetch(s, "moving.mp4", key="a")
    assert first.status == "ok"
    hits = len(server.hits)
    later = [fetch(s, "moving.mp4", key=k) for k in ("b", "c")]
    assert all(r.reason.startswith(DEFERRED + ": run budget download.max_bytes=1") for r in later)
    assert len(server.hits) == hits, "no request once the budget is spent"
    rows = [{"key": r.key, "status": r.status, "reason": r.reason} for r in [first, *later]]
    assert [r["key"] for r in recorded(rows)] == ["a"]


def test_egress_pool_from_list_and_file(tmp_path: Path):
    listing = tmp_path / "proxies.txt"
    listing.write_text("# exits\nhttp://user:secret@10.0.0.1:3128 cookies-a.txt\n\nsocks5://10.0.0.2:1080\n")
    pool = egress_pool([str(listing), "direct"], None, "shared.txt")
    assert pool == {"http://10.0.0.1:3128": ("http://user:secret@10.0.0.1:3128", "cookies-a.txt"),
                    "socks5://10.0.0.2:1080": ("socks5://10.0.0.2:1080", "shared.txt"),
                    "direct": (None, "shared.txt")}
    assert egress_pool([], "http://p:1", None) == {"http://p:1": ("http://p:1", None)}


def test_each_egress_gets_its_own_proxy_and_cookies(tmp_path: Path, make_stage):
    s = make_stage(tmp_path, "download", proxies=["http://a:1 ca.txt", "http://b:2"], cookies_file="c.txt")
    s.setup()
    assert s._ydl_options("k", "http://a:1")["cookiefile"] == "ca.txt"
    opts = s._ydl_options("k", "http://b:2")
    assert (opts["proxy"], opts["cookiefile"]) == ("http://b:2", "c.txt")


def test_yt_dlp_plugins_load_from_the_configured_folder(tmp_path: Path, make_stage):
    from yt_dlp.globals import plugin_dirs, plugin_ies

    package = tmp_path / "plugins" / "fleet-test" / "yt_dlp_plugins" / "extractor"
    package.mkdir(parents=True)
    (package / "fleettest.py").write_text(
        "from yt_dlp.extractor.common import InfoExtractor\n\n"
        "class FleetTestIE(InfoExtractor):\n    _VALID_URL = r'fleettest:(?P<id>.+)'\n")
    before = plugin_dirs.value
    try:
        s = make_stage(tmp_path, "download", plugin_dirs=[str(tmp_path / "plugins")])
        s.setup()
        assert "FleetTestIE" in plugin_ies.value
    finally:
        plugin_dirs.value = before


def test_governor_settings_follow_the_config(tmp_path: Path, make_stage):
    s = make_stage(tmp_path, "download", requests_per_s=20, rate_limit="2M", max_bytes="1G", max_hours=2,
                   proxies=["http://a:1", "direct"], governor=False)
    g = s.governor_settings()
    assert (g.requests_per_s, g.bytes_per_s, g.max_bytes, g.max_hours) == (20.0, 2 * 1024**2, 1024**3, 2.0)
    assert g.egresses == ["http://a:1", "direct"] and g.fleet is False
    assert local(g).settings is g


def test_outside_ray_attach_leaves_the_stage_its_own_governor(tmp_path: Path, make_stage, monkeypatch):
    import ray

    from pipeline.fleet import attach
    from pipeline.governor import LocalGovernor

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a plain process (this session may run Ray)
    s = make_stage(tmp_path, "download", requests_per_s=8.0, concurrency=4)
    attach(s)
    s.setup()
    assert isinstance(s.governor.call.__self__, LocalGovernor)
    assert s.governor.settings.requests_per_s == 8.0  # a plain process is the whole fleet: no split
