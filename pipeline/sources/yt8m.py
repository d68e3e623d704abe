"""YouTube-8M as it is distributed: TFRecords + vocabulary.csv → selected videos → YouTube ids.

The video-level and frame-level TFRecords carry a 4-character pseudo id (`id`) and integer `labels`;
vocabulary.csv names each label (Index, KnowledgeGraphId, Name, ...). A pseudo id becomes a YouTube
id only through the dataset's lookup service: GET <base>/2/j/i/<first two chars>/<id>.js answers
`i("<pseudo id>","<youtube id>");`.

No TensorFlow: records are framed here (length, masked CRC-32C of the length, data, masked CRC of
the data; both CRCs are checked, which the `tfrecord` package's own reader does not do, so a corrupt
file fails naming its record) and parsed with the `tf.train.Example` classes that package ships.
Frame-level files hold SequenceExamples, whose `context` is field 1 like an Example's `features`:
the same parse reads their id and labels, and the frame features are skipped unread.
"""

from __future__ import annotations

import csv
import glob
import http.client
import importlib.util
import logging
import random
import re
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.hosts import HostRefused, check_public_url
from pipeline.manifest import ManifestStore
from pipeline.stage import MapBatches, map_inline

log = logging.getLogger("discomv")

MUSIC_VIDEO = "/m/0mdxd"  # KnowledgeGraphId of the "Music video" entity (about 116k videos)
PSEUDO_ID = re.compile(r"^[A-Za-z0-9_-]{4}$")
ANSWER = re.compile(r'^\s*i\(\s*"([A-Za-z0-9_-]{4})"\s*,\s*"([A-Za-z0-9_-]{11})"\s*\)\s*;?\s*$')
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords")
CACHE = "yt8m_lookup"  # a manifest-like folder under the manifest root (`discomv compact` works on it)
CACHE_SCHEMA = pa.schema([
    ("key", pa.string()),  # the pseudo id
    ("service", pa.string()),  # the lookup base URL that answered
    ("youtube_id", pa.string()),
    ("reason", pa.string()),
    ("finished_at", pa.timestamp("us", tz="UTC")),
])


class SourceError(ValueError):
    """A YouTube-8M input that isn't what it claims; the message names the file (and record)."""


class CorruptRecord(SourceError):
    def __init__(self, path: Path | str, index: int, problem: str) -> None:
        super().__init__(f"ingest input {path}: record {index}: {problem}")
        self.path, self.index = str(path), index


@dataclass(frozen=True)
class Label:
    index: int
    kg_id: str
    name: str


@dataclass(frozen=True)
class Video:
    file: str
    record: int
    pseudo_id: str
    labels: list[str]  # the matched label names


# ---------------------------------------------------------------- TFRecords and the vocabulary


def tfrecord_files(path: Path) -> list[Path] | None:
    """The TFRecord files an input names (a file, a glob or a folder of them); None when it names none."""
    if any(c in str(path) for c in "*?["):
        if "tfrecord" not in path.name:  # a glob must name TFRecords (train*.tfrecord)
            return None
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not files:
            raise SourceError(f"ingest input {path}: the pattern matches no file")
        return files
    if path.is_dir():
        files = sorted(p for s in TFRECORD_SUFFIXES for p in path.glob(f"*{s}"))
        if not files:
            raise SourceError(f"ingest input {path}: a folder without *.tfrecord files")
        return files
    return [path] if path.suffix in TFRECORD_SUFFIXES else None


def iter_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """(index, payload) of each record, streaming, with both CRCs checked."""
    with open(path, "rb") as f:
        index = 0
        while header := f.read(12):
            if len(header) < 12:
                raise CorruptRecord(path, index, f"truncated: {len(header)} of 12 header bytes")
            if _masked_crc(header[:8]) != header[8:]:
                raise CorruptRecord(path, index, "bad CRC of the record length (corrupt file)")
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            crc = f.read(4)
            if len(data) < length or len(crc) < 4:
                raise CorruptRecord(path, index, f"truncated: {len(data)} of {length} bytes and {len(crc)} of 4 CRC bytes")
            if _masked_crc(data) != crc:
                raise CorruptRecord(path, index, "bad CRC of the record data (corrupt file)")
            yield index, data
            index += 1


