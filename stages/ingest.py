"""ingest: DISCO-10M Parquet, YouTube-8M TFRecords or id lists, URL lists → one candidates table.

Keys are canonical: `yt_<11-char id>` for anything on YouTube (so the same video from two
sources is one candidate), `url_<sha1>` for other http(s) URLs, `bad_<sha1>` for rows rejected
with a reason. The first source to list a key keeps it; the others are recorded in `also_in`.
YouTube-8M's 4-character pseudo ids are resolved to YouTube ids first (pipeline/sources/yt8m.py),
so they dedupe like any other YouTube id.
"""

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

import pyarrow as pa

from pipeline.options import ConfigError, option
from pipeline.sources import yt8m
from pipeline.stage import Result, Row, SourceStage

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


@dataclass
class IngestConfig:
    inputs: list[str] = option(
        [],
        "input files: DISCO-10M .parquet, YouTube-8M .tfrecord files (a glob or a folder too), id lists "
        "(.txt/.csv, YouTube or 4-char YouTube-8M ids) or URL lists; prefix NAME= to name the source (e.g. yt8m=ids.txt)",
        output=False,
    )
    limit: int | None = option(None, "keep only the first N candidates (trial runs)", output=False)
    sample: float | None = option(None, "keep a deterministic fraction (0-1] of candidates by key hash",
                                  output=False)
    max_duration_s: float | None = option(None, "drop candidates whose listed duration is longer")
    default_license: str = option(
        "youtube-standard (unverified)", "license recorded when the input has no license column"
    )
    yt8m_labels: list[str] = option(
        [yt8m.MUSIC_VIDEO], "YouTube-8M TFRecords: keep videos with any of these labels (vocabulary Name or "
        "KnowledgeGraphId; default /m/0mdxd, 'Music video')",
    )
    yt8m_vocabulary: str | None = option(None, "YouTube-8M vocabulary.csv (default: beside the TFRecords or above)")
    yt8m_lookup_url: str = option("https://data.yt8m.org", "YouTube-8M lookup service: pseudo id → YouTube id")
    yt8m_allow_private_hosts: bool = option(False, "allow a lookup service on loopback/private addresses", output=False)
    yt8m_lookup_concurrency: int = option(8, "YouTube-8M lookups in flight at once, in total", output=False)
    yt8m_lookup_rate: float = option(10.0, "YouTube-8M lookup requests per second, in total", output=False)
    yt8m_lookup_retries: int = option(3, "retries of a transient lookup failure (5xx, 429, network)", output=False)
    yt8m_lookup_backoff_s: float = option(1.0, "first lookup retry delay; doubles each retry, with jitter", output=False)
    yt8m_lookup_batch: int = option(2000, "pseudo ids per lookup batch; several batches run as Ray tasks", output=False)
    yt8m_video_url: str = option(
        "https://www.youtube.com/watch?v={id}", "URL a resolved YouTube-8M video is downloaded from ({id}: its YouTube id)"
    )


