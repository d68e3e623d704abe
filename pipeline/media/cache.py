"""A node's bounded cache of media files fetched from an object store, shared by every worker process
on the node (pipeline/media/staging.py puts it in front of a `run.media_root` URI).

Layout: `<folder>/objects/<name>` for each cached file, `<name>.lock` beside it, and
`<name>.<id>.fetch` while it is fetched. The file system is the index: no state file, no pickle.

* In use: a reader holds a shared `flock` on the entry's lock file for as long as it uses the file;
  eviction takes an exclusive lock without waiting and skips any entry it cannot lock, so a file in
  use is never removed. flock locks die with their process, so a killed worker pins nothing.
* One whole copy: a reader that finds no entry takes the exclusive lock and fetches into a
  `.fetch` file, renamed to the entry's name only once complete; a second process (or thread)
  wanting the same object waits on that lock, then finds the entry. Lock files are removed only
  by an evictor that holds their lock; a locker checks that the file it locked is still the one
  under the name (same inode) and retries otherwise.
* Bound: before a fetch, under the cache-wide lock (`<folder>/cache.lock`), least recently used
  entries are evicted until the files present plus the new one fit in `max_bytes`; the `.fetch`
  file is then sized to the object's length at once, so concurrent fetches count each other.
  "Used" is the entry's mtime, set on every use (atime is often off). Only files in use can
  hold the cache above its bound (a single file larger than the bound is fetched, used and
  evicted by the next fetch).
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("discomv")
LOCK, FETCH = ".lock", ".fetch"


class NodeCache:
    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.objects = self.folder / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    @contextmanager
    def pinned(self, name: str, fetch: Callable[[BinaryIO], None], size: int | None) -> Iterator[Path]:
        """The cached file `name`, fetched first if absent (`fetch` writes the whole object into the
        open file it is given; `size` is its length when known), kept from eviction while in use."""
        entry, lock = self.objects / name, self.objects / (name + LOCK)
        while True:
            fd = _lock(lock, fcntl.LOCK_SH)
            if entry.exists():
                break
            os.close(fd)
            fd = _lock(lock, fcntl.LOCK_EX)
            try:
                if not entry.exists():
                    self._fill(entry, fetch, size)
            finally:
                os.close(fd)
        try:
            os.utime(entry)  # used now: the least recently used go first
            yield entry
        finally:
            os.close(fd)

    def adopt(self, name: str, local: Path) -> bool:
        """Move a local file the node just made (and published) into the cache as `name`, so a later
        stage here reads it without fetching; False (file left where it is) when it cannot fit."""
        size = local.stat().st_size
        if size > self.max_bytes:
            return False
        fd = _lock(self.objects / (name + LOCK), fcntl.LOCK_EX)
        try:
            with self._exclusive():
                self.make_room(size)
                os.replace(local, self.objects / name)
        finally:
            os.close(fd)
        return True

    def make_room(self, incoming: int) -> None:
        """Evict least recently used entries not in use until the files present plus `incoming`
        fit the bound (call under the cache-wide lock)."""
        entries, held = [], 0
        for item in os.scandir(self.objects):
            if item.name.endswith(LOCK):
                continue
            try:
                stat = item.stat()
            except FileNotFoundError:
                continue
            held += stat.st_size
            entries.append((stat.st_mtime_ns, item.name, stat.st_size))
        for _, name, size in sorted(entries):
            if held + incoming <= self.max_bytes:
                return
            if self._evict(name):
                held -= size

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.objects.iterdir() if not p.name.endswith(LOCK))

    def _evict(self, name: str) -> bool:
        """Remove an entry nobody uses (or a `.fetch` file its killed fetcher left); False if in use."""
        fetching = name.endswith(FETCH)
        owner = name[: -len(FETCH)].rsplit(".", 1)[0] if fetching else name
        lock = self.objects / (owner + LOCK)
        fd = _lock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd < 0:
            return False
        try:
            (self.objects / name).unlink(missing_ok=True)
            if not fetching:
                lock.unlink(missing_ok=True)  # while held: a waiter sees another inode and retries
        finally:
            os.close(fd)
        return True

    def _fill(self, entry: Path, fetch: Callable[[BinaryIO], None], size: int | None) -> None:
        partial = entry.with_name(f"{entry.name}.{uuid.uuid4().hex}{FETCH}")
        with self._exclusive():
            self.make_room(size or 0)
            with open(partial, "wb") as f:
                f.truncate(size or 0)  # counted by concurrent make_room calls from now on
        try:
            with open(partial, "r+b") as f:
                fetch(f)
                f.truncate()
                written = f.tell()
            if size is not None and written != size:
                raise OSError(f"fetched {written} bytes of {entry.name}, expected {size}")
            os.replace(partial, entry)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        fd = os.open(self.folder / "cache.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _lock(path: Path, mode: int) -> int:
    """An fd holding `mode` on the lock file at `path` (created if missing), re-opened until the file
    locked is the one under the name; -1 when LOCK_NB was asked and the lock is taken."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return -1
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # an evictor removed it meanwhile: lock the new one
