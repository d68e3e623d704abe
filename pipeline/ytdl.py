"""yt-dlp, governed: every HTTP request yt-dlp makes (extractor pages, the media itself, each hop of a
redirect) first takes a token from the download governor (pipeline/governor.py), every URL and
every redirect hop must resolve to a public address unless private hosts are allowed, and what the
server answered (status, Retry-After, a bot-check page) is kept on the `Attempt` so the caller
classifies the failure from facts rather than from yt-dlp's message alone.

yt-dlp follows redirects inside its request handlers; the hop check hooks the redirect handler of
its urllib handler, so http(s) goes through that handler only (requests/curl_cffi are not used)."""

from __future__ import annotations

import email.utils
import logging
import re
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import yt_dlp
from yt_dlp.networking.exceptions import HTTPError, RequestError

from pipeline.governor import EgressCooling, GovernorClient
from pipeline.hosts import HostRefused, check_public_url

log = logging.getLogger("discomv")

BOT_PAGE = re.compile(rb"(?i)not a bot|confirm you.re not a robot")
HANDLERS = ("Urllib", "Websockets")  # the only ones this YoutubeDL builds (see the module doc)


@dataclass
class Attempt:
    """What one download attempt saw at the HTTP level."""

    egress: str
    requests: int = 0
    status: int | None = None
    retry_after: float | None = None
    bot_page: bool = False
    blocked: str | None = None  # why a URL or redirect hop was refused
    cooled: bool = False  # the governor took this egress out of use mid-attempt


def retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def hop_refusal(url: str, allow_private_hosts: bool) -> str | None:
    try:
        check_public_url(url, allow_private_hosts)
    except HostRefused as e:
        return f"{url} ({e})"
    return None


class GovernedYoutubeDL(yt_dlp.YoutubeDL):
    def __init__(self, params: dict[str, Any], governor: GovernorClient, attempt: Attempt,
                 allow_private_hosts: bool) -> None:
        self.governor, self.attempt, self.allow_private_hosts = governor, attempt, allow_private_hosts
        super().__init__(params)

    def build_request_director(self, handlers: Any, preferences: Any = None) -> Any:
        director = super().build_request_director([h for h in handlers if h.RH_KEY in HANDLERS], preferences)
        urllib_rh = director.handlers.get("Urllib")
        if urllib_rh is not None:
            urllib_rh._create_instance = self._guard_redirects(urllib_rh._create_instance)
        return director

    def _guard_redirects(self, create: Callable[..., Any]) -> Callable[..., Any]:
        from yt_dlp.networking._urllib import RedirectHandler

        def create_checked(*args: Any, **kwargs: Any) -> Any:
            opener = create(*args, **kwargs)
            for handler in opener.handlers:
                if isinstance(handler, RedirectHandler):
                    handler.redirect_request = self._checked_hop(handler.redirect_request)
            return opener

        return create_checked

    def _checked_hop(self, follow: Callable[..., Any]) -> Callable[..., Any]:
        def redirect_request(req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
            refusal = hop_refusal(newurl, self.allow_private_hosts)
            if refusal:
                self.attempt.blocked = f"redirect to {refusal}"
                raise urllib.error.HTTPError(req.full_url, code, f"redirect refused: {refusal}", headers, fp)
            self._take_token()
            return follow(req, fp, code, msg, headers, newurl)

        return redirect_request

    def _take_token(self) -> None:
        try:
            self.governor.acquire_request(self.attempt.egress)
        except EgressCooling:
            self.attempt.cooled = True
            raise
        self.attempt.requests += 1

    def urlopen(self, req: Any) -> Any:
        url = req if isinstance(req, str) else getattr(req, "url", None) or req.full_url
        refusal = hop_refusal(url, self.allow_private_hosts)
        if refusal:
            self.attempt.blocked = refusal
            raise RequestError(f"refused: {refusal}")
        self._take_token()
        try:
            return super().urlopen(req)
        except HTTPError as e:
            self._note(e)
            raise

    def _note(self, error: HTTPError) -> None:
        self.attempt.status = error.status
        response = error.response
        self.attempt.retry_after = retry_after_s(response.headers.get("Retry-After")) if response else None
        if response is not None and error.status in (403, 429):
            try:
                self.attempt.bot_page = bool(BOT_PAGE.search(response.read(16384)))
            except Exception:  # the body is a hint only; a failed read changes nothing
                pass


def progress_counter(governor: GovernorClient) -> Callable[[dict[str, Any]], None]:
    """A yt-dlp progress hook that accounts received bytes with the governor (blocking while the
    fleet is over its byte cap: that slows the transfer itself)."""
    seen: dict[str, int] = {}

    def hook(progress: dict[str, Any]) -> None:
        name = progress.get("tmpfilename") or progress.get("filename") or ""
        done = int(progress.get("downloaded_bytes") or 0)
        delta = done - seen.get(name, 0)
        seen[name] = done
        if delta > 0:
            governor.consume_bytes(delta)

    return hook


class QuietLogger:
    """yt-dlp's messages: its warnings and errors at debug level (failures are classified, not logged)."""

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    def error(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)
