"""`discomv browse`: a local, read-only web app over a run's manifests and shards.

Standard-library `ThreadingHTTPServer`, static JS/CSS from `static/` (no build step), JSON from duckdb
over audit.py's joined manifests. URLs carry sample keys (checked against the shard key pattern) and
fixed names, never paths: every file served is one the manifests or shard sidecars name, resolved
and checked to lie under the run's media or shard root (or the browser's cache). Media are served
with HTTP Range requests (206), so the browser can seek.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pipeline.tools.browse.data as data
from pipeline.tools.browse.media import FrameCache, Refused, Roots, ShardMembers, Span, check_key
from pipeline.tools.browse.pages import candidate_page, clip_page

log = logging.getLogger("discomv")
STATIC = Path(__file__).parent / "static"
STATIC_NAME = re.compile(r"^[a-z]+\.(js|css|html)$")
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 1 << 16


class Browser:
    """Everything a request handler needs, built once per `discomv browse`."""

    def __init__(self, cfg: Any, config_path: str | None, cache: Path) -> None:
        self.cfg = cfg
        self.config_path = config_path or "CONFIG"
        self.roots = Roots(cfg.run.media_root, cfg.run.shard_root, cache)
        self.tables = data.Tables(cfg.run.manifest_root, cfg.run.shard_root)
        self.members = ShardMembers(self.roots)
        self.frames = FrameCache(cache, cfg.stages.get("filter"), cfg.run)

    def media(self, key: str, what: str) -> Span | None:
        """The file (or tar member) behind /media/<key>/<what>."""
        if what == "video":
            return self.roots.file_span((data.stage_row(self.tables, "download", key) or {}).get("video_path"))
        if what == "instrumental":
            row = data.stage_row(self.tables, "separate", key) or {}
            return self.roots.file_span(row.get("instrumental_path"))
        if what in ("clip.mp4", "clip.flac"):
            return self.members.span(key, what.split(".")[1])
        return None

    def frames_of(self, key: str) -> dict[str, Any]:
        video = self.roots.inside((data.stage_row(self.tables, "download", key) or {}).get("video_path"))
        if video is None:
            return {"error": "no downloaded video for this key", "frames": [], "matrix": []}
        return self.frames.frames(key, video)


class Handler(BaseHTTPRequestHandler):
    server_version = "discomv-browse"
    browser: Browser  # set on the subclass made by `make_server`

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("browse: " + format, *args)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_GET(self, head: bool = False) -> None:
        url = urlsplit(self.path)
        parts = url.path.split("/")[1:]
        params = dict(parse_qsl(url.query))
        try:
            self.route(parts, params, head)
        except Refused as e:
            self.fail(HTTPStatus.BAD_REQUEST, str(e))
        except (KeyError, ValueError) as e:
            self.fail(HTTPStatus.BAD_REQUEST, f"bad request: {e}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def route(self, parts: list[str], params: dict[str, str], head: bool) -> None:
        b = self.browser
        if parts == ["favicon.ico"]:
            return self.fail(HTTPStatus.NOT_FOUND, "no icon") if head else self._no_content()
        if parts in ([""], ["index.html"]):
            return self.send_file(STATIC / "index.html", "text/html; charset=utf-8", head)
        if len(parts) == 2 and parts[0] == "static":
            if not STATIC_NAME.match(parts[1]):
                raise Refused(f"no static file {parts[1]!r}")
            mime = {"js": "text/javascript", "css": "text/css", "html": "text/html"}[parts[1].rsplit(".", 1)[1]]
            return self.send_file(STATIC / parts[1], mime + "; charset=utf-8", head)
        if len(parts) == 3 and parts[0] == "api" and parts[1] == "table":
            return self.send_json(data.page(b.tables, parts[2], params))
        if len(parts) == 3 and parts[0] == "api" and parts[1] == "facets":
            return self.send_json(data.facets(b.tables, parts[2]))
        if parts == ["api", "info"]:
            return self.send_json({"config": b.config_path, "manifest_root": str(b.tables.store.root.resolve()),
                                   "media_root": str(b.roots.media), "shard_root": str(b.roots.shards)})
        if len(parts) == 3 and parts[0] == "api" and parts[1] in ("candidate", "clip", "frames"):
            key = check_key(parts[2])
            page = {"candidate": lambda: candidate_page(b, key), "clip": lambda: clip_page(b, key),
                    "frames": lambda: b.frames_of(key)}[parts[1]]()
            return self.send_json(page) if page is not None else self.fail(HTTPStatus.NOT_FOUND, f"no rows for {key}")
        if len(parts) == 3 and parts[0] == "media":
            span = b.media(check_key(parts[1]), parts[2])
            return self.send_span(span, head) if span else self.fail(HTTPStatus.NOT_FOUND, "no such media")
        if len(parts) == 3 and parts[0] == "frames" and re.fullmatch(r"\d\d\.jpg", parts[2]):
            span = b.roots.file_span(b.frames.dir / check_key(parts[1]) / parts[2])
            return self.send_span(span, head) if span else self.fail(HTTPStatus.NOT_FOUND, "no such frame")
        self.fail(HTTPStatus.NOT_FOUND, "not found")

    # responses ------------------------------------------------------------

    def fail(self, status: HTTPStatus, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, payload: Any) -> None:
        body = json.dumps(payload, default=str, allow_nan=False).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def send_file(self, path: Path, mime: str, head: bool) -> None:
        if not path.is_file():
            return self.fail(HTTPStatus.NOT_FOUND, "not found")
        self.send_span(Span(path, 0, path.stat().st_size, mime), head)

    def send_span(self, span: Span, head: bool) -> None:
        """The whole span (200), or the one byte range asked for (206; 416 when it lies outside)."""
        start, end = 0, span.size - 1
        status = HTTPStatus.OK
        asked = self.headers.get("Range")
        if asked:
            m = RANGE.match(asked.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._unsatisfiable(span)
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), span.size - 1) if m.group(2) else span.size - 1
            else:  # the last N bytes
                start = max(0, span.size - int(m.group(2)))
            if start > end or start >= span.size:
                return self._unsatisfiable(span)
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", span.mime)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{span.size}")
        self.end_headers()
        if head:
            return
        with open(span.path, "rb") as f:
            f.seek(span.offset + start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    def _no_content(self) -> None:
        self.send_response(HTTPStatus.NO_CONTENT)
        self.end_headers()

    def _unsatisfiable(self, span: Span) -> None:
        self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
        self.send_header("Content-Range", f"bytes */{span.size}")
        self.send_header("Content-Length", "0")
        self.end_headers()


def make_server(cfg: Any, config_path: str | None, host: str = "127.0.0.1", port: int = 8765,
                cache: Path | None = None) -> ThreadingHTTPServer:
    cache = cache or Path(tempfile.mkdtemp(prefix="discomv-browse-"))
    handler = type("BrowseHandler", (Handler,), {"browser": Browser(cfg, config_path, cache)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(cfg: Any, config_path: str | None, host: str, port: int) -> int:
    import shutil

    cache = Path(tempfile.mkdtemp(prefix="discomv-browse-"))
    server = make_server(cfg, config_path, host, port, cache)
    bound_host, bound_port = server.server_address[:2]
    print(f"browse: http://{bound_host}:{bound_port}/  (manifests {Path(cfg.run.manifest_root).resolve()}, "
          f"read only; Ctrl-C to stop)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"browse: listening on {host}: anyone who reaches this port can read the dataset", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        shutil.rmtree(cache, ignore_errors=True)
    return 0
