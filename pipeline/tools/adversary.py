"""A local stand-in for YouTube under pressure (tests and bench/download.py), on 127.0.0.1, with the
egress proxies a fleet would go out through.

`AdversarialServer` serves a folder and misbehaves the way YouTube does at scale:
- more than `limit_per_s` requests within one second from one client address → 429 with Retry-After;
- a client address in `banned` → 403 with a "Sign in to confirm you're not a bot" page;
- `overload(seconds)` → every request 429 with Retry-After for that long (a 429 burst);
- `/stall/N/FILE`: GETs 2..N+1 (the first is yt-dlp's probe, which reads no body) send half the
  file, then stall (`stall_s`) and hang up;
- `/reset/N/FILE`: GETs 2..N+1 send half the file, then reset the connection;
- `/redirect/private/FILE` → 302 to 169.254.169.254, `/redirect/loopback/FILE` → 302 to 127.0.0.1,
  `/redirect/public/FILE` → 302 to a public address (which the proxies bring back here);
- `/busy/N/FILE`: the first N requests → 429 with Retry-After (a throttled video, whatever the rate);
- `/status/CODE/...` → that status.
Every request is logged (time, client address, path, status) so tests measure at the server.

`EgressProxy` is an HTTP forward proxy on 127.0.0.1 that sends every request, whatever its host, to
the server from its own source address (127.0.0.N: Linux routes all of 127/8 to loopback), so the
server sees one client address per egress, as YouTube sees one per proxy exit."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

BOT_PAGE = (b"<html><body><h1>Sign in to confirm you're not a bot</h1>"
            b"<p>This helps protect our community.</p></body></html>")
PUBLIC_ADDRESS = "93.184.216.34"  # a global address; only ever reached through an EgressProxy here


@dataclass
class Hit:
    """One request, logged as it arrives; `status` is set before the answer is sent (so a client
    never sees an answer the log lacks), `bytes` as the body goes out."""

    t: float
    client: str
    method: str
    path: str
    status: int
    bytes: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hang up mid-body (timeouts, probes): expected here


class AdversarialServer:
    def __init__(self, directory: str | Path, limit_per_s: int = 1000, retry_after_s: float = 1.0,
                 stall_s: float = 5.0) -> None:
        self.directory = Path(directory)
        self.limit_per_s, self.retry_after_s, self.stall_s = limit_per_s, retry_after_s, stall_s
        self.banned: set[str] = set()
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        self.recent: dict[str, deque[float]] = defaultdict(deque)
        self.seen: dict[str, int] = defaultdict(int)
        self.overloaded_until = 0.0
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def overload(self, seconds: float) -> None:
        self.overloaded_until = time.monotonic() + seconds

    def __enter__(self) -> AdversarialServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _admit(self, client: str, path: str, now: float) -> tuple[int, int]:
        """(status to answer, how many times this path was asked before) for one request."""
        with self.lock:
            window = self.recent[client]
            window.append(now)
            while window and window[0] <= now - 1.0:
                window.popleft()
            self.seen[path] += 1
            seen = self.seen[path]
        if client in self.banned:
            return 403, seen
        if now < self.overloaded_until or len(window) > self.limit_per_s:
            return 429, seen
        return 200, seen

    def log(self, t: float, client: str, method: str, path: str) -> Hit:
        hit = Hit(t, client, method, path, 0, 0)
        with self.lock:
            self.hits.append(hit)
        return hit

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(_Handler):
            pass

        Handler.server_state = server
        return Handler


class _Handler(BaseHTTPRequestHandler):
    server_state: AdversarialServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        s = self.server_state
        path = urlsplit(self.path).path
        client = self.client_address[0]
        arrived = time.monotonic()  # hits are logged at arrival: what a rate limiter counts
        status, seen = s._admit(client, f"{self.command} {path}", arrived)
        self.hit = s.log(arrived, client, self.command, path)
        if status != 200:
            self._refuse(status)
            return
        self._sent = 0
        try:
            self._route(path, body, seen)
        finally:  # counted even when the client hung up mid-body
            self.hit.bytes = self._sent

    def _route(self, path: str, body: bool, seen: int) -> None:
        parts = path.strip("/").split("/")
        if parts[0] == "status" and len(parts) > 1 and parts[1].isdigit():
            self._send(int(parts[1]), b"status page", "text/plain")
        elif parts[0] == "redirect" and len(parts) > 2:
            self._redirect(parts[1], "/".join(parts[2:]))
        elif parts[0] == "busy" and len(parts) > 2 and parts[1].isdigit() and seen <= int(parts[1]):
            self._refuse(429)
        elif parts[0] == "busy" and len(parts) > 2:
            self._file("/".join(parts[2:]), body, None)
        elif parts[0] in ("stall", "reset") and len(parts) > 2 and parts[1].isdigit():
            # GET 1 of a path is yt-dlp's probe (it reads no body): the next N are the transfers
            misbehave = parts[0] if self.command == "GET" and 1 < seen <= int(parts[1]) + 1 else None
            self._file("/".join(parts[2:]), body, misbehave)
        else:
            self._file(path.strip("/"), body, None)

    def _refuse(self, status: int) -> None:
        if status == 429:
            self._begin(429)
            self.send_header("Retry-After", f"{self.server_state.retry_after_s:g}")
            self._body(b"Too Many Requests", "text/plain")
        else:
            self._begin(status)
            self._body(BOT_PAGE, "text/html; charset=utf-8")

    def _begin(self, status: int) -> None:
        self.hit.status = status
        self.send_response(status)

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self._begin(status)
        self._body(data, content_type)

    def _body(self, data: bytes, content_type: str) -> None:
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    def _redirect(self, kind: str, rest: str) -> None:
        target = {"private": "http://169.254.169.254/latest/meta-data/",
                  "loopback": f"{self.server_state.url}/{rest}",
                  "public": f"http://{PUBLIC_ADDRESS}/{rest}"}.get(kind)
        if target is None:
            self._send(404, b"no such redirect", "text/plain")
            return
        self._begin(302)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _file(self, name: str, body: bool, misbehave: str | None) -> None:
        file = (self.server_state.directory / name).resolve()
        if self.server_state.directory.resolve() not in file.parents or not file.is_file():
            self._send(404, b"not found", "text/plain")
            return
        data = file.read_bytes()
        self._begin(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        end = len(data) if misbehave is None else len(data) // 2
        for at in range(0, end, 65536):  # `_sent`: what the socket took (an unread probe's too)
            self.wfile.write(data[at:min(end, at + 65536)])
            self._sent = min(end, at + 65536)
        if misbehave is None:
            return
        self.wfile.flush()
        if misbehave == "stall":
            time.sleep(self.server_state.stall_s)
        else:  # an RST, not a clean close: SO_LINGER with a zero timeout
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True


class EgressProxy:
    """An HTTP forward proxy whose requests reach `upstream_port` on 127.0.0.1 from `source`."""

    def __init__(self, upstream_port: int, source: str, timeout_s: float = 30.0) -> None:
        self.upstream_port, self.source, self.timeout_s = upstream_port, source, timeout_s
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

            do_HEAD = do_GET

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> EgressProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests += 1
        target = urlsplit(handler.path)
        path = target.path + (f"?{target.query}" if target.query else "")
        headers = {k: v for k, v in handler.headers.items() if not k.lower().startswith("proxy-")}
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=self.timeout_s,
                                              source_address=(self.source, 0))
        try:
            upstream.request(handler.command, path, headers={**headers, "Connection": "close"})
            response = upstream.getresponse()
            handler.send_response(response.status, response.reason)
            for k, v in response.getheaders():
                if k.lower() not in ("connection", "transfer-encoding"):
                    handler.send_header(k, v)
            handler.end_headers()
            while chunk := response.read1(65536) if handler.command == "GET" else b"":
                handler.wfile.write(chunk)
            if response.length:  # the server hung up mid-body: so does the egress
                raise ConnectionError("upstream closed mid-body")
        except (OSError, http.client.HTTPException):
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            upstream.close()
        handler.close_connection = True
