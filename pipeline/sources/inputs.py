"""Candidate inputs as ingest reads them: DISCO-10M Parquet (column-selected, row group by row group;
never an embedding column), id and URL lists, YouTube-8M TFRecords; and the canonical key of a URL or
id (`yt_<11-char id>`, `url_<sha1>`, `bad_<sha1 of where it is>`)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from pipeline.sources import yt8m
from pipeline.stage import Row

log = logging.getLogger("discomv")

YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
# DISCO-10M's own URL form: canonical()'s answer without urlparse (15.3M of them per ingest pass)
PLAIN_WATCH_URL = re.compile(r"https?://(?:www\.|m\.|music\.)?youtube\.com/watch\?v=([A-Za-z0-9_-]{11})(?:[&#].*)?")
YOUTUBE_HOSTS = {"youtube.com", "www.youtube.com", "m.youtube.com", "music.youtube.com", "youtu.be"}

# DISCO-10M column names as published, then generic fallbacks.
COLUMNS = {
    "url": ["video_url_youtube", "url", "video_url", "youtube_url"],
    "youtube_id": ["youtube_id", "video_id", "ytid", "id"],
    "title": ["video_title_youtube", "title"],
    "artist": ["primary_artist_name_spotify", "artist", "artist_name"],
    "artist_id": ["artist_id_spotify", "artist_id"],
    "track_id": ["track_id_spotify", "track_id"],
    "track_name": ["track_name_spotify", "track_name"],
    "duration_s": ["video_duration_youtube_sec", "duration_s", "duration"],
    "license": ["license", "video_license"],
}


class InputError(ValueError):
    """An input file that isn't what it claims: fatal, names the file and the problem."""



# ---------------------------------------------------------------- reading inputs


