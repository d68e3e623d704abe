"""Roots as local folders or object-store URIs (`s3://bucket/prefix`, `gs://…`, `file://…`) through
fsspec, and publication that keeps all-or-nothing visibility where rename is not atomic.

A remote object is written whole to a local file first, then published: on S3 and GCS by one upload
straight to the final key (S3: a PUT, or a multipart upload completed only after its last part; GCS:
a one-request upload, or a resumable upload finalized only by its last chunk: either store shows the
object whole or not at all); on other backends under a temp key (`<key>.tmp`, which every reader
ignores) and then one copy to the final key. Nothing streams into a final key, where a client's
`close()` on an error could complete a partial upload, except the shards stage on S3, whose tar
writer aborts the multipart upload on an error (ATOMIC_UPLOAD). See docs/storage.md.

Credentials and endpoint come from the client's own environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, …; GOOGLE_APPLICATION_CREDENTIALS or gcloud's
application-default credentials, STORAGE_EMULATOR_HOST) and `run.storage_options` (fsspec's keyword
arguments, e.g. `endpoint_url`, `key`, `secret`; gcsfs: `token`, `project`). They are never part of
a root's URL, a manifest row or a log line: `Root.url` is the URL as configured, and options are
held apart.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
# Protocols whose client publishes a whole local file (`put_file`) or bytes (`pipe_file`) all or
# nothing, so `Root.publish_file` / `publish_bytes` upload straight to the final key:
# - s3fs sends one PUT, or a multipart upload it completes only after every part is in and aborts on
#   an error; S3 shows an object only once its PUT or CompleteMultipartUpload returns.
# - gcsfs sends one request (`uploadType=multipart`) below 5 MiB, else a resumable upload whose every
#   Content-Range carries the file's total size; GCS creates the object only when that many bytes are
#   in (the last chunk), and gcsfs cancels the session (DELETE) on an error. A killed upload leaves an
#   unfinished session, never an object (gcsfs 2026.10.1: core.py `_put_file`, `_pipe_file`).
ATOMIC_PUT = frozenset({"s3", "s3a", "gs", "gcs"})
# Of those, the ones whose streamed write (`fs.open(key, "wb")`) publishes only on `close()` and drops
# what it has on `discard()`: the shards stage streams each tar straight to its final key there. Not
# gcsfs: `GCSFile.discard()` before the first chunk has gone up (no session yet) leaves the file open
# with its buffer, and the file's `__del__` then closes it, uploading the partial bytes as a whole
# object (seen against the emulator). So on gs:// a shard is staged locally and published as above.
ATOMIC_UPLOAD = frozenset({"s3", "s3a"})
OPTIONS_ENV = "DISCOMV_STORAGE_OPTIONS"  # JSON: storage options for processes this one starts (Ray workers)
_options: dict[str, Any] = {}


def is_remote(root: str | os.PathLike) -> bool:
    """A URL other than `file://`: the root is not a local folder."""
    text = str(root)
    return "://" in text and not text.startswith("file://")


def local_path(root: str | os.PathLike) -> Path:
    """A local root as a Path (`file://` stripped)."""
    text = str(root)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def configure(options: Mapping[str, Any] | None) -> None:
    """Storage options for every root this process (and the processes it starts) opens."""
    global _options
    _options = dict(options or {})
    if _options:
        os.environ[OPTIONS_ENV] = json.dumps(_options)
    else:
        os.environ.pop(OPTIONS_ENV, None)


def storage_options() -> dict[str, Any]:
    if _options:
        return dict(_options)
    raw = os.environ.get(OPTIONS_ENV)
    return json.loads(raw) if raw else {}


@dataclass(frozen=True)
class Root:
    """A remote root: its fsspec filesystem and the path under it. Names below it are '/'-joined."""

    url: str
    fs: Any = field(repr=False, compare=False)
    path: str

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    def key(self, *parts: str) -> str:
        """The filesystem path of `parts` under the root."""
        return posixpath.join(self.path, *parts) if parts else self.path

    def url_of(self, *parts: str) -> str:
        return f"{self.protocol}://{self.key(*parts)}"

    def names(self, *sub: str) -> list[str]:
        """Names of the files directly under `sub` (temp keys included), sorted; [] when none."""
        return self._entries(sub, "file")

    def folders(self, *sub: str) -> list[str]:
        return self._entries(sub, "directory")

    def _entries(self, sub: tuple[str, ...], kind: str) -> list[str]:
        try:
            entries = self.fs.ls(self.key(*sub), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == kind)

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.key(*parts)))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.key(*parts))

    def open(self, *parts: str, block_size: int = 8 << 20) -> Any:
        return self.fs.open(self.key(*parts), "rb", block_size=block_size)

    def remove(self, *parts: str) -> None:
        try:
            self.fs.rm_file(self.key(*parts))
        except FileNotFoundError:
            pass

    def publish_file(self, local: Path, name: str) -> None:
        """Make `name` the whole of the local file `local`, or leave it as it was: upload under a
        temp key, then one copy to the final key (see the module's docstring); where the client's
        upload is itself all-or-nothing (ATOMIC_PUT), one upload straight to the final key."""
        if self.protocol in ATOMIC_PUT:
            self.fs.put_file(str(local), self.key(name))
            return
        tmp = self.key(name + TMP_SUFFIX)
        try:
            self.fs.put_file(str(local), tmp)
            self.fs.copy(tmp, self.key(name))
        finally:
            try:
                self.fs.rm_file(tmp)
            except FileNotFoundError:
                pass

    def publish_bytes(self, data: bytes, name: str) -> None:
        if self.protocol in ATOMIC_PUT:
            self.fs.pipe_file(self.key(name), data)
            return
        tmp = self.key(name + TMP_SUFFIX)
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.copy(tmp, self.key(name))
        finally:
            try:
                self.fs.rm_file(tmp)
            except FileNotFoundError:
                pass


def open_root(url: str | os.PathLike, options: Mapping[str, Any] | None = None) -> Root:
    """The filesystem of a remote root, from fsspec with `options` (default: `configure`'s)."""
    import fsspec

    text = str(url).rstrip("/")
    opts = storage_options() if options is None else dict(options)
    fs, path = fsspec.core.url_to_fs(text, **opts)
    return Root(url=text, fs=fs, path=path.rstrip("/"))


def file_size(path: str | os.PathLike) -> int | None:
    """Bytes of one file, named by a local path or a URI; None when there is none."""
    try:
        if is_remote(path):
            fs, key = fs_of(str(path))
            return int(fs.size(key))
        return local_path(path).stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        return None


def remove_file(path: str | os.PathLike) -> None:
    """Remove one file, named by a local path or a URI; nothing when it is not there."""
    try:
        if is_remote(path):
            fs, key = fs_of(str(path))
            fs.rm_file(key)
        else:
            local_path(path).unlink()
    except FileNotFoundError:
        pass


def fs_of(url: str) -> tuple[Any, str]:
    """The filesystem and path of one object's URI, with its cached listings dropped (another
    process may have written it since)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **storage_options())
    fs.invalidate_cache(path)
    return fs, path


def duckdb_register(con: Any, roots: list[Root]) -> None:
    """Let a duckdb connection read the roots' URLs through their fsspec filesystems (no httpfs
    extension needed, so nothing is downloaded at run time)."""
    seen = set()
    for root in roots:
        if root.protocol not in seen:
            seen.add(root.protocol)
            con.register_filesystem(root.fs)
