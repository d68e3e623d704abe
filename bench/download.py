"""Download at fleet scale against a local server that behaves like YouTube under pressure
(pipeline/tools/adversary.py): 4 Ray download workers go out through 3 egress proxies, one of them
banned (bot-check page), the server answers 429 + Retry-After past `--server-limit` requests/s per
client address, and a 429 burst hits the middle of the run. Measured at the server, in one run:

- the fleet governor (one actor, `download.governor: true`): fleet requests/s and bytes/s vs the
  caps and vs the server's own limit, 429s taken, banned-egress hits, time lost to backoff;
- baseline, same candidates: each worker its own governor with an even share of the caps
  (`download.governor: false`, the behaviour before the fleet governor);
- the governor actor alone: grants/s from 8 concurrent clients (is it a bottleneck?).

    python bench/download.py [--candidates 60] [--workers 4] [--cap 6] [--bytes-cap 120K] [--server-limit 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import record  # noqa: E402

from pipeline import fleet  # noqa: E402
from pipeline.governor import GovernorSettings  # noqa: E402
from pipeline.runner import ensure_ray  # noqa: E402
from pipeline.tools import synth  # noqa: E402
from pipeline.tools.adversary import PUBLIC_ADDRESS, AdversarialServer, EgressProxy  # noqa: E402
from pipeline.tools.fleetharness import dispatch, start_workers, windows  # noqa: E402
from stages import load_config_dict  # noqa: E402

SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
BANNED = SOURCES[1]
RETRY_AFTER = 2.0


def media(root: Path, n: int) -> list[str]:
    one = synth.make_video(root / "one.mp4", "moving", duration_s=2, seed=1, size="128x96")
    for i in range(n):
        target = root / f"v{i:03d}.mp4"
        if not target.exists():
            target.hardlink_to(one)
    return [f"v{i:03d}.mp4" for i in range(n)]


def run_fleet(args: argparse.Namespace, root: Path, names: list[str], governed: bool) -> dict:
    """One run of every candidate through `args.workers` workers; figures measured at the server."""
    out = Path(tempfile.mkdtemp(prefix="fleet-", dir=root))
    with AdversarialServer(root, limit_per_s=args.server_limit, retry_after_s=RETRY_AFTER) as server:
        proxies = [EgressProxy(server.port, s).__enter__() for s in SOURCES]
        server.banned.add(BANNED)
        cfg = load_config_dict({
            "run": {"manifest_root": str(out / "m"), "media_root": str(out / "media"), "weights": "random"},
            "ingest": {"inputs": ["unused"]},
            "download": {"proxies": [p.url for p in proxies], "requests_per_s": args.cap,
                         "rate_limit": args.bytes_cap, "governor": governed, "concurrency": args.workers,
                         "egress_cooldown_s": 600, "retries": 4, "backoff_s": 0.5, "backoff_max_s": 4,
                         "breaker_window": 12, "breaker_cooldown_s": RETRY_AFTER},
        })
        stage_cls = cfg.registry["download"]
        stage = stage_cls(cfg.stage("download"), cfg.run)
        fleet.start(stage)
        workers = start_workers(args.workers, json.dumps(cfg.as_dict()), stage_cls)
        rows = [{"key": f"b{i:04d}", "url": f"http://{PUBLIC_ADDRESS}/{n}"} for i, n in enumerate(names)]
        burst: dict[str, float] = {}

        def overload_once(results: list[dict]) -> None:
            if len(results) >= len(rows) // 2 and not burst:
                burst["at"] = time.monotonic()
                server.overload(RETRY_AFTER)

        started = time.monotonic()
        results, _ = dispatch(workers, rows, overload_once)
        seconds = time.monotonic() - started
        import ray

        received = fleet.state(stage)["bytes_done"] if governed else sum(r.get("file_bytes") or 0 for r in results)
        for w in workers:
            ray.kill(w)
        for p in proxies:
            p.__exit__()
    hits = sorted(server.hits, key=lambda h: h.t)
    times = [h.t for h in hits]
    return {
        "seconds": seconds,
        "ok": sum(r["status"] == "ok" for r in results),
        "candidates": len(rows),
        "statuses": Counter(r["status"] for r in results),
        "requests": len(hits),
        "req_s": len(hits) / seconds,
        "peak_req_s_1s": max(windows(times, 1.0)),
        "peak_req_s_4s": max(windows(times, 4.0)) / 4.0,
        "bytes_s": received / seconds,  # what workers received (the server's count includes unread probes)
        "r429": sum(h.status == 429 for h in hits),
        "banned_hits": sum(h.client == BANNED for h in hits),
        "waited_s": sum(r.get("waited_s") or 0.0 for r in results),
        "worker_s": seconds * args.workers,
    }


def grants_per_s(clients: int = 8, seconds: float = 3.0) -> tuple[float, float]:
    """(grant calls/s, request tokens/s) the governor actor answers to `clients` Ray tasks at once."""
    import ray

    settings = GovernorSettings(requests_per_s=None, name="discomv-governor-bench")
    actor = fleet._actor_class().options(name=settings.name, get_if_exists=True).remote(
        {**settings.__dict__, "egresses": ["direct"]})

    @ray.remote(num_cpus=0)
    def hammer(seconds: float) -> tuple[int, int, float, float]:
        handle = ray.get_actor(settings.name)
        calls = tokens = 0
        first = time.time()
        while time.time() < first + seconds:
            tokens += ray.get(handle.grant.remote(8, 0, [["direct", "", False, None, 0]], 0, False))["requests"]
            calls += 1
        return calls, tokens, first, time.time()

    ray.get(actor.state.remote())
    done = ray.get([hammer.remote(seconds) for _ in range(clients)])
    ray.kill(actor)
    span = max(d[3] for d in done) - min(d[2] for d in done)  # clients start at different times
    return sum(d[0] for d in done) / span, sum(d[1] for d in done) / span


def line(label: str, f: dict, args: argparse.Namespace, server_limit: float) -> str:
    return (f"{label}: {f['ok']}/{f['candidates']} ok in {f['seconds']:.1f} s; {f['req_s']:.2f} requests/s "
            f"(peak over 4 s {f['peak_req_s_4s']:.2f}, over 1 s {f['peak_req_s_1s']}) vs cap {args.cap:g} and "
            f"server limit {server_limit:g}; {f['bytes_s'] / 1024:.0f} KiB/s vs cap {args.bytes_cap}; "
            f"{f['r429']} × 429, banned egress hit {f['banned_hits']}×; waiting (governor + backoff) "
            f"{f['waited_s']:.1f} s = {f['waited_s'] / f['worker_s']:.0%} of worker time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=60)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cap", type=float, default=6.0, help="download.requests_per_s (fleet)")
    parser.add_argument("--bytes-cap", default="256K", help="download.rate_limit (fleet bytes/s)")
    parser.add_argument("--server-limit", type=int, default=5, help="the server's requests/s per client address")
    args = parser.parse_args()
    ensure_ray()
    server_limit = args.server_limit * (len(SOURCES) - 1)  # per address × the egresses not banned
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        root = Path(tmp)
        names = media(root, args.candidates)
        ours = run_fleet(args, root, names, governed=True)
        base = run_fleet(args, root, names, governed=False)
    calls, tokens = grants_per_s()
    print(line("fleet governor", ours, args, server_limit))
    print(line("per-worker governors (baseline)", base, args, server_limit))
    print(f"governor actor: {calls:,.0f} grant calls/s from 8 clients = {tokens:,.0f} request tokens/s "
          "(leases of 8 tokens)")
    record(
        "download (`bench/download.py`)",
        f"fleet governor: {ours['req_s']:.2f} req/s (peak {ours['peak_req_s_4s']:.2f} over 4 s) vs cap "
        f"{args.cap:g}, server limit {server_limit:g}; {ours['bytes_s'] / 1024:.0f} KiB/s vs cap {args.bytes_cap}; "
        f"{ours['r429']} × 429, banned egress hit {ours['banned_hits']}×; "
        f"{ours['waited_s'] / ours['worker_s']:.0%} of worker time waiting; {ours['ok']}/{ours['candidates']} ok",
        f"per-worker governors: {base['req_s']:.2f} req/s (peak {base['peak_req_s_4s']:.2f}); "
        f"{base['r429']} × 429, banned egress hit {base['banned_hits']}×; "
        f"{base['waited_s'] / base['worker_s']:.0%} waiting; {base['ok']}/{base['candidates']} ok",
        round(base["r429"] / max(1, ours["r429"]), 2),
        f"ratio = 429s taken, baseline ÷ governor; {args.workers} Ray workers, 3 proxies (1 banned), a "
        f"{RETRY_AFTER:g} s 429 burst mid-run; governor actor {calls:,.0f} grants/s = {tokens:,.0f} tokens/s",
        figures={"ours": ours | {"statuses": dict(ours["statuses"])},
                 "baseline": base | {"statuses": dict(base["statuses"])},
                 "grant_calls_s": calls, "grant_tokens_s": tokens},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