def source_and_path(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return name, Path(path)
    path = Path(spec)
    if "tfrecord" in path.name or path.is_dir():
        return "yt8m", path
    return ("disco10m" if path.suffix == ".parquet" else path.stem), path


@dataclass
class SourceInput:
    """One input as ingest reads it: its records in batches, the same order in both passes."""

    source: str
    path: Path
    columns: dict[str, str]  # ingest field → the input's column
    start: int  # ord of its first row (ords count rows across the inputs)
    rows: int = 0  # known after pass 1
    tfrecords: list[Path] | None = None  # a YouTube-8M input: its files ...
    labels: dict[int, str] | None = None  # ... and the labels selected

    def batches(self, keys_only: bool = False) -> Iterator[list[dict[str, Any]]]:
        if self.tfrecords is None:
            names = [self.columns[f] for f in ("url", "youtube_id") if f in self.columns] if keys_only else None
            yield from _stream(self.path, names or _wanted_columns(self.path, self.columns))
            return
        batch: list[dict[str, Any]] = []
        try:
            for video in yt8m.iter_videos(self.tfrecords, self.labels or {}):
                batch.append({"id": video.pseudo_id, "yt8m_labels": video.labels, "input_file": video.file,
                              "input_row": video.record})
                if len(batch) >= BATCH_ROWS:
                    yield batch
                    batch = []
        except yt8m.SourceError as e:
            raise InputError(str(e)) from e
        if batch:
            yield batch

    def where(self, rec: dict[str, Any], ord_: int) -> tuple[str, int]:
        """(input_file, input_row) of a record: a TFRecord names its own file and record."""
        if "input_file" in rec:
            return rec["input_file"], rec["input_row"]
        return str(self.path), ord_ - self.start


BATCH_ROWS = 65_536


def open_input(path: Path) -> tuple[list[str], int]:
    """(column names, row count) of an input, without reading its rows (a Parquet footer)."""
    if not path.is_file():
        raise InputError(f"ingest input {path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"ingest input {path}: empty file")
    if path.suffix == ".parquet":
        parquet = _parquet(path)
        names = [n for n in parquet.schema_arrow.names if "embedding" not in n]
        rows = parquet.metadata.num_rows
    else:
        records = _read_text_table(path)
        names, rows = (list(records[0]) if records else []), len(records)
    if not rows:
        raise InputError(f"ingest input {path}: no rows")
    return names, rows


def _stream(path: Path, columns: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[list[dict[str, Any]]]:
    """Records of an input in batches: a Parquet file row group by row group with only `columns`
    (large vectors such as DISCO-10M's audio_embedding_spotify are never read)."""
    if path.suffix != ".parquet":
        records = _read_text_table(path)
        for i in range(0, len(records), batch_rows):
            yield records[i:i + batch_rows]
        return
    try:
        for batch in _parquet(path).iter_batches(batch_size=batch_rows, columns=columns):
            yield batch.to_pylist()
    except InputError:
        raise
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"ingest input {path}: not a readable Parquet file ({e})") from e


def _wanted_columns(path: Path, columns: dict[str, str]) -> list[str]:
    """The mapped columns and DISCO-10M's similarity_* scores, in file order."""
    names, _ = open_input(path) if path.suffix == ".parquet" else ([], 0)
    chosen = set(columns.values())
    return [n for n in names if n in chosen or n.startswith("similarity_")]


def _parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise InputError(f"ingest input {path}: not a readable Parquet file ({e})") from e


def _read_text_table(path: Path) -> list[dict[str, Any]]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    first = lines[0]
    has_header = ("," in first or "\t" in first) and not _looks_like_video(first.split(",")[0].split("\t")[0])
    if has_header:
        dialect = "excel-tab" if "\t" in first else "excel"
        return list(csv.DictReader(io.StringIO("\n".join(lines)), dialect=dialect))
    return [{"id": ln.split(",")[0].split("\t")[0].strip()} for ln in lines]


def _looks_like_video(value: str) -> bool:
    value = value.strip()
    return bool(YOUTUBE_ID.match(value)) or "://" in value or value.startswith(("javascript:", "data:"))


def pick_columns(path: Path, names: list[str]) -> dict[str, str]:
    chosen = {}
    for field_name, candidates in COLUMNS.items():
        found = next((c for c in candidates if c in names), None)
        if found:
            chosen[field_name] = found
    if "url" not in chosen and "youtube_id" not in chosen:
        raise InputError(
            f"ingest input {path}: no URL or id column; expected one of "
            f"{COLUMNS['url'] + COLUMNS['youtube_id']}, found {names}"
        )
    missing = [f for f in COLUMNS if f not in chosen and f not in ("url", "youtube_id")]
    log.info("ingest %s: columns %s; not present: %s", path, chosen, missing or "none")
    return chosen


def candidate(
    rec: dict[str, Any], where: tuple[str, int], columns: dict[str, str], source: str, default_license: str
) -> Row:
    def get(field_name: str) -> Any:
        return _field(rec, columns, field_name)

    raw = raw_value(rec, columns)
    pseudo = str(raw).strip() if yt8m.PSEUDO_ID.match(str(raw).strip()) else None  # resolved in pass 1
    key, url, youtube_id, problem = ("", None, None, None) if pseudo else key_of(raw, source, where)
    artist_id = get("artist_id")
    if isinstance(artist_id, (list, tuple)):
        artist_id = artist_id[0] if artist_id else None
    scores = {k: v for k, v in rec.items() if k.startswith("similarity_") and isinstance(v, (int, float))}
    return {
        "key": key,
        "problem": problem,
        "source": source,
        "url": url or str(raw)[:2000],
        "youtube_id": youtube_id,
        "title": _text(get("title")),
        "artist": _text(get("artist")),
        "artist_id": _text(artist_id),
        "track_id": _text(get("track_id")),
        "track_name": _text(get("track_name")),
        "duration_s": _number(get("duration_s")),
        "license": _text(get("license")) or default_license,
        "also_in": [],
        "input_file": where[0],
        "input_row": where[1],
        "disco_scores": json.dumps(scores) if scores else None,
        "yt8m_id": pseudo,
        "yt8m_labels": None,
    }


def _field(rec: dict[str, Any], columns: dict[str, str], field_name: str) -> Any:
    col = columns.get(field_name)
    value = rec.get(col) if col else None
    return value.strip() if isinstance(value, str) else value


def raw_value(rec: dict[str, Any], columns: dict[str, str]) -> Any:
    return _field(rec, columns, "url") or _field(rec, columns, "youtube_id") or ""


def key_of(raw: Any, source: str, where: tuple[str, int]) -> tuple[str, str | None, str | None, str | None]:
    """canonical() of a row's URL/id, with a rejected row keyed `bad_<sha1 of where it is>`."""
    key, url, youtube_id, problem = canonical(str(raw))
    if problem:
        key = "bad_" + hashlib.sha1(f"{source}:{where[0]}:{where[1]}:{raw}".encode()).hexdigest()[:16]
    return key, url, youtube_id, problem


def pseudo_key(answer: dict[str, Any], pseudo: str, source: str, where: tuple[str, int]) -> str:
    """The key of a YouTube-8M row: its YouTube id's, or (no answer) `bad_` of where it is."""
    if answer["youtube_id"]:
        return f"yt_{answer['youtube_id']}"
    return "bad_" + hashlib.sha1(f"{source}:{where[0]}:{where[1]}:{pseudo}".encode()).hexdigest()[:16]


def take(key: str, seen: set[str], sample: float | None) -> bool:
    """Count a key toward a limit: new, and in the sample."""
    if key in seen or (sample is not None and fraction(key) >= sample):
        return False
    seen.add(key)
    return True


def canonical(raw: str) -> tuple[str, str | None, str | None, str | None]:
    """(key, url, youtube_id, problem) for a URL or a bare YouTube id."""
    raw = raw.strip()
    if not raw:
        return "", None, None, "missing_url: empty URL/id"
    if YOUTUBE_ID.match(raw):
        return f"yt_{raw}", f"https://www.youtube.com/watch?v={raw}", raw, None
    if plain := PLAIN_WATCH_URL.fullmatch(raw):
        vid = plain[1]
        return f"yt_{vid}", f"https://www.youtube.com/watch?v={vid}", vid, None
    parsed = urlparse(raw)
    if not parsed.scheme and "/" not in raw:
        return "", None, None, f"bad_id: {raw[:40]!r} is neither an 11-char YouTube id nor an http(s) URL"
    if parsed.scheme not in ("http", "https"):
        what = parsed.scheme or "no scheme"
        return "", None, None, f"bad_url: only http(s) URLs or 11-char YouTube ids are accepted ({what})"
    if not parsed.hostname:
        return "", None, None, "bad_url: no host"
    if parsed.hostname.lower() in YOUTUBE_HOSTS:
        vid = youtube_id_from_url(parsed)
        if not vid:
            return "", None, None, "bad_id: YouTube URL without a valid 11-char video id"
        return f"yt_{vid}", f"https://www.youtube.com/watch?v={vid}", vid, None
    return "url_" + hashlib.sha1(raw.encode()).hexdigest()[:16], raw, None, None


def youtube_id_from_url(parsed: Any) -> str | None:
    if parsed.hostname.lower() == "youtu.be":
        candidate = parsed.path.strip("/").split("/")[0]
    elif parsed.path.startswith(("/shorts/", "/embed/", "/live/")):
        candidate = parsed.path.split("/")[2]
    else:
        candidate = (parse_qs(parsed.query).get("v") or [""])[0]
    return candidate if YOUTUBE_ID.match(candidate) else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):  # a Parquet binary column: bytes in no known encoding
        return bytes(value[:8000]).decode("utf-8", errors="replace")[:2000]
    return str(value).encode("utf-8", errors="replace").decode("utf-8")[:2000]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and number >= 0 else None


def fraction(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