def _masked_crc(data: bytes) -> bytes:
    import crc32c

    crc = crc32c.crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _example_class() -> Any:
    """tfrecord's generated `tf.train.Example`. The package's __init__ imports torch (seconds of
    start-up for nothing here), so unless tfrecord is already imported only its generated module is
    loaded, under its own name so that a later `import tfrecord` reuses it."""
    name = "tfrecord.example_pb2"
    if name not in sys.modules:
        spec = importlib.util.find_spec("tfrecord")  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise SourceError("YouTube-8M TFRecords need the `tfrecord` package: pip install -e .")
        location = Path(list(spec.submodule_search_locations)[0]) / "example_pb2.py"
        module_spec = importlib.util.spec_from_file_location(name, location)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name].Example


def find_vocabulary(files: list[Path], configured: str | None) -> Path:
    """The configured vocabulary.csv, else one beside the TFRecords or in the folder above them."""
    if configured:
        return Path(configured)
    for folder in (files[0].parent, files[0].parent.parent):
        if (folder / "vocabulary.csv").is_file():
            return folder / "vocabulary.csv"
    raise SourceError(
        f"ingest input {files[0]}: no vocabulary.csv beside the TFRecords or above them; "
        "set ingest.yt8m_vocabulary"
    )


def read_vocabulary(path: Path) -> dict[int, Label]:
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            found = reader.fieldnames or []
            if not {"Index", "KnowledgeGraphId", "Name"} <= set(found):
                raise SourceError(
                    f"{path}: not a YouTube-8M vocabulary.csv (expected columns Index, KnowledgeGraphId, "
                    f"Name; found {found})"
                )
            return {int(r["Index"]): Label(int(r["Index"]), r["KnowledgeGraphId"], r["Name"]) for r in reader}
    except OSError as e:
        raise SourceError(f"{path}: cannot read the vocabulary ({e})") from e
    except ValueError as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"{path}: a vocabulary row without an integer Index ({e})") from e


def select_labels(vocabulary: dict[int, Label], wanted: list[str], where: Path) -> dict[int, str]:
    """Label index → name for each wanted label, given by name (any case) or KnowledgeGraphId."""
    by_name = {label.name.casefold(): label for label in vocabulary.values()}
    by_kg = {label.kg_id: label for label in vocabulary.values()}
    chosen = {}
    for item in wanted:
        label = by_kg.get(item.strip()) or by_name.get(item.strip().casefold())
        if label is None:
            raise SourceError(f"ingest.yt8m_labels: {item!r} is neither a Name nor a KnowledgeGraphId in {where}")
        chosen[label.index] = label.name
    return chosen


def iter_videos(files: Iterable[Path], selected: dict[int, str]) -> Iterator[Video]:
    """Videos of the TFRecords with at least one selected label, streaming, in file order."""
    from google.protobuf.message import DecodeError

    example_class = _example_class()
    for path in files:
        for index, data in iter_records(path):
            example = example_class()
            try:
                example.ParseFromString(data)
            except DecodeError as e:
                raise CorruptRecord(path, index, f"not a tf.train.Example ({e})") from e
            features = example.features.feature
            if "id" not in features or not features["id"].bytes_list.value:
                raise CorruptRecord(path, index, "no `id` feature (not a YouTube-8M record)")
            matched = [selected[i] for i in features["labels"].int64_list.value if i in selected]
            if matched:
                pseudo = features["id"].bytes_list.value[0].decode("utf-8", errors="replace")
                yield Video(str(path), index, pseudo, list(dict.fromkeys(matched)))


# ---------------------------------------------------------------- pseudo id → YouTube id


@dataclass(frozen=True)
class LookupSettings:
    """Limits are totals over all lookups in flight (they are shared out among parallel batches)."""

    base_url: str = "https://data.yt8m.org"
    concurrency: int = 8
    rate: float = 10.0  # requests per second
    retries: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    timeout_s: float = 15.0
    batch: int = 2000  # ids per batch (one Ray task each when run through the runner)


def lookup_url(base_url: str, pseudo_id: str) -> str:
    return f"{base_url.rstrip('/')}/2/j/i/{pseudo_id[:2]}/{pseudo_id}.js"


def check_service(base_url: str, allow_private_hosts: bool) -> str | None:
    """A refusal reason for the lookup base URL, or None: http(s) only, and public hosts unless allowed
    (the same rule as download's, so a candidate list cannot make ingest probe internal services)."""
    try:
        check_public_url(base_url, allow_private_hosts)
    except HostRefused as e:
        if e.kind == "bad_url":
            return f"ingest.yt8m_lookup_url: only http(s) URLs ({base_url!r})"
        if e.kind == "unresolved":
            return None  # offline: each lookup then fails as a retryable network error
        return f"ingest.yt8m_lookup_url: {e}; set ingest.yt8m_allow_private_hosts=true to allow"
    return None


