"""download: yt-dlp (Python API) fetches low-res video + audio into `<media_root>/video/<key>.mp4`.

Every candidate ends `ok` or `failed` with a `class: message` reason. Transient failures (429,
5xx, timeouts, bot checks) are retried with exponential backoff; permanent ones (404, private,
removed, unsupported) are not. A circuit breaker pauses a worker when most recent attempts failed
transiently. After the download, ffprobe and a tail decode check the file.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.hosts import HostRefused, check_public_url
from pipeline.media.probe import MediaError, check_tail_decodes, probe
from pipeline.options import ConfigError, WorkerOptions, option
from pipeline.stage import Resources, Result, Row, Stage

log = logging.getLogger("discomv")
RATE = re.compile(r"(?i)\d+(\.\d+)?[kmgtpezy]?")  # what yt-dlp's parse_bytes reads: 500K, 2M, 1.5G


@dataclass
class DownloadConfig(WorkerOptions):
    format: str = option(
        "bv*[height<=?360]+ba/b[height<=?360]/wv*+ba/w",
        "yt-dlp format selector (default: ≤360p video + best audio, merged)",
    )
    max_duration_s: float | None = option(1800.0, "fail videos longer than this (seconds)")
    sections: str | None = option(None, "download only this section, yt-dlp syntax, e.g. '*0-120'")
    rate_limit: str | None = option(None, "global bandwidth cap shared by all workers, e.g. 2M (bytes/s)",
                                    output=False)
    retries: int = option(3, "retries of a transient failure", output=False)
    backoff_s: float = option(2.0, "first retry delay; doubles each retry, with jitter", output=False)
    backoff_max_s: float = option(60.0, "longest retry delay", output=False)
    socket_timeout_s: float = option(30.0, "network timeout per request", output=False)
    cookies_file: str | None = option(None, "cookies.txt passed to yt-dlp", output=False)
    proxy: str | None = option(None, "proxy URL passed to yt-dlp", output=False)
    user_agent: str | None = option(None, "User-Agent header", output=False)
    allow_private_hosts: bool = option(False, "allow URLs on loopback/private/link-local addresses", output=False)
    min_side_px: int = option(32, "fail videos narrower or shorter than this (YouTube's smallest is 256x144)")
    breaker_window: int = option(20, "circuit breaker: recent attempts looked at", output=False)
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
     r"Connection refused|Remote end closed|IncompleteRead", "network", True),
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

    def __init__(self, config: DownloadConfig, run: Any) -> None:
        super().__init__(config, run)
        if config.sections:
            _parse_section(config.sections)
        if config.rate_limit and not RATE.fullmatch(config.rate_limit.strip()):
            raise ConfigError(f"config key 'download.rate_limit': cannot parse {config.rate_limit!r} (use e.g. 2M)")

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
        ]
    )

    @property
    def resources(self) -> Resources:
        c = self.config
        return Resources.of(c)

    def setup(self) -> None:
        self.out_dir = Path(self.run.media_root) / "video"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.recent: deque[bool] = deque(maxlen=self.config.breaker_window)

    def process(self, rows: list[Row]) -> list[Result]:
        return [self.download_one(row) for row in rows]

    def download_one(self, row: Row) -> Result:
        key, url = row["key"], row.get("url") or ""
        refusal = check_url(url, self.config.allow_private_hosts)
        if refusal:
            return Result.failed(key, refusal)
        existing = self._existing(key)
        if existing:
            return self._verify(key, existing, attempts=0, reused=True)
        attempts = 0
        while True:
            attempts += 1
            self._wait_if_breaker_open()
            try:
                path = self._fetch(key, url)
                self.recent.append(False)
                return self._verify(key, path, attempts=attempts, reused=False)
            except DownloadFailed as e:
                self.recent.append(e.transient)
                if not e.transient or attempts > self.config.retries:
                    tried = f" after {attempts} attempts" if attempts > 1 else ""
                    return Result.failed(key, f"{e.error_class}: {e.message}{tried}", attempts=attempts)
                time.sleep(self._backoff(attempts))

    def _fetch(self, key: str, url: str) -> Path:
        import yt_dlp

        try:
            with yt_dlp.YoutubeDL(self._ydl_options(key)) as ydl:
                info = ydl.extract_info(url, download=True)
        except yt_dlp.utils.DownloadError as e:
            message = _clean(str(e))
            raise DownloadFailed(*classify(message), message) from e
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

    def _ydl_options(self, key: str) -> dict[str, Any]:
        import yt_dlp

        c = self.config
        opts: dict[str, Any] = {
            "format": c.format,
            "outtmpl": {"default": str(self.out_dir / f"{key}.%(ext)s")},
            "merge_output_format": "mp4",
            "noplaylist": True,
            "quiet": True,
            "no_warnings": True,
            "noprogress": True,
            "logger": _QuietLogger(),
            "socket_timeout": c.socket_timeout_s,
            "retries": 0,
            "fragment_retries": 0,
            "extractor_retries": 0,
            "overwrites": False,
            "continuedl": True,
            "restrictfilenames": True,
        }
        if c.max_duration_s:
            opts["match_filter"] = yt_dlp.utils.match_filter_func(f"duration <=? {c.max_duration_s}")
        if c.rate_limit:
            total = yt_dlp.utils.parse_bytes(c.rate_limit)
            if not total:
                raise ConfigError(f"config key 'download.rate_limit': cannot parse {c.rate_limit!r} (use e.g. 2M)")
            opts["ratelimit"] = max(1, int(total / max(1, c.concurrency)))
        if c.sections:
            opts["download_ranges"] = yt_dlp.utils.download_range_func(
                None, [_parse_section(c.sections)]
            )
        if c.cookies_file:
            opts["cookiefile"] = c.cookies_file
        if c.proxy:
            opts["proxy"] = c.proxy
        if c.user_agent:
            opts["http_headers"] = {"User-Agent": c.user_agent}
        return opts

    def _existing(self, key: str) -> Path | None:
        for path in sorted(self.out_dir.glob(f"{key}.*")):
            # yt-dlp's per-format parts (`key.f134.mp4`) and `.part` files are not finished downloads
            if path.stem == key and path.suffix in (".mp4", ".webm", ".mkv", ".m4a", ".mov"):
                return path
        return None

    def _verify(self, key: str, path: Path, attempts: int, reused: bool) -> Result:
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
        except MediaError as e:
            path.unlink(missing_ok=True)  # never leave an unusable file under a final name
            return Result.failed(key, str(e), attempts=attempts)
        return Result.ok(
            key,
            video_path=str(path),
            file_bytes=path.stat().st_size,
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
        )

    def _backoff(self, attempt: int) -> float:
        delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (attempt - 1))
        return delay * random.uniform(0.5, 1.0)

    def _wait_if_breaker_open(self) -> None:
        window = self.recent
        if len(window) == window.maxlen and sum(window) / len(window) >= self.config.breaker_threshold:
            log.warning(
                "download: %d of the last %d attempts failed transiently; pausing %.0fs "
                "(rate-limited? lower download.concurrency or set download.rate_limit)",
                sum(window), len(window), self.config.breaker_cooldown_s,
            )
            time.sleep(self.config.breaker_cooldown_s)
            window.clear()


class DownloadFailed(Exception):
    def __init__(self, error_class: str, transient: bool, message: str) -> None:
        super().__init__(message)
        self.error_class, self.transient, self.message = error_class, transient, message


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


class _QuietLogger:
    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    def error(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)
