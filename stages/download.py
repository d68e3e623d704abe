"""download: yt-dlp (Python API) fetches low-res video + audio into `<media_root>/video/<key>.mp4`.

Every candidate ends `ok` or `failed` with a `class: message` reason. Transient failures (429,
5xx, timeouts, bot checks) are retried with exponential backoff; permanent ones (404, private,
removed, unsupported) are not. Every HTTP request first asks the download governor
(pipeline/governor.py; under Ray one actor for the whole fleet, pipeline/fleet.py): fleet caps on
requests/s and bytes/s, a circuit breaker over the fleet's recent attempts, per-proxy health (a
proxy that gets 429/403/bot pages cools down) and the run's budget. Each attempt goes out through
one egress of `download.proxies`; redirects are re-checked hop by hop (pipeline/ytdl.py). After the
download, ffprobe and a tail decode check the file. Once the run's budget is spent, rows not yet
started come back `deferred` (pipeline/governor.py DEFERRED): the spine records nothing for them,
so they stay pending for the next run.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa

from pipeline.governor import BudgetReached, EgressCooling, GovernorClient, GovernorSettings, local
from pipeline.hosts import HostRefused, check_public_url
from pipeline.media.probe import MediaError, check_tail_decodes, probe
from pipeline.media.staging import media_store
from pipeline.options import ConfigError, WorkerOptions, option
from pipeline.stage import Resources, Result, Row, Stage

log = logging.getLogger("discomv")
COOLED = "egress_cooling"  # an attempt stopped because its egress was struck meanwhile (not recorded)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".m4a", ".mov")  # what yt-dlp leaves as a finished download


@dataclass
class DownloadConfig(WorkerOptions):
    format: str = option(
        "bv*[height<=?360]+ba/b[height<=?360]/wv*+ba/w",
        "yt-dlp format selector (default: ≤360p video + best audio, merged)",
    )
    max_duration_s: float | None = option(1800.0, "fail videos longer than this (seconds)")
    sections: str | None = option(None, "download only this section, yt-dlp syntax, e.g. '*0-120'")
    rate_limit: str | None = option(None, "fleet bandwidth cap shared by all workers, e.g. 2M (bytes/s)",
                                    output=False)
    requests_per_s: float | None = option(None, "fleet cap on HTTP requests per second (all workers)",
                                          output=False)
    governor: bool = option(True, "under Ray, one governor actor for the whole fleet; false: each worker "
                            "governs itself with an even share of the caps", output=False)
    proxies: list[str] = option([], "egress pool: proxy URLs, each optionally followed by its cookies "
                                "file ('http://p:3128 cookies-p.txt'), or a file of such lines; "
                                "'direct' = no proxy", output=False)
    egress_cooldown_s: float = option(60.0, "an egress that gets 429/403/bot pages pauses this long, "
                                      "doubling per strike (a 429's Retry-After wins)", output=False)
    egress_cooldown_max_s: float = option(3600.0, "longest egress cooldown", output=False)
    max_bytes: str | None = option(None, "run budget: stop starting downloads after this many bytes, e.g. "
                                   "500G (the rest stay pending)", output=False)
    max_hours: float | None = option(None, "run budget: stop starting downloads after this many hours",
                                     output=False)
    plugin_dirs: list[str] = option([], "folders yt-dlp loads plugins from (yt_dlp_plugins/...), e.g. "
                                    "a PO-token provider", output=False)
    retries: int = option(3, "retries of a transient failure", output=False)
    backoff_s: float = option(2.0, "first retry delay; doubles each retry, with jitter", output=False)
    backoff_max_s: float = option(60.0, "longest retry delay", output=False)
    socket_timeout_s: float = option(30.0, "network timeout per request", output=False)
    cookies_file: str | None = option(None, "cookies.txt passed to yt-dlp (egresses without their own)",
                                      output=False)
    proxy: str | None = option(None, "one proxy URL for all requests (download.proxies: a pool)", output=False)
    user_agent: str | None = option(None, "User-Agent header", output=False)
    allow_private_hosts: bool = option(False, "allow URLs on loopback/private/link-local addresses", output=False)
    min_side_px: int = option(32, "fail videos narrower or shorter than this (YouTube's smallest is 256x144)")
    breaker_window: int = option(20, "circuit breaker: recent attempts (fleet-wide) looked at", output=False)
    breaker_threshold: float = option(0.8, "circuit breaker: transient-failure fraction that trips it",
                                      output=False)
    breaker_cooldown_s: float = option(60.0, "circuit breaker: pause when tripped", output=False)
    # one video per call: a slow download never holds others back in its batch
    concurrency: int = 4
    num_cpus: float = 0.5
    batch_size: int = 1


# (pattern, class, transient) — first match wins; messages are yt-dlp's own.
ERROR_CLASSES = [
    (r"HTTP Error 429|Too Many Requests", "rate_limited", True),
    (r"HTTP Error 5\d\d", "server_error", True),
    (r"not a bot|confirm you.re not a robot", "bot_check", True),
    (r"timed out|Timeout|Connection reset|Temporary failure in name resolution|"
     r"Connection refused|Remote end closed|IncompleteRead|Downloaded \d+ bytes, expected \d+", "network", True),
    (r"HTTP Error 403", "forbidden", True),
    (r"HTTP Error (404|410)", "not_found", False),
    (r"Private video", "private", False),
    (r"confirm your age|age-restricted", "age_restricted", False),
    (r"Video unavailable|has been removed|account .* terminated|not available|copyright", "unavailable", False),
    (r"Unsupported URL", "unsupported", False),
    (r"Did not get any data blocks", "empty_file", False),
    (r"Requested format is not available", "no_format", False),
    (r"HTTP Error 4\d\d", "client_error", False),
]


def classify(message: str) -> tuple[str, bool]:
    for pattern, name, transient in ERROR_CLASSES:
        if re.search(pattern, message, re.IGNORECASE):
            return name, transient
    return "download_error", False


class Download(Stage):
    name = "download"
    upstream = "ingest"
    version = "1"
    Config = DownloadConfig
    requires = ("yt_dlp",)
    # The governor client: set by the spine under Ray (pipeline/fleet.py attach), else in setup()
    governor: GovernorClient | None = None

    def __init__(self, config: DownloadConfig, run: Any) -> None:
        super().__init__(config, run)
        if config.sections:
            _parse_section(config.sections)
        self.bytes_cap = _parse_bytes(config.rate_limit, "rate_limit")
        self.max_bytes = _parse_bytes(config.max_bytes, "max_bytes")
        self.egresses = egress_pool(config.proxies, config.proxy, config.cookies_file)

    media = {"video_path": "video"}
    schema = pa.schema(
        [
            ("video_path", pa.string()),
            ("file_bytes", pa.int64()),
            ("media_duration_s", pa.float64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("fps", pa.float64()),
            ("vcodec", pa.string()),
            ("acodec", pa.string()),
            ("audio_sample_rate", pa.int32()),
            ("audio_channels", pa.int32()),
            ("attempts", pa.int32()),
            ("reused", pa.bool_()),
            ("egress", pa.string()),  # the egress of each attempt, in order ("direct" or a proxy)
            ("waited_s", pa.float64()),  # seconds waited on the governor and on retry backoff
        ]
    )

    @property
    def resources(self) -> Resources:
        c = self.config
        return Resources.of(c)

    def governor_settings(self) -> GovernorSettings:
        c = self.config
        root = str(Path(self.run.manifest_root).resolve())
        return GovernorSettings(
            requests_per_s=c.requests_per_s, bytes_per_s=self.bytes_cap, breaker_window=c.breaker_window,
            breaker_threshold=c.breaker_threshold, breaker_cooldown_s=c.breaker_cooldown_s,
            egresses=list(self.egresses), egress_cooldown_s=c.egress_cooldown_s,
            egress_cooldown_max_s=c.egress_cooldown_max_s, max_bytes=self.max_bytes, max_hours=c.max_hours,
            fleet=c.governor, name="discomv-governor-" + hashlib.sha1(root.encode()).hexdigest()[:10],
        )

    def setup(self) -> None:
        # yt-dlp writes into the media root's folder, or this node's scratch when it is a bucket
        self.media = media_store(self.run)
        self.out_dir = self.media.work_dir("video")
        if self.governor is None:
            self.governor = local(self.governor_settings())
        if self.config.plugin_dirs:
            _load_plugins(self.config.plugin_dirs)

    def process(self, rows: list[Row]) -> list[Result]:
        return [self.download_one(row) for row in rows]

    def download_one(self, row: Row) -> Result:
        key, url = row["key"], row.get("url") or ""
        refusal = check_url(url, self.config.allow_private_hosts)
        if refusal:
            return Result.failed(key, refusal)
        reused = self._reuse(key)
        if reused:
            return reused
        budget = self.governor.check_budget()
        if budget:
            return Result.failed(key, budget)
        attempts, egresses, backoff, waited = 0, [], 0.0, self.governor.waited_s
        while True:
            attempts += 1
            try:
                egresses.append(self.governor.choose_egress())
                path = self._fetch(key, url, egresses[-1])
            except BudgetReached as e:
                return Result.failed(key, str(e))  # left pending: the spine records no row
            except DownloadFailed as e:
                if e.error_class == COOLED:  # not the server's answer: go again on another egress
                    attempts -= 1
                    egresses.pop()
                    continue
                self.governor.report(egresses[-1], e.error_class, e.transient, e.retry_after)
                if not e.transient or attempts > self.config.retries:
                    tried = f" after {attempts} attempts" if attempts > 1 else ""
                    return Result.failed(key, f"{e.error_class}: {e.message}{tried}", attempts=attempts,
                                         egress=",".join(egresses),
                                         waited_s=backoff + self.governor.waited_s - waited)
                backoff += self._pause(self._backoff(attempts))
                continue
            self.governor.report(egresses[-1], "", False)
            return self._verify(key, path, attempts=attempts, reused=False, egress=",".join(egresses),
                                waited_s=backoff + self.governor.waited_s - waited)

    def _fetch(self, key: str, url: str, egress: str) -> Path:
        import yt_dlp

        from pipeline.ytdl import Attempt, GovernedYoutubeDL

        attempt = Attempt(egress)
        try:
            with GovernedYoutubeDL(self._ydl_options(key, egress), self.governor, attempt,
                                   self.config.allow_private_hosts) as ydl:
                info = ydl.extract_info(url, download=True)
        except EgressCooling as e:
            raise DownloadFailed(COOLED, True, f"{e} was taken out of use mid-attempt") from e
        except yt_dlp.utils.DownloadError as e:
            raise _failure(attempt, _clean(str(e))) from e
        if info is None:
            raise DownloadFailed("download_error", False, "yt-dlp returned no information")
        if info.get("_type") == "playlist":
            raise DownloadFailed("unsupported", False, "URL is a playlist, not a single video")
        path = self._existing(key)
        if path is None:
            duration = info.get("duration")
            if duration and self.config.max_duration_s and duration > self.config.max_duration_s:
                raise DownloadFailed("too_long", False, f"{duration:.0f}s > {self.config.max_duration_s:.0f}s")
            raise DownloadFailed("download_error", False, "yt-dlp finished but no file was written")
        return path

    def _ydl_options(self, key: str, egress: str | None = None) -> dict[str, Any]:
        import yt_dlp

        from pipeline.ytdl import QuietLogger, progress_counter

        c = self.config
        proxy, cookies = self.egresses[egress or next(iter(self.egresses))]
        opts: dict[str, Any] = {
            "format": c.format,
            "outtmpl": {"default": str(self.out_dir / f"{key}.%(ext)s")},
            "merge_output_format": "mp4",
            "noplaylist": True,
            "quiet": True,
            "no_warnings": True,
            "noprogress": True,
            "logger": QuietLogger(),
            "socket_timeout": c.socket_timeout_s,
            "retries": 0,
            "fragment_retries": 0,
            "extractor_retries": 0,
            "overwrites": False,
            "continuedl": True,
            "restrictfilenames": True,
            "progress_hooks": [progress_counter(self.governor)],
        }
        if c.max_duration_s:
            opts["match_filter"] = yt_dlp.utils.match_filter_func(f"duration <=? {c.max_duration_s}")
        if c.sections:
            opts["download_ranges"] = yt_dlp.utils.download_range_func(
                None, [_parse_section(c.sections)]
            )
        if cookies:
            opts["cookiefile"] = cookies
        if proxy:
            opts["proxy"] = proxy
        if c.user_agent:
            opts["http_headers"] = {"User-Agent": c.user_agent}
        return opts

    def _existing(self, key: str) -> Path | None:
        for path in sorted(self.out_dir.glob(f"{key}.*")):
            # yt-dlp's per-format parts (`key.f134.mp4`) and `.part` files are not finished downloads
            if path.stem == key and path.suffix in VIDEO_SUFFIXES:
                return path
        return None

    def _reuse(self, key: str) -> Result | None:
        """A download finished before a kill: on local disk (or this node's scratch), or published."""
        local = self._existing(key)
        if local:
            return self._verify(key, local, attempts=0, reused=True)
        uri = self.media.find("video", key, VIDEO_SUFFIXES) if self.media.remote else None
        if uri is None:
            return None
        with self.media.local(uri) as file:
            return self._verify(key, file, attempts=0, reused=True, published=uri)

    def _verify(self, key: str, path: Path, attempts: int, reused: bool, published: str | None = None,
                **trail: Any) -> Result:
        try:
            info = probe(path)
            if not info.has_video:
                raise MediaError("no_video_stream: the file has no video stream")
            if not info.has_audio:
                raise MediaError("no_audio_stream: the file has no audio stream")
            if info.duration_s <= 0:
                raise MediaError("corrupt: zero duration")
            limit = self.config.max_duration_s
            if limit and info.duration_s > limit:
                raise MediaError(f"too_long: {info.duration_s:.0f}s > {limit:.0f}s")
            smallest = min(info.width or 0, info.height or 0)
            if smallest < self.config.min_side_px:
                raise MediaError(f"too_small: {info.width}x{info.height} video, a side below "
                                 f"download.min_side_px={self.config.min_side_px}")
            check_tail_decodes(path, info=info)
            size = path.stat().st_size
            uri = published or self.media.publish(path, "video", path.name, cache=True)
        except MediaError as e:  # never leave an unusable file under a final name
            self.media.remove(published) if published else path.unlink(missing_ok=True)
            return Result.failed(key, str(e), attempts=attempts, **trail)
        except OSError as e:  # the upload failed: the file stays for a retry
            return Result.failed(key, f"io_error: {e}", attempts=attempts, **trail)
        return Result.ok(
            key,
            video_path=uri,
            file_bytes=size,
            media_duration_s=info.duration_s,
            width=info.width,
            height=info.height,
            fps=info.fps,
            vcodec=info.vcodec,
            acodec=info.acodec,
            audio_sample_rate=info.audio_sample_rate,
            audio_channels=info.audio_channels,
            attempts=attempts,
            reused=reused,
            **trail,
        )

    def _backoff(self, attempt: int) -> float:
        delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (attempt - 1))
        return delay * random.uniform(0.5, 1.0)

    @staticmethod
    def _pause(seconds: float) -> float:
        time.sleep(seconds)
        return seconds