class RateLimiter:
    """Spaces calls at least 1/rate seconds apart across threads."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.next)
            self.next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a redirect could point anywhere
        return None


def lookup_one(pseudo_id: str, settings: LookupSettings, limiter: RateLimiter, opener: Any) -> dict[str, Any]:
    """{pseudo_id, youtube_id, reason, definitive}. 404/410 and a malformed answer are definitive (asking
    again gives the same); 5xx, 429, other HTTP errors and network errors are retried with backoff,
    then reported as not definitive (asked again next run)."""
    url = lookup_url(settings.base_url, pseudo_id)
    attempts = 0
    while True:
        attempts += 1
        limiter.wait()
        try:
            with opener.open(url, timeout=settings.timeout_s) as response:
                body = response.read(4096).decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                return _answer(pseudo_id, None, f"unresolved: not in the YouTube-8M lookup service (HTTP {e.code})")
            problem = f"HTTP {e.code}"
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, timeouts, resets, bad status lines
            problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"[:200]
        else:
            match = ANSWER.match(body)
            if match and match.group(1) == pseudo_id:
                return _answer(pseudo_id, match.group(2), None)
            return _answer(pseudo_id, None, f"unresolved: malformed lookup answer {body[:80]!r}")
        if attempts > settings.retries:
            return _answer(pseudo_id, None, f"unresolved: lookup failed {attempts} times ({problem}); "
                                            "asked again next run", definitive=False)
        delay = min(settings.backoff_max_s, settings.backoff_s * 2 ** (attempts - 1))
        time.sleep(delay * random.uniform(0.5, 1.0))


def _answer(pseudo_id: str, youtube_id: str | None, reason: str | None, definitive: bool = True) -> dict[str, Any]:
    return {"pseudo_id": pseudo_id, "youtube_id": youtube_id, "reason": reason, "definitive": definitive}


def resolve_batch(pseudo_ids: list[str], settings: LookupSettings) -> list[dict[str, Any]]:
    """One answer per id, `settings.concurrency` lookups in flight at `settings.rate` requests/s."""
    limiter = RateLimiter(settings.rate)
    opener = urllib.request.build_opener(_NoRedirect)
    with ThreadPoolExecutor(max_workers=max(1, min(settings.concurrency, len(pseudo_ids)))) as pool:
        return list(pool.map(lambda p: lookup_one(p, settings, limiter, opener), pseudo_ids))


def resolve_ids(
    pseudo_ids: Iterable[str], settings: LookupSettings, manifest_root: str | Path, map_batches: MapBatches = map_inline,
) -> dict[str, dict[str, Any]]:
    """Answers for these ids: from the cache under the manifest root, else asked of the service in
    batches through `map_batches(fn, batches, parallel, num_cpus)` (the runner's Ray hook, or inline).
    Definitive answers are cached as each batch returns, so a re-run (or a run after a kill) asks
    nothing twice; answers that were not definitive are asked again next run."""
    store = ManifestStore(manifest_root)
    known = load_cache(store, settings.base_url)
    todo = [p for p in dict.fromkeys(pseudo_ids) if p not in known]
    if todo:
        batches = [todo[i : i + settings.batch] for i in range(0, len(todo), max(1, settings.batch))]
        parallel = max(1, min(len(batches), settings.concurrency))
        each = replace(settings, concurrency=max(1, settings.concurrency // parallel), rate=settings.rate / parallel)
        log.info("yt8m: looking up %d pseudo ids (%d cached) at %s in %d batches, %d at once",
                 len(todo), len(known), settings.base_url, len(batches), parallel)
        # I/O-bound work: a quarter CPU per batch leaves the cores to the stages.
        for answers in map_batches(partial(resolve_batch, settings=each), batches, parallel, num_cpus=0.25):
            now = datetime.now(timezone.utc)
            store.append(CACHE, CACHE_SCHEMA, [
                {"key": a["pseudo_id"], "service": settings.base_url, "youtube_id": a["youtube_id"],
                 "reason": a["reason"], "finished_at": now}
                for a in answers if a["definitive"]
            ])
            known.update((a["pseudo_id"], a) for a in answers)
    return known


def load_cache(store: ManifestStore, base_url: str) -> dict[str, dict[str, Any]]:
    table = store.read(CACHE)
    if table is None:
        return {}
    return {
        row["key"]: _answer(row["key"], row["youtube_id"], row["reason"])
        for row in table.to_pylist() if row["service"] == base_url
    }
