"""A small HTTP server on 127.0.0.1 that stands in for YouTube in the demo and tests: it serves a
folder, answers `/status/CODE/...` with that HTTP status, `/flaky/N/FILE` with 503 for the first N
requests, `/slow/MS/FILE` after a delay, and counts requests per path (to prove resumed runs don't fetch again)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    counts: Counter
    lock: threading.Lock

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def _route(self) -> bool:
        path = self.path.split("?", 1)[0]
        with self.lock:
            self.counts[(self.command, path)] += 1
            seen = self.counts[(self.command, path)]
        parts = path.strip("/").split("/")
        if parts[0] == "status" and len(parts) >= 2 and parts[1].isdigit():
            self.send_error(int(parts[1]))
            return True
        if parts[0] == "flaky" and len(parts) >= 3 and parts[1].isdigit():
            if seen <= int(parts[1]):
                self.send_error(503)
                return True
            self.path = "/" + "/".join(parts[2:])
        if parts[0] == "slow" and len(parts) >= 3 and parts[1].isdigit():
            time.sleep(int(parts[1]) / 1000)
            self.path = "/" + "/".join(parts[2:])
        return False

    def do_GET(self) -> None:
        if not self._route():
            super().do_GET()

    def do_HEAD(self) -> None:
        if not self._route():
            super().do_HEAD()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients (yt-dlp probing a direct link) hang up mid-body; that is not an error here


class LocalServer:
    def __init__(self, directory: str | Path, port: int = 0) -> None:
        handler = type("Handler", (_Handler,), {"counts": Counter(), "lock": threading.Lock()})
        self.counts: Counter = handler.counts
        self.httpd = _Server(("127.0.0.1", port), partial(handler, directory=str(directory)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, path: str) -> int:
        return self.counts[("GET", path)]

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
