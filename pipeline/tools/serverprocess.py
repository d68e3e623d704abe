"""A test server in its own process on a free 127.0.0.1 port (pipeline/tools/s3server.py,
gcsserver.py): started with the environment variables that point clients at it, for this process
and every process it starts; waited for until it answers; stopped, and the variables restored."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from typing import Any


class ServerProcess:
    name = "server"  # for the error message
    ready_path = "/"  # a URL path that answers once the server is up

    def __init__(self) -> None:
        self.endpoint = ""
        self.proc: subprocess.Popen | None = None
        self.saved: dict[str, str | None] = {}

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Variables that point clients at `self.endpoint`."""
        return {}

    def before_ready(self) -> None:
        """A check once the environment is set, before waiting (default: none)."""

    def __enter__(self) -> Any:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(self.command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        env = self.environment()
        self.saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.before_ready()
            self._wait()
        except BaseException:
            self.__exit__(None)
            raise
        return self

    def _wait(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}{self.ready_path}", timeout=1).close()
                return
            except OSError:
                if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start (is the dev extra installed?)") from None
                time.sleep(0.1)

    def __exit__(self, *_: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
