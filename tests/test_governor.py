"""The download governor's state machine on a fake clock: caps, leases, the fleet breaker, egress
health, the run budget (pipeline/governor.py)."""

from __future__ import annotations

import threading

import pytest

from pipeline.governor import (
    DEFERRED,
    BudgetReached,
    GovernorClient,
    GovernorCore,
    GovernorSettings,
    LocalGovernor,
    TokenBucket,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def client(settings: GovernorSettings, clock: Clock) -> tuple[GovernorClient, GovernorCore]:
    core = GovernorCore(settings, clock=clock)
    return GovernorClient(core.grant, settings, sleep=clock.sleep, clock=clock), core


def test_bucket_grants_no_more_than_its_rate_over_time():
    clock = Clock()
    bucket = TokenBucket(100.0, 0.05, clock)
    granted = 0
    for _ in range(10_000):
        n, wait = bucket.take(3)
        granted += n
        clock.sleep(wait or 0.001)
    elapsed = clock.now - 1000.0
    assert granted <= 100 * elapsed + bucket.capacity
    assert granted >= 0.95 * 100 * elapsed


def test_many_clients_share_one_request_cap():
    """Four clients asking as fast as they can get the cap between them, not four times it."""
    clock = Clock()
    settings = GovernorSettings(requests_per_s=50.0)
    core = GovernorCore(settings, clock=clock)
    clients = [GovernorClient(core.grant, settings, sleep=lambda s: None, clock=clock) for _ in range(4)]
    used = 0
    for _ in range(20_000):  # 20 s of fake time in steps of 1 ms
        for c in clients:
            if c.leased > 0 and clock() < c.lease_until or c._ask(want_requests=c._lease_size())["requests"]:
                c.leased -= 1
                used += 1
        clock.sleep(0.001)
    assert 50 * 20 * 0.95 <= used <= 50 * 20 * 1.01 + 4


def test_unused_lease_tokens_go_back():
    clock = Clock()
    settings = GovernorSettings(requests_per_s=400.0, lease_s=0.1)
    c, core = client(settings, clock)
    c.acquire_request()
    leased = c.leased
    assert leased == 9  # a lease of 10 (a quarter of what 0.1 s of the cap allows), one used
    clock.now += 0.05
    c.acquire_request()  # within the lease: no call
    assert core.stats["calls"] == 1 and c.leased == 8
    clock.now += 0.1  # expired: the 8 unused go back with the next call
    c.acquire_request()
    assert core.stats["requests_returned"] == 8 and core.stats["calls"] == 2


def test_breaker_trips_on_fleet_failures_and_honours_retry_after():
    clock = Clock()
    settings = GovernorSettings(requests_per_s=None, breaker_window=4, breaker_threshold=0.75,
                                breaker_cooldown_s=5.0, egresses=["a", "b"], egress_cooldown_s=0.0)
    core = GovernorCore(settings, clock=clock)
    outcomes = [["a", "rate_limited", True, 30.0, 0], ["b", "server_error", True, None, 0],
                ["a", "", False, None, 0], ["b", "network", True, None, 0]]
    answer = core.grant(1, 0, outcomes)
    assert answer["wait_s"] == pytest.approx(30.0)  # tripped: Retry-After (30 s) beats the 5 s cooldown
    assert answer["requests"] == 0 and core.stats["breaker_trips"] == 1
    clock.now += 29.0
    assert core.grant(1, 0)["requests"] == 0
    clock.now += 1.5
    assert core.grant(1, 0)["requests"] == 1


def test_a_struck_egress_cools_down_doubling_and_others_go_on():
    clock = Clock()
    settings = GovernorSettings(egresses=["a", "b"], egress_cooldown_s=10.0, breaker_window=100)
    c, core = client(settings, clock)
    c.report("a", "bot_check", True)
    assert c.usable == ["b"]
    assert {c.choose_egress() for _ in range(5)} == {"b"}
    clock.now += 10.5
    c.choose_egress()
    assert set(c.usable) == {"a", "b"}
    c.report("a", "forbidden", True)  # second strike: 20 s
    clock.now += 15.0
    c.choose_egress()
    assert c.usable == ["b"]
    c.report("b", "rate_limited", True, retry_after=3.0)  # a 429's Retry-After is taken at its word
    assert core.egresses["b"].until == pytest.approx(clock.now + 3.0)
    waited = c.waited_s
    c.choose_egress()  # no egress usable: the client waits for the first to come back
    assert c.waited_s - waited == pytest.approx(3.0, abs=0.01)


def test_success_clears_strikes():
    clock = Clock()
    core = GovernorCore(GovernorSettings(egresses=["a"], egress_cooldown_s=1.0), clock=clock)
    core.grant(0, 0, [["a", "forbidden", True, None, 0]])
    clock.now += 2
    core.grant(0, 0, [["a", "", False, None, 0]])
    assert core.egresses["a"].strikes == 0


def test_byte_cap_slows_consumers():
    clock = Clock()
    settings = GovernorSettings(bytes_per_s=1_000_000.0)
    c, _ = client(settings, clock)
    for _ in range(100):
        c.consume_bytes(100_000)  # 10 MB
    assert clock.now - 1000.0 == pytest.approx(10.0, rel=0.1)


def test_budget_in_bytes_then_every_request_is_deferred():
    clock = Clock()
    settings = GovernorSettings(max_bytes=1000)
    c, _ = client(settings, clock)
    c.acquire_request()
    assert c.check_budget() is None
    c.consume_bytes(1200)
    c.report("direct", "", False)
    reason = c.check_budget()
    assert reason and reason.startswith(DEFERRED + ":") and "max_bytes=1000" in reason
    c.acquire_request()  # an attempt in flight finishes
    with pytest.raises(BudgetReached):
        c.choose_egress()  # no new one starts


def test_budget_in_hours():
    clock = Clock()
    c, _ = client(GovernorSettings(max_hours=0.5), clock)
    assert c.check_budget() is None
    clock.now += 1801
    assert "max_hours=0.5" in (c.check_budget() or "")


def test_split_shares_caps_when_each_worker_governs_itself():
    s = GovernorSettings(requests_per_s=40.0, bytes_per_s=8e6, max_bytes=1000).split(4)
    assert (s.requests_per_s, s.bytes_per_s, s.max_bytes) == (10.0, 2e6, 250)


def test_local_governor_is_thread_safe():
    governor = LocalGovernor(GovernorSettings(requests_per_s=None))

    def hammer() -> None:
        for _ in range(2000):
            governor.grant(1, 0, [["direct", "", False, None, 1]], 0)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert governor.core.stats["calls"] == 8000 and governor.core.bytes_done == 8000