class DownloadFailed(Exception):
    def __init__(self, error_class: str, transient: bool, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.error_class, self.transient, self.message = error_class, transient, message
        self.retry_after = retry_after


def _failure(attempt: Any, message: str) -> DownloadFailed:
    """What went wrong, from what the server answered (pipeline/ytdl.py Attempt) before the message."""
    if attempt.cooled:
        return DownloadFailed(COOLED, True, f"{attempt.egress} was taken out of use mid-attempt")
    if attempt.blocked:
        return DownloadFailed("blocked_host", False, f"{attempt.blocked}; set download.allow_private_hosts=true "
                              "to allow")
    if attempt.bot_page:
        return DownloadFailed("bot_check", True, f"HTTP {attempt.status} with a bot-check page ({message})")
    error_class, transient = classify(message)
    return DownloadFailed(error_class, transient, message, attempt.retry_after)


def egress_pool(proxies: list[str], proxy: str | None, cookies: str | None) -> dict[str, tuple[str | None, str | None]]:
    """name → (proxy URL or None, cookies file or None), from `download.proxies` entries ('URL [COOKIES]',
    'direct', or a file of such lines); one egress (`download.proxy`, else direct) when empty. Names
    carry no credentials: they are recorded on rows."""
    lines: list[str] = []
    for entry in proxies:
        first = entry.split()[0] if entry.split() else ""
        if "://" in first or first == "direct":
            lines.append(entry)
            continue
        try:
            text = Path(entry).expanduser().read_text()
        except OSError as e:
            raise ConfigError(f"config key 'download.proxies': {entry!r} is neither a proxy URL nor a "
                              f"readable file ({e})") from e
        lines += [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    pool: dict[str, tuple[str | None, str | None]] = {}
    for line in lines or [proxy or "direct"]:
        parts = line.split()
        if len(parts) > 2:
            raise ConfigError(f"config key 'download.proxies': expected 'URL [COOKIES_FILE]', got {line!r}")
        url = None if parts[0] == "direct" else parts[0]
        pool[_egress_name(url)] = (url, parts[1] if len(parts) > 1 else cookies)
    return pool


def _egress_name(url: str | None) -> str:
    if url is None:
        return "direct"
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.hostname}:{parsed.port}" if parsed.port else f"{parsed.scheme}://{parsed.hostname}"


def _parse_bytes(text: str | None, key: str) -> int | None:
    """'2M' → 2 MiB, as yt-dlp reads sizes; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"(?i)(\d+(?:\.\d+)?)([kmgtpezy]?)", text.strip())
    if not match:
        raise ConfigError(f"config key 'download.{key}': cannot parse {text!r} (use e.g. 2M)")
    return int(float(match.group(1)) * 1024 ** " kmgtpezy".index(match.group(2).lower() or " "))


def _load_plugins(dirs: list[str]) -> None:
    """yt-dlp's plugins from these folders, as `yt-dlp --plugin-dirs` does (each folder holds plugin
    packages, each with a yt_dlp_plugins/ inside)."""
    from yt_dlp.globals import plugin_dirs
    from yt_dlp.plugins import load_all_plugins

    for d in dirs:
        if not Path(d).expanduser().is_dir():
            raise ConfigError(f"config key 'download.plugin_dirs': {d} is not a folder")
    plugin_dirs.value = [str(Path(d).expanduser()) for d in dirs]
    load_all_plugins()


def check_url(url: str, allow_private_hosts: bool) -> str | None:
    """A refusal reason, or None when the URL may reach yt-dlp (http(s) only, public hosts)."""
    try:
        check_public_url(url, allow_private_hosts)
    except HostRefused as e:
        if e.kind == "bad_url":
            return f"bad_url: only http(s) URLs reach the downloader ({e})"
        if e.kind == "unresolved":
            return f"network: {e}"
        return f"blocked_host: {e}; set download.allow_private_hosts=true to allow"
    return None


def _parse_section(spec: str) -> tuple[float, float]:
    match = re.fullmatch(r"\*?(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)", spec.strip())
    if not match:
        raise ConfigError(f"config key 'download.sections': expected '*START-END' in seconds, got {spec!r}")
    return float(match.group(1)), float(match.group(2))


def _clean(message: str) -> str:
    message = re.sub(r"\x1b\[[0-9;]*m", "", message).replace("ERROR: ", "").strip()
    return message.splitlines()[0][:500] if message else "unknown error"