class Ingest(SourceStage):
    name = "ingest"
    version = "1"
    Config = IngestConfig
    schema = pa.schema(
        [
            ("source", pa.string()),
            ("url", pa.string()),
            ("youtube_id", pa.string()),
            ("title", pa.string()),
            ("artist", pa.string()),
            ("artist_id", pa.string()),
            ("track_id", pa.string()),
            ("track_name", pa.string()),
            ("duration_s", pa.float64()),
            ("license", pa.string()),
            ("also_in", pa.list_(pa.string())),
            ("input_file", pa.string()),
            ("input_row", pa.int64()),
            ("disco_scores", pa.string()),  # DISCO-10M similarity_* columns as JSON
            ("yt8m_id", pa.string()),  # the YouTube-8M pseudo id, when the input gave one
            ("yt8m_labels", pa.list_(pa.string())),  # the matched YouTube-8M label names
        ]
    )

    @property
    def resources(self):
        from pipeline.stage import Resources

        return Resources(num_cpus=1, batch_size=512)

    def source_rows(self) -> list[Row]:
        keys = self.source_keys()
        return [row for window in self.source_windows(keys.column("ord").to_numpy(), 1 << 16) for row in window]

    def source_keys(self) -> pa.Table:
        """Pass 1, streamed over the id/URL columns only: (key, ord) of every candidate kept, in input
        order (ord counts rows across the inputs). YouTube-8M pseudo ids are resolved (cached lookups)
        before they have keys. The first input row of a key keeps it (a duckdb group-by, not a Python
        set of 15M keys); the others go to `also_in`. With a limit, reading stops once that many
        candidates are found (later duplicates of them are then not listed in `also_in`)."""
        if not self.config.inputs:
            raise InputError("ingest.inputs is empty: pass --set ingest.inputs=[path,...] or a config file")
        limit, sample = self.config.limit, self.config.sample
        seen: set[str] = set()  # only with a limit: at most `limit` keys
        chunks, pseudo = [], []  # pseudo: (ord, pseudo id, source, where) of rows keyed after the lookups
        self._inputs: list[_Input] = []
        start = 0
        for spec in self.config.inputs:
            source_input = self._open(*_source_and_path(spec), start)
            self._inputs.append(source_input)
            for batch in source_input.batches(keys_only=True):
                keys = []
                for i, rec in enumerate(batch):
                    ord_, raw = start + i, _raw(rec, source_input.columns)
                    if yt8m.PSEUDO_ID.match(str(raw).strip()):
                        pseudo.append((ord_, str(raw).strip(), source_input.source, source_input.where(rec, ord_)))
                        keys.append(None)
                        taken = _take("yt8m:" + str(raw).strip(), seen, None) if limit is not None else False
                    else:
                        keys.append(_key(raw, source_input.source, source_input.where(rec, ord_))[0])
                        taken = _take(keys[-1], seen, sample) if limit is not None else False
                    if taken and len(seen) >= limit:
                        break
                chunks.append(pa.table({"key": pa.array(keys, pa.string()),
                                        "ord": pa.array(range(start, start + len(keys)), pa.int64())}))
                start += len(keys)
                if limit is not None and len(seen) >= limit:
                    break
            source_input.rows = start - source_input.start
            if limit is not None and len(seen) >= limit:
                break
        empty = pa.table({"key": pa.array([], pa.string()), "ord": pa.array([], pa.int64())})
        candidates = pa.concat_tables(chunks) if chunks else empty
        return self._dedupe(candidates, self._resolve(pseudo), {o: where for o, _, _, where in pseudo})

    def _open(self, source: str, path: Path, start: int) -> _Input:
        try:
            files = yt8m.tfrecord_files(path)
            if files is None:
                names, _ = _open_input(path)
                return _Input(source, path, _pick_columns(path, names), start)
            for file in files:
                if not file.is_file():
                    raise InputError(f"ingest input {file}: no such file")
            vocabulary = yt8m.find_vocabulary(files, self.config.yt8m_vocabulary)
            wanted = yt8m.select_labels(yt8m.read_vocabulary(vocabulary), self.config.yt8m_labels, vocabulary)
            log.info("ingest %s: %d files, videos with labels %s", path, len(files), sorted(set(wanted.values())))
            return _Input(source, path, {"youtube_id": "id"}, start, tfrecords=files, labels=wanted)
        except yt8m.SourceError as e:
            raise InputError(str(e)) from e

    def _resolve(self, pseudo: list[tuple[int, str, str, tuple[str, int]]]) -> pa.Table:
        """YouTube-8M pseudo ids → (ord, key): `yt_<id>` (cached, rate-limited lookups), or a `bad_`
        key whose row is failed with the lookup's reason (in pass 2)."""
        self._answers: dict[str, dict[str, Any]] = {}
        if pseudo:
            c = self.config
            refusal = yt8m.check_service(c.yt8m_lookup_url, c.yt8m_allow_private_hosts)
            if refusal or "{id}" not in c.yt8m_video_url:
                raise ConfigError(refusal or f"ingest.yt8m_video_url: {c.yt8m_video_url!r} has no {{id}}")
            settings = yt8m.LookupSettings(
                c.yt8m_lookup_url, c.yt8m_lookup_concurrency, c.yt8m_lookup_rate, c.yt8m_lookup_retries,
                c.yt8m_lookup_backoff_s, batch=c.yt8m_lookup_batch,
            )
            self._answers = yt8m.resolve_ids([p for _, p, _, _ in pseudo], settings, self.run.manifest_root,
                                             self.map_batches)
        keys = [_pseudo_key(self._answers[p], p, source, where) for _, p, source, where in pseudo]
        return pa.table({"ord": pa.array([o for o, _, _, _ in pseudo], pa.int64()), "key": pa.array(keys, pa.string())})

    def _dedupe(self, candidates: pa.Table, resolved: pa.Table, pseudo_where: dict[int, tuple[str, int]]) -> pa.Table:
        from pipeline.manifest import connect

        with connect() as con:
            con.register("listed", candidates)
            con.register("resolved", resolved)
            con.execute("CREATE TEMP TABLE candidates AS SELECT coalesce(l.key, r.key) AS key, l.ord FROM listed l "
                        "LEFT JOIN resolved r USING (ord)")
            con.execute("CREATE TEMP TABLE firsts AS SELECT key, min(ord) AS ord, count(*) AS n FROM candidates "
                        "GROUP BY key")
            dups = con.execute("SELECT c.key, c.ord FROM candidates c JOIN firsts f ON c.key = f.key AND f.n > 1 "
                               "AND c.ord > f.ord ORDER BY c.ord").fetchall()
            kept = con.sql("SELECT key, ord FROM firsts ORDER BY ord").to_arrow_table()
        self._also_in: dict[str, list[str]] = {}
        for key, ord_ in dups:
            source_input = next(i for i in self._inputs if i.start <= ord_ < i.start + i.rows)
            file, row = pseudo_where.get(ord_) or (source_input.path, ord_ - source_input.start)
            self._also_in.setdefault(key, []).append(f"{source_input.source}:{file}:{row}")
        if self.config.sample is not None:
            keep = [_fraction(k) < self.config.sample for k in kept.column("key").to_pylist()]
            kept = kept.filter(pa.array(keep, pa.bool_()))
        if self.config.limit is not None:
            kept = kept.slice(0, self.config.limit)
        return kept

    def source_windows(self, ords: Any, size: int) -> Iterator[list[Row]]:
        """Pass 2: the candidate rows of `ords` (sorted, from `source_keys`), `size` at a time, read
        back with only the columns ingest records (never an embedding)."""
        import numpy as np

        ords = np.asarray(ords, dtype=np.int64)
        window: list[Row] = []
        for source_input in self._inputs:
            lo, hi = np.searchsorted(ords, [source_input.start, source_input.start + source_input.rows])
            if lo == hi:
                continue
            wanted = np.zeros(source_input.rows, dtype=bool)  # a bit per input row, not a set of 15M ints
            wanted[ords[lo:hi] - source_input.start] = True
            last, index = int(ords[hi - 1]) - source_input.start, 0
            for batch in source_input.batches():
                for rec in batch:
                    if index < source_input.rows and wanted[index]:
                        window.append(self._row(source_input, rec, index))
                        if len(window) >= size:
                            yield window
                            window = []
                    index += 1
                if index > last:
                    break
        if window:
            yield window

    def _row(self, source_input: _Input, rec: dict[str, Any], index: int) -> Row:
        row = _candidate(rec, source_input.where(rec, source_input.start + index), source_input.columns, source_input.source,
                         self.config.default_license)
        if pseudo := row["yt8m_id"]:
            answer = self._answers[pseudo]
            if vid := answer["youtube_id"]:
                row.update(key=f"yt_{vid}", url=self.config.yt8m_video_url.format(id=vid), youtube_id=vid)
            else:
                row.update(key=_pseudo_key(answer, pseudo, row["source"], (row["input_file"], row["input_row"])),
                           problem=answer["reason"])
        row["yt8m_labels"] = rec.get("yt8m_labels")
        row["also_in"] = list(self._also_in.get(row["key"], []))
        return row

    def process(self, rows: list[Row]) -> list[Result]:
        results = []
        for row in rows:
            problem = row.pop("problem", None)
            metrics = {k: row.get(k) for k in self.schema.names}
            max_s = self.config.max_duration_s
            if problem:
                results.append(Result.failed(row["key"], problem, **metrics))
            elif max_s is not None and row.get("duration_s") and row["duration_s"] > max_s:
                results.append(Result.dropped(
                    row["key"], f"too_long: listed {row['duration_s']:.0f}s > {max_s:.0f}s", **metrics
                ))
            else:
                results.append(Result.ok(row["key"], **metrics))
        return results

