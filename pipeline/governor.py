"""The download governor: what every download worker asks before each HTTP request, so a fleet of
workers behaves toward YouTube as one client.

`GovernorCore` holds the state: token buckets for requests/s and bytes/s (fleet-wide caps), a
circuit breaker over the fleet's most recent attempts (honouring Retry-After), per-egress (proxy)
health with cooldowns that double on each strike, and the run's budget (bytes, hours). Its one
method, `grant`, takes reports and asks for tokens in one call, so under Ray it is one actor call
(pipeline/fleet.py) and in a plain process a direct call.

`GovernorClient` is what a stage holds: it leases tokens in small batches (a worker asks once per
`lease_s` of its share, not once per request), reports outcomes, picks egresses. A leased token
unused after `lease_s` is handed back, so leases never let the fleet exceed its caps by more than a
bucket's burst. A plain module: no Ray (stages import it)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

EGRESS_STRIKES = ("rate_limited", "forbidden", "bot_check")  # the exit address is throttled or banned
DEFERRED = "deferred"  # the reason class of a row left pending (run budget reached): never recorded
LEASE_MAX = 64  # request tokens per grant, at most


@dataclass
class GovernorSettings:
    """Plain data (crosses to the Ray actor as a dict)."""

    requests_per_s: float | None = None  # fleet cap; None: uncapped
    bytes_per_s: float | None = None
    burst_s: float = 0.05  # bucket depth, in seconds of the cap
    lease_s: float = 0.1  # a leased token is used within this or handed back
    breaker_window: int = 20
    breaker_threshold: float = 0.8
    breaker_cooldown_s: float = 60.0
    egresses: list[str] = field(default_factory=lambda: ["direct"])
    egress_cooldown_s: float = 60.0
    egress_cooldown_max_s: float = 3600.0
    max_bytes: int | None = None
    max_hours: float | None = None
    fleet: bool = True  # under Ray: one governor actor for all workers
    name: str = "discomv-governor"

    def split(self, workers: int) -> GovernorSettings:
        """This worker's share when each worker governs itself (no fleet governor)."""
        n = max(1, workers)
        return GovernorSettings(**{
            **asdict(self),
            "requests_per_s": self.requests_per_s / n if self.requests_per_s else None,
            "bytes_per_s": self.bytes_per_s / n if self.bytes_per_s else None,
            "max_bytes": self.max_bytes // n if self.max_bytes else None,
        })


class TokenBucket:
    def __init__(self, rate: float | None, depth_s: float, clock: Callable[[], float]) -> None:
        self.rate, self.clock = rate, clock
        self.capacity = max(1.0, rate * depth_s) if rate else math.inf
        self.tokens = self.capacity if rate else math.inf
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        if self.rate:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def give_back(self, n: float) -> None:
        self._refill()
        self.tokens = min(self.capacity, self.tokens + n)

    def take(self, want: int, at_least: int = 1) -> tuple[int, float]:
        """(granted, 0) with granted ≤ want, or (0, seconds until `at_least` tokens are there)."""
        if want <= 0:
            return 0, 0.0
        self._refill()
        at_least = max(1, min(want, at_least, self.capacity))
        if self.tokens >= at_least:
            granted = int(min(want, self.tokens))
            self.tokens -= granted
            return granted, 0.0
        return 0, (at_least - self.tokens) / self.rate  # a finite rate: an uncapped bucket never runs dry


@dataclass
class Egress:
    name: str
    until: float = 0.0  # cooling down until then
    strikes: int = 0
    attempts: int = 0
    assigned: int = 0
    failures: int = 0
    last_class: str = ""


