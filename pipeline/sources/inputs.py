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

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.sources import yt8m

log = logging.getLogger("discomv")

YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
# DISCO-10M's own URL form: canonical()'s answer without urlparse (15.3M of them per ingest pass)
WATCH_URL = r"https?://(?:www\.|m\.|music\.)?youtube\.com/watch\?v=(?P<id>[A-Za-z0-9_-]{11})(?:[&#].*)?"
PLAIN_WATCH_URL = re.compile(WATCH_URL)
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
    """One input as ingest reads it: its rows as Arrow tables, a batch at a time, in the same order in
    both passes."""

    source: str
    path: Path
    columns: dict[str, str]  # ingest field → the input's column
    start: int  # ord of its first row (ords count rows across the inputs)
    rows: int = 0  # known after pass 1
    tfrecords: list[Path] | None = None  # a YouTube-8M input: its files ...
    labels: dict[int, str] | None = None  # ... and the labels selected

    def tables(self, keys_only: bool = False) -> Iterator[pa.Table]:
        """The rows a batch at a time: a Parquet file row group by row group with only the columns
        ingest records (`keys_only`: the URL/id columns; never an embedding), a text table or the
        YouTube-8M videos as string columns."""
        if self.tfrecords is not None:
            yield from self._videos()
            return
        keys = [self.columns[f] for f in ("url", "youtube_id") if f in self.columns]
        if self.path.suffix == ".parquet":
            yield from _parquet_tables(self.path, keys if keys_only else _wanted_columns(self.path, self.columns))
            return
        records = _read_text_table(self.path)
        names = [n for n in (records[0] if records else {}) if isinstance(n, str)]
        present = [n for n in names if n in keys] if keys_only else _wanted(names, self.columns)
        for i in range(0, len(records), BATCH_ROWS):
            chunk = records[i:i + BATCH_ROWS]
            yield pa.table({n: pa.array([_plain(r.get(n)) for r in chunk], pa.string()) for n in present})

    def _videos(self) -> Iterator[pa.Table]:
        batch: list[dict[str, Any]] = []
        try:
            for video in yt8m.iter_videos(self.tfrecords or [], self.labels or {}):
                batch.append({"id": video.pseudo_id, "yt8m_labels": video.labels, "input_file": video.file,
                              "input_row": video.record})
                if len(batch) >= BATCH_ROWS:
                    yield pa.Table.from_pylist(batch, schema=VIDEO_SCHEMA)
                    batch = []
        except yt8m.SourceError as e:
            raise InputError(str(e)) from e
        if batch:
            yield pa.Table.from_pylist(batch, schema=VIDEO_SCHEMA)

    def where(self, table: pa.Table, ords: Any) -> tuple[Any, Any]:
        """(input_file, input_row) columns of a batch whose rows have `ords`: a TFRecord names its
        own file and record."""
        import numpy as np

        if "input_file" in table.column_names:
            return table.column("input_file"), table.column("input_row")
        return pa.repeat(str(self.path), table.num_rows), pa.array(np.asarray(ords) - self.start, pa.int64())


BATCH_ROWS = 65_536
VIDEO_SCHEMA = pa.schema([("id", pa.string()), ("yt8m_labels", pa.list_(pa.string())),
                          ("input_file", pa.string()), ("input_row", pa.int64())])


def _plain(value: Any) -> str | None:
    """A CSV cell as a string (csv.DictReader gives a list for the extra cells of a long line)."""
    return value if value is None or isinstance(value, str) else str(value)


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


def _parquet_tables(path: Path, columns: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    try:
        for batch in _parquet(path).iter_batches(batch_size=batch_rows, columns=columns):
            yield pa.Table.from_batches([batch])
    except InputError:
        raise
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"ingest input {path}: not a readable Parquet file ({e})") from e


def _wanted_columns(path: Path, columns: dict[str, str]) -> list[str]:
    return _wanted(open_input(path)[0], columns)


def _wanted(names: list[str], columns: dict[str, str]) -> list[str]:
    """The mapped columns and DISCO-10M's similarity_* scores, in file order."""
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


# ---------------------------------------------------------------- candidates, a batch at a time in Arrow
# 15.3M rows per pass: YouTube ids, DISCO-10M's plain watch URLs and the text columns are Arrow
# kernels; only other URLs, pseudo ids and columns of unexpected types go row by row in Python.


def candidates(table: pa.Table, source_input: SourceInput, ords: Any, default_license: str) -> pa.Table:
    """The candidate columns ingest records (its schema, `key` and `problem`) of a batch whose rows
    have `ords`. A YouTube-8M pseudo id gets no key here (`yt8m_id` names it; ingest resolves it);
    `also_in` is left empty for ingest to fill."""
    columns, n = source_input.columns, table.num_rows
    files, rows = source_input.where(table, ords)
    keys = canonical_columns(raw_column(table, columns), source_input.source, files, rows)

    def given(field_name: str) -> Any:
        name = columns.get(field_name)
        return table.column(name) if name in table.column_names else None

    license_ = text_column(given("license"), n)
    has_license = pc.fill_null(pc.greater(pc.utf8_length(license_), 0), False)
    return pa.table({
        "key": keys["key"], "problem": keys["problem"], "source": pa.repeat(source_input.source, n),
        "url": keys["url"], "youtube_id": keys["youtube_id"],
        "title": text_column(given("title"), n), "artist": text_column(given("artist"), n),
        "artist_id": text_column(_first_item(given("artist_id")), n),
        "track_id": text_column(given("track_id"), n), "track_name": text_column(given("track_name"), n),
        "duration_s": number_column(given("duration_s"), n),
        "license": pc.if_else(has_license, license_, default_license),
        "also_in": pa.array([[]] * n, pa.list_(pa.string())),
        "input_file": files, "input_row": rows,
        "disco_scores": scores_column(table),
        "yt8m_id": keys["yt8m_id"],
        "yt8m_labels": table.column("yt8m_labels") if "yt8m_labels" in table.column_names
        else pa.nulls(n, pa.list_(pa.string())),
    })