# ---------------------------------------------------------------- reading inputs


def _source_and_path(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return name, Path(path)
    path = Path(spec)
    if "tfrecord" in path.name or path.is_dir():
        return "yt8m", path
    return ("disco10m" if path.suffix == ".parquet" else path.stem), path


@dataclass
class _Input:
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


def _open_input(path: Path) -> tuple[list[str], int]:
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
    names, _ = _open_input(path) if path.suffix == ".parquet" else ([], 0)
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


def _pick_columns(path: Path, names: list[str]) -> dict[str, str]:
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


def _candidate(
    rec: dict[str, Any], where: tuple[str, int], columns: dict[str, str], source: str, default_license: str
) -> Row:
    def get(field_name: str) -> Any:
        return _field(rec, columns, field_name)

    raw = _raw(rec, columns)
    pseudo = str(raw).strip() if yt8m.PSEUDO_ID.match(str(raw).strip()) else None  # resolved in pass 1
    key, url, youtube_id, problem = ("", None, None, None) if pseudo else _key(raw, source, where)
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


def _raw(rec: dict[str, Any], columns: dict[str, str]) -> Any:
    return _field(rec, columns, "url") or _field(rec, columns, "youtube_id") or ""


def _key(raw: Any, source: str, where: tuple[str, int]) -> tuple[str, str | None, str | None, str | None]:
    """canonical() of a row's URL/id, with a rejected row keyed `bad_<sha1 of where it is>`."""
    key, url, youtube_id, problem = canonical(str(raw))
    if problem:
        key = "bad_" + hashlib.sha1(f"{source}:{where[0]}:{where[1]}:{raw}".encode()).hexdigest()[:16]
    return key, url, youtube_id, problem


def _pseudo_key(answer: dict[str, Any], pseudo: str, source: str, where: tuple[str, int]) -> str:
    """The key of a YouTube-8M row: its YouTube id's, or (no answer) `bad_` of where it is."""
    if answer["youtube_id"]:
        return f"yt_{answer['youtube_id']}"
    return "bad_" + hashlib.sha1(f"{source}:{where[0]}:{where[1]}:{pseudo}".encode()).hexdigest()[:16]


def _take(key: str, seen: set[str], sample: float | None) -> bool:
    """Count a key toward a limit: new, and in the sample."""
    if key in seen or (sample is not None and _fraction(key) >= sample):
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


def _fraction(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