class GovernorCore:
    """The fleet's state. Not thread-safe by itself: the Ray actor runs one call at a time, and
    `LocalGovernor` holds a lock."""

    def __init__(self, settings: GovernorSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.clock = settings, clock
        self.requests = TokenBucket(settings.requests_per_s, settings.burst_s, clock)
        self.bytes = TokenBucket(settings.bytes_per_s, max(settings.burst_s, 0.25), clock)
        self.recent: deque[tuple[bool, float]] = deque(maxlen=max(1, settings.breaker_window))
        self.open_until = 0.0
        self.egresses = {name: Egress(name) for name in settings.egresses or ["direct"]}
        self.started = clock()
        self.bytes_done = 0
        self.stats = {"calls": 0, "requests_granted": 0, "requests_returned": 0, "bytes_granted": 0,
                      "breaker_trips": 0, "cap_waits": 0}  # cap_waits: asks the request cap made wait

    def grant(self, want_requests: int = 0, want_bytes: int = 0, outcomes: list[list[Any]] | None = None,
              returned: int = 0, want_egress: bool = False) -> dict[str, Any]:
        """Apply `outcomes` ([egress, error class or "", transient, retry_after_s or None, bytes] each),
        take back `returned` unused request tokens, then grant what the caps allow now; with
        `want_egress`, also assign the usable egress given out least so far (`egress`)."""
        now = self.clock()
        self.stats["calls"] += 1
        if returned:
            self.requests.give_back(returned)
            self.stats["requests_returned"] += returned
        for outcome in outcomes or ():
            self._apply(now, *outcome)
        usable = [e.name for e in self.egresses.values() if e.until <= now]
        answer: dict[str, Any] = {"requests": 0, "bytes": 0, "wait_s": 0.0, "budget": self._budget(now),
                                  "egresses": usable, "paused": self.open_until > now,
                                  "egress_wait_s": 0.0 if usable else min(e.until for e in self.egresses.values()) - now}
        if want_egress and usable and not answer["budget"]:
            chosen = min((self.egresses[n] for n in usable), key=lambda e: e.assigned)
            chosen.assigned += 1
            answer["egress"] = chosen.name
        if answer["paused"]:
            answer["wait_s"] = self.open_until - now
            return answer
        answer["requests"], wait_r = self.requests.take(want_requests)
        answer["bytes"], wait_b = self.bytes.take(want_bytes, at_least=want_bytes // 4)
        answer["wait_s"] = max(wait_r, wait_b)
        self.stats["cap_waits"] += wait_r > 0
        self.stats["requests_granted"] += answer["requests"]
        self.stats["bytes_granted"] += answer["bytes"]
        return answer

    def _apply(self, now: float, egress: str, error_class: str, transient: bool, retry_after: float | None,
               nbytes: int) -> None:
        self.bytes_done += nbytes
        if error_class == "bytes":  # a byte count only, not an attempt
            return
        e = self.egresses.setdefault(egress, Egress(egress))
        e.attempts += 1
        e.last_class = error_class
        if error_class in EGRESS_STRIKES:
            e.failures += 1
            e.strikes += 1
            s = self.settings
            backoff = min(s.egress_cooldown_max_s, s.egress_cooldown_s * 2 ** (e.strikes - 1))
            # a 429 that says when to come back is taken at its word; bans back off, doubling
            pause = retry_after if retry_after is not None and error_class == "rate_limited" else backoff
            e.until = max(e.until, now + pause)
        elif not error_class:
            e.strikes = 0
        self.recent.append((bool(transient and error_class), retry_after or 0.0))
        window = self.recent
        failed = sum(f for f, _ in window)
        if len(window) == window.maxlen and failed / len(window) >= self.settings.breaker_threshold:
            # the whole fleet pauses: the cooldown, or the longest Retry-After the window was told
            self.open_until = now + max(self.settings.breaker_cooldown_s, *(r for _, r in window))
            self.stats["breaker_trips"] += 1
            window.clear()

    def _budget(self, now: float) -> str | None:
        s = self.settings
        if s.max_bytes is not None and self.bytes_done >= s.max_bytes:
            return f"{DEFERRED}: run budget download.max_bytes={s.max_bytes} reached ({self.bytes_done} bytes)"
        if s.max_hours is not None and now - self.started >= s.max_hours * 3600:
            return f"{DEFERRED}: run budget download.max_hours={s.max_hours:g} reached"
        return None

    def state(self) -> dict[str, Any]:
        now = self.clock()
        return {**self.stats, "bytes_done": self.bytes_done, "breaker_open_s": max(0.0, self.open_until - now),
                "egresses": {n: {**asdict(e), "cooling_s": max(0.0, e.until - now)} for n, e in self.egresses.items()}}


class LocalGovernor:
    """A GovernorCore behind a lock: the governor of one process."""

    def __init__(self, settings: GovernorSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.core = GovernorCore(settings, clock)
        self.lock = threading.Lock()

    def grant(self, *args: Any) -> dict[str, Any]:
        with self.lock:
            return self.core.grant(*args)


class BudgetReached(Exception):
    pass


class EgressCooling(Exception):
    """The egress of an attempt in flight was struck meanwhile (by any worker): stop using it now."""


class GovernorClient:
    """What a download stage holds. `call(want_requests, want_bytes, outcomes, returned)` reaches the
    governor: a LocalGovernor's `grant`, or the fleet actor's (pipeline/fleet.py)."""

    def __init__(self, call: Callable[..., dict[str, Any]], settings: GovernorSettings,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.call, self.settings, self.sleep, self.clock = call, settings, sleep, clock
        self.lock = threading.RLock()
        self.leased = 0
        self.lease_until = 0.0
        self.byte_credit = 0
        self.outcomes: list[list[Any]] = []
        self.usable = list(settings.egresses or ["direct"])
        self.budget: str | None = None
        self.waited_s = 0.0  # total seconds spent waiting on the governor

    def _ask(self, want_requests: int = 0, want_bytes: int = 0, want_egress: bool = False) -> dict[str, Any]:
        returned = self.leased if self.clock() >= self.lease_until else 0
        outcomes, self.outcomes = self.outcomes, []
        answer = self.call(want_requests, want_bytes, outcomes, returned, want_egress)
        self.leased = 0 if answer["paused"] else self.leased - returned  # a tripped breaker voids leases
        self.usable = answer["egresses"]
        self.budget = answer["budget"]
        if answer["requests"]:
            self.leased += answer["requests"]
            self.lease_until = self.clock() + self.settings.lease_s
        self.byte_credit += answer["bytes"]
        return answer

    def _wait(self, seconds: float) -> None:
        seconds = max(0.001, seconds)
        self.sleep(seconds)
        self.waited_s += seconds

    def _lease_size(self) -> int:
        rate = self.settings.requests_per_s
        return LEASE_MAX if not rate else max(1, min(LEASE_MAX, int(rate * self.settings.lease_s / 4)))

    def acquire_request(self, egress: str | None = None) -> None:
        """Block until one request may go out through `egress`; raises EgressCooling when the
        governor has since taken `egress` out of use."""
        with self.lock:
            while True:  # a spent budget stops new attempts (choose_egress), not those in flight
                if egress is not None and egress not in self.usable:
                    raise EgressCooling(egress)
                if self.leased > 0 and self.clock() < self.lease_until:
                    self.leased -= 1
                    return
                answer = self._ask(want_requests=self._lease_size())
                if not answer["requests"]:
                    self._wait(answer["wait_s"])

    def consume_bytes(self, n: int) -> None:
        """Account for `n` bytes received; blocks while the fleet's byte rate is over its cap."""
        with self.lock:
            self.outcomes.append(["", "bytes", False, None, n])
            if not self.settings.bytes_per_s:
                if len(self.outcomes) > 32:
                    self._ask()
                return
            self.byte_credit -= n
            while self.byte_credit < 0:
                answer = self._ask(want_bytes=max(-self.byte_credit, int(self.settings.bytes_per_s * self.settings.lease_s)))
                if self.byte_credit < 0 and answer["wait_s"]:
                    self._wait(answer["wait_s"])

    def choose_egress(self) -> str:
        """The egress for one attempt, assigned by the governor (the usable one given out least, so
        workers spread over the pool and none is handed a banned one it has not heard of); waits
        while every egress cools down."""
        with self.lock:
            answer = self._ask(want_egress=True)
            while not answer.get("egress") and not self.budget:
                self._wait(answer["egress_wait_s"] or answer["wait_s"])
                answer = self._ask(want_egress=True)
            if self.budget:
                raise BudgetReached(self.budget)
            return answer["egress"]

    def report(self, egress: str, error_class: str, transient: bool, retry_after: float | None = None) -> None:
        """One attempt's outcome (error_class "" for success); failures reach the governor at once."""
        with self.lock:
            self.outcomes.append([egress, error_class, transient, retry_after, 0])
            if error_class:
                self._ask()

    def check_budget(self) -> str | None:
        """The budget reason once the run's budget is spent (asks the governor if nothing is known)."""
        with self.lock:
            if self.budget is None and (self.settings.max_bytes is not None or self.settings.max_hours is not None):
                self._ask()
            return self.budget


def local(settings: GovernorSettings, sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic) -> GovernorClient:
    """A client of a governor in this process (no Ray: unit tests, a plain run, or `governor: false`)."""
    return GovernorClient(LocalGovernor(settings, clock).grant, settings, sleep=sleep, clock=clock)