def raw_column(table: pa.Table, columns: dict[str, str]) -> Any:
    """Each row's URL, else its id, stripped; "" when it has neither: what its key is made from."""
    raw = None
    for field_name in ("url", "youtube_id"):
        name = columns.get(field_name)
        if name not in table.column_names:
            continue
        values = _stripped(table.column(name))
        values = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
        raw = values if raw is None else pc.coalesce(raw, values)
    return pc.fill_null(raw, "") if raw is not None else pa.chunked_array([pa.repeat("", table.num_rows)])


def canonical_columns(raw: Any, source: str, files: Any, rows: Any) -> dict[str, Any]:
    """canonical() of every row as columns (key, url, youtube_id, problem; key_of()'s `bad_` keys),
    and yt8m_id for a YouTube-8M pseudo id, whose key stays null until ingest resolves it."""
    import numpy as np

    none = pa.scalar(None, pa.string())
    pseudo = pc.match_substring_regex(raw, yt8m.PSEUDO_ID.pattern)
    vid = pc.if_else(pc.match_substring_regex(raw, YOUTUBE_ID.pattern), raw,
                     pc.struct_field(pc.extract_regex(raw, f"^{WATCH_URL}$"), "id"))
    out = {
        "key": pc.binary_join_element_wise("yt_", vid, ""),
        "url": pc.if_else(pc.is_null(vid), pc.utf8_slice_codeunits(raw, 0, 2000),
                          pc.binary_join_element_wise("https://www.youtube.com/watch?v=", vid, "")),
        "youtube_id": vid,
        "problem": pa.nulls(len(raw), pa.string()),
        "yt8m_id": pc.if_else(pseudo, raw, none),
    }
    slow = pc.and_(pc.is_null(vid), pc.invert(pseudo))
    index = np.flatnonzero(slow.to_numpy(zero_copy_only=False))
    if not len(index):
        return out
    given = raw.take(index).to_pylist()
    where = zip(files.take(index).to_pylist(), rows.take(index).to_pylist(), strict=True)
    made = [key_of(r, source, w) for r, w in zip(given, where, strict=True)]
    mask = np.zeros(len(raw), dtype=bool)
    mask[index] = True
    for i, name in enumerate(("key", "url", "youtube_id", "problem")):
        values = [m[i] or r[:2000] for m, r in zip(made, given, strict=True)] if name == "url" else [m[i] for m in made]
        out[name] = pc.replace_with_mask(out[name], pa.array(mask), pa.array(values, pa.string()))
    return out


def _stripped(column: Any) -> Any:
    if _is_text(column.type):
        return pc.utf8_trim_whitespace(column).cast(pa.string())
    return pa.chunked_array([pa.array([str(v).strip() if v else None for v in column.to_pylist()], pa.string())])


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def text_column(column: Any, n: int) -> Any:
    """A text field: stripped, at most 2000 characters; other types as their text, row by row."""
    if column is None:
        return pa.nulls(n, pa.string())
    if _is_text(column.type):
        return pc.utf8_slice_codeunits(pc.utf8_trim_whitespace(column), 0, 2000).cast(pa.string())
    return pa.array([_text(v.strip() if isinstance(v, str) else v) for v in column.to_pylist()], pa.string())


def number_column(column: Any, n: int) -> Any:
    """A non-negative number, or null (NaN, negative, not a number)."""
    if column is None:
        return pa.nulls(n, pa.float64())
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_decimal(column.type):
        values = column.cast(pa.float64())
        return pc.if_else(pc.fill_null(pc.greater_equal(values, 0), False), values, pa.scalar(None, pa.float64()))
    return pa.array([_number(v) for v in column.to_pylist()], pa.float64())


def _first_item(column: Any) -> Any:
    """DISCO-10M lists an artist id per artist: the first one."""
    if column is None or not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return column
    some = pc.fill_null(pc.greater(pc.list_value_length(column), 0), False)
    return pc.list_element(pc.if_else(some, column, pa.scalar(None, column.type)), 0)


def scores_column(table: pa.Table) -> Any:
    """DISCO-10M's similarity_* numbers of each row as a JSON object (null when it has none)."""
    pieces = []
    for name in table.column_names:
        column = table.column(name)
        if name.startswith("similarity_") and (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            finite = pc.is_finite(column) if pa.types.is_floating(column.type) else pc.is_valid(column)
            text = pc.if_else(pc.fill_null(finite, False), column.cast(pa.string()), pa.scalar(None, pa.string()))
            pieces.append(pc.binary_join_element_wise(json.dumps(name) + ": ", text, ""))
    if not pieces:
        return pa.nulls(table.num_rows, pa.string())
    joined = pc.binary_join_element_wise(*pieces, ", ", null_handling="skip")
    wrapped = pc.binary_join_element_wise("{", joined, "}", "")
    return pc.if_else(pc.equal(joined, ""), pa.scalar(None, pa.string()), wrapped)


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
