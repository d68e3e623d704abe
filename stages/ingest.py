"""ingest: DISCO-10M Parquet, YouTube-8M id lists and URL lists → one candidates table.

Keys are canonical: `yt_<11-char id>` for anything on YouTube (so the same video from two
sources is one candidate), `url_<sha1>` for other http(s) URLs, `bad_<sha1>` for rows rejected
with a reason. The first source to list a key keeps it; the others are recorded in `also_in`.
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

from pipeline.options import option
from pipeline.stage import Result, Row, SourceStage

log = logging.getLogger("discomv")

YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
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
        "input files: DISCO-10M .parquet, YouTube-8M id lists (.txt/.csv) or URL lists; "
        "prefix NAME= to name the source (e.g. yt8m=ids.txt)",
        output=False,
    )
    limit: int | None = option(None, "keep only the first N candidates (trial runs)", output=False)
    sample: float | None = option(None, "keep a deterministic fraction (0-1] of candidates by key hash",
                                  output=False)
    max_duration_s: float | None = option(None, "drop candidates whose listed duration is longer")
    default_license: str = option(
        "youtube-standard (unverified)", "license recorded when the input has no license column"
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
        """Pass 1, streamed over the id/URL columns only: (key, ord) of every candidate kept, in
        input order (ord counts rows across the inputs). The first input row of a key keeps it
        (a duckdb group-by, not a Python set of 15M keys); the others go to `also_in`. With a
        limit, reading stops once that many candidates are found (later duplicates of them are
        then not listed in `also_in`)."""
        limit, sample = self.config.limit, self.config.sample
        seen: set[str] = set()  # only with a limit: at most `limit` keys
        chunks = []
        for source, path, columns, start, _ in self._read_inputs():
            index = 0
            for batch in _stream(path, [columns[f] for f in ("url", "youtube_id") if f in columns]):
                keys = [_key(_raw(rec, columns), source, path, index + i)[0] for i, rec in enumerate(batch)]
                if limit is not None:
                    stop = next((i for i, k in enumerate(keys) if _take(k, seen, sample) and len(seen) >= limit), None)
                    keys = keys if stop is None else keys[: stop + 1]
                chunks.append(pa.table({"key": pa.array(keys, pa.string()),
                                        "ord": pa.array(range(start + index, start + index + len(keys)), pa.int64())}))
                index += len(batch)
                if limit is not None and len(seen) >= limit:
                    break
            if limit is not None and len(seen) >= limit:
                break
        empty = pa.table({"key": pa.array([], pa.string()), "ord": pa.array([], pa.int64())})
        return self._dedupe(pa.concat_tables(chunks) if chunks else empty)

    def _dedupe(self, candidates: pa.Table) -> pa.Table:
        from pipeline.manifest import connect

        with connect() as con:
            con.register("candidates", candidates)
            con.execute("CREATE TEMP TABLE firsts AS SELECT key, min(ord) AS ord, count(*) AS n FROM candidates "
                        "GROUP BY key")
            dups = con.execute("SELECT c.key, c.ord FROM candidates c JOIN firsts f ON c.key = f.key AND f.n > 1 "
                           "AND c.ord > f.ord ORDER BY c.ord").fetchall()
            kept = con.sql("SELECT key, ord FROM firsts ORDER BY ord").to_arrow_table()
        self._also_in: dict[str, list[str]] = {}
        for key, ord_ in dups:
            source, path, _, start, _ = next(i for i in self._inputs if i[3] <= ord_ < i[3] + i[4])
            self._also_in.setdefault(key, []).append(f"{source}:{path}:{ord_ - start}")
        if self.config.sample is not None:
            keep = [_fraction(k) < self.config.sample for k in kept.column("key").to_pylist()]
            kept = kept.filter(pa.array(keep, pa.bool_()))
        if self.config.limit is not None:
            kept = kept.slice(0, self.config.limit)
        return kept

    def _read_inputs(self) -> list[tuple[str, Path, dict[str, str], int, int]]:
        """(source, path, chosen columns, first ord, rows) per input, from names and row counts."""
        if not self.config.inputs:
            raise InputError("ingest.inputs is empty: pass --set ingest.inputs=[path,...] or a config file")
        self._inputs, start = [], 0
        for spec in self.config.inputs:
            source, path = _source_and_path(spec)
            names, rows = _open_input(path)
            self._inputs.append((source, path, _pick_columns(path, names), start, rows))
            start += rows
        return self._inputs

    def source_windows(self, ords: Any, size: int) -> Iterator[list[Row]]:
        """Pass 2: the candidate rows of `ords` (sorted, from `source_keys`), `size` at a time,
        read back with only the columns ingest records (never an embedding)."""
        import numpy as np

        ords = np.asarray(ords, dtype=np.int64)
        window: list[Row] = []
        for source, path, columns, start, rows in self._inputs:
            lo, hi = np.searchsorted(ords, [start, start + rows])
            if lo == hi:
                continue
            wanted = np.zeros(rows, dtype=bool)  # a bit per input row, not a set of 15M ints
            wanted[ords[lo:hi] - start] = True
            last, index = int(ords[hi - 1]) - start, 0
            for batch in _stream(path, _wanted_columns(path, columns)):
                for rec in batch:
                    if wanted[index]:
                        row = _candidate(rec, index, columns, source, path, self.config.default_license)
                        row["also_in"] = list(self._also_in.get(row["key"], []))
                        window.append(row)
                        if len(window) >= size:
                            yield window
                            window = []
                    index += 1
                if index > last:
                    break
        if window:
            yield window

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
    return ("disco10m" if path.suffix == ".parquet" else path.stem), path


def read_input(path: Path, source: str, default_license: str) -> Iterator[Row]:
    """Every candidate row of one input, streamed."""
    names, _ = _open_input(path)
    columns = _pick_columns(path, names)
    index = 0
    for batch in _stream(path, _wanted_columns(path, columns)):
        for rec in batch:
            yield _candidate(rec, index, columns, source, path, default_license)
            index += 1


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


def _stream(path: Path, columns: list[str], batch_rows: int = 65_536) -> Iterator[list[dict[str, Any]]]:
    """Records of an input in batches: a Parquet file row group by row group with only `columns`
    (large vectors such as DISCO-10M's audio_embedding_spotify are never read)."""
    if path.suffix != ".parquet":
        records = _read_text_table(path)
        for i in range(0, len(records), batch_rows):
            yield records[i:i + batch_rows]
        return
    for batch in _parquet(path).iter_batches(batch_size=batch_rows, columns=columns):
        yield batch.to_pylist()


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
    rec: dict[str, Any], index: int, columns: dict[str, str], source: str, path: Path, default_license: str
) -> Row:
    def get(field_name: str) -> Any:
        return _field(rec, columns, field_name)

    raw = _raw(rec, columns)
    key, url, youtube_id, problem = _key(raw, source, path, index)
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
        "input_file": str(path),
        "input_row": index,
        "disco_scores": json.dumps(scores) if scores else None,
    }


def _field(rec: dict[str, Any], columns: dict[str, str], field_name: str) -> Any:
    col = columns.get(field_name)
    value = rec.get(col) if col else None
    return value.strip() if isinstance(value, str) else value


def _raw(rec: dict[str, Any], columns: dict[str, str]) -> Any:
    return _field(rec, columns, "url") or _field(rec, columns, "youtube_id") or ""


def _key(raw: Any, source: str, path: Path, index: int) -> tuple[str, str | None, str | None, str | None]:
    """canonical() of a row's URL/id, with a rejected row keyed `bad_<sha1 of where it is>`."""
    key, url, youtube_id, problem = canonical(str(raw))
    if problem:
        key = "bad_" + hashlib.sha1(f"{source}:{path}:{index}:{raw}".encode()).hexdigest()[:16]
    return key, url, youtube_id, problem


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
