"""Media under `run.media_root` — a local folder, a `file://` URL or an object-store URI
(`s3://bucket/prefix`, `gs://…`) — as the stages see it: local files to write, then publish; local files to read.

Writing (`writing`, `publish`): a stage writes an artifact into a local scratch file and publishes it
whole. On a local root the scratch file is `<final>.part` beside the final name and publishing is
`os.replace` — the rename every stage did before. On an object store the scratch file lies under the
node's cache folder and is uploaded with `Root.publish_file` (one PUT or a completed multipart
upload on S3, one request or a finalized resumable upload on GCS: the object appears whole or not
at all); media later stages read (a download, stems)
then move into the node's cache, so a later stage on the same node reads them without a fetch.

Reading (`local`): `with media.local(path) as file:` gives a local file for ffmpeg, decord and
soundfile. On a local root it is the path itself (no copy). On an object store it is a copy in the
node's bounded cache (pipeline/media/cache.py: fetched on first use, evicted least recently used
beyond `run.media_cache_gb`, never while in use, one whole copy however many workers ask).

Manifest columns hold what `uri` returns: the local path as before, or the object's URI.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from pipeline import storage
from pipeline.media.cache import NodeCache

DEFAULT_CACHE_GB = 20.0
COPY_CHUNK = 8 << 20
_stores: dict[tuple[str, str | None, float], MediaStore] = {}
_stores_lock = threading.Lock()


def media_store(run: Any) -> MediaStore:
    """The process's MediaStore for a run config (`media_root`, `media_cache`, `media_cache_gb`)."""
    key = (str(run.media_root), getattr(run, "media_cache", None),
           float(getattr(run, "media_cache_gb", DEFAULT_CACHE_GB)))
    with _stores_lock:
        if key not in _stores:
            _stores[key] = MediaStore(*key)
        return _stores[key]


def default_cache_folder(root: str) -> Path:
    """`<temp dir>/discomv-media-<hash of the root>`: one cache per media root and node."""
    return Path(tempfile.gettempdir()) / f"discomv-media-{hashlib.sha1(root.encode()).hexdigest()[:12]}"


class MediaStore:
    def __init__(self, root: str, cache_folder: str | None = None, cache_gb: float = DEFAULT_CACHE_GB) -> None:
        self.url = str(root).rstrip("/")
        self.remote = storage.is_remote(self.url)
        self.cache: NodeCache | None = None
        if self.remote:
            self.root = storage.open_root(self.url)
            folder = Path(cache_folder) if cache_folder else default_cache_folder(self.url)
            self.cache = NodeCache(folder, int(cache_gb * 1e9))
            self.scratch = folder / "scratch"
        else:
            self.folder = storage.local_path(self.url)

    # ---------------------------------------------------------------- names

    def uri(self, kind: str, name: str) -> str:
        """What a manifest column holds for `<kind>/<name>`: the local path, or the object's URI."""
        return self.root.url_of(kind, name) if self.remote else str(self.folder / kind / name)

    def work_dir(self, kind: str) -> Path:
        """A local folder to write `kind` files in: the root's own folder, or this node's scratch."""
        folder = self.scratch / kind if self.remote else self.folder / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # ---------------------------------------------------------------- writing

    @contextmanager
    def writing(self, kind: str, name: str, cache: bool = False) -> Iterator[Path]:
        """A local file to write `<kind>/<name>` into, published whole when the block ends without
        an error (removed when it raises); `cache`: as in `publish`."""
        # one writer per key at a time; a name of its own, so a kill's leftover is overwritten next time
        partial = self.work_dir(kind) / f"{name}.part"
        try:
            yield partial
            self.publish(partial, kind, name, cache)
        finally:
            partial.unlink(missing_ok=True)

    def publish(self, local: Path, kind: str, name: str, cache: bool = False) -> str:
        """Make `<kind>/<name>` the whole of the local file `local` (moved or uploaded); its URI.
        `cache`: a later stage reads it, so an uploaded file moves into this node's cache rather
        than being deleted."""
        if not self.remote:
            final = self.folder / kind / name
            local.replace(final)
            return str(final)
        self.root.publish_file(local, f"{kind}/{name}")
        uri = self.uri(kind, name)
        assert self.cache is not None
        if not (cache and self.cache.adopt(cache_name(uri), local)):
            local.unlink(missing_ok=True)
        return uri

    # ---------------------------------------------------------------- reading

    def is_file(self, path: str | None) -> bool:
        if not path:
            return False
        if not self.remote or not storage.is_remote(path):
            return storage.local_path(path).is_file()
        return storage.file_size(path) is not None

    @contextmanager
    def local(self, path: str) -> Iterator[Path]:
        """A local file with the contents of `path` for as long as the block runs (FileNotFoundError
        when there is none)."""
        if not self.remote or not storage.is_remote(path):
            yield storage.local_path(path)
            return
        assert self.cache is not None
        fs, key = storage.fs_of(path)

        def fetch(out: BinaryIO) -> None:
            with fs.open(key, "rb", block_size=COPY_CHUNK) as source:
                shutil.copyfileobj(source, out, COPY_CHUNK)

        size = storage.file_size(path)
        if size is None:
            raise FileNotFoundError(f"no media at {path}")
        with self.cache.pinned(cache_name(path), fetch, size) as file:
            yield file

    def read_bytes(self, path: str) -> bytes:
        """A small file's bytes (an .npy artifact), straight from the root: read once, not cached."""
        if not self.remote or not storage.is_remote(path):
            return storage.local_path(path).read_bytes()
        fs, key = storage.fs_of(path)
        return fs.cat_file(key)

    def find(self, kind: str, stem: str, suffixes: tuple[str, ...]) -> str | None:
        """The URI of `<kind>/<stem><suffix>` for the first suffix present, or None."""
        for suffix in suffixes:
            uri = self.uri(kind, stem + suffix)
            if self.is_file(uri):
                return uri
        return None

    def remove(self, path: str) -> None:
        storage.remove_file(path)


def cache_name(uri: str) -> str:
    """A cache entry's file name: a hash of the URI (no name comes from a key or a URL), keeping a
    plain suffix so readers that go by extension still do."""
    suffix = os.path.splitext(uri)[1]
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""
    return hashlib.sha256(uri.encode()).hexdigest()[:40] + suffix
