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
        if not self.config.inputs:
            raise InputError("ingest.inputs is empty: pass --set ingest.inputs=[path,...] or a config file")
        read: list[Row] = []
        for spec in self.config.inputs:
            read.extend(self._read(*_source_and_path(spec)))
        self._resolve(read)
        by_key: dict[str, Row] = {}
        for row in read:
            first = by_key.setdefault(row["key"], row)
            if first is not row:
                first["also_in"].append(f"{row['source']}:{row['input_file']}:{row['input_row']}")
        rows = list(by_key.values())
        if self.config.sample is not None:
            rows = [r for r in rows if _fraction(r["key"]) < self.config.sample]
        if self.config.limit is not None:
            rows = rows[: self.config.limit]
        return rows

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

    def _read(self, source: str, path: Path) -> list[Row]:
        try:
            files = yt8m.tfrecord_files(path)
            if files is None:
                return read_input(path, source, self.config.default_license)
            for file in files:
                if not file.is_file():
                    raise InputError(f"ingest input {file}: no such file")
            vocabulary = yt8m.find_vocabulary(files, self.config.yt8m_vocabulary)
            wanted = yt8m.select_labels(yt8m.read_vocabulary(vocabulary), self.config.yt8m_labels, vocabulary)
            rows = []
            for video in yt8m.iter_videos(files, wanted):
                rec = {"id": video.pseudo_id}
                row = _candidate(rec, video.record, {"youtube_id": "id"}, source, Path(video.file), self.config.default_license)
                rows.append({**row, "yt8m_labels": video.labels})
            log.info("ingest %s: %d videos of %d files with labels %s", path, len(rows), len(files), sorted(set(wanted.values())))
            return rows
        except yt8m.SourceError as e:
            raise InputError(str(e)) from e

    def _resolve(self, rows: list[Row]) -> None:
        """YouTube-8M pseudo ids → YouTube ids (cached, rate-limited lookups); an id that cannot be
        resolved becomes a failed row with its reason."""
        pending = [r for r in rows if r["yt8m_id"] and not r["key"]]
        if not pending:
            return
        c = self.config
        refusal = yt8m.check_service(c.yt8m_lookup_url, c.yt8m_allow_private_hosts)
        if refusal or "{id}" not in c.yt8m_video_url:
            raise ConfigError(refusal or f"ingest.yt8m_video_url: {c.yt8m_video_url!r} has no {{id}}")
        settings = yt8m.LookupSettings(
            c.yt8m_lookup_url, c.yt8m_lookup_concurrency, c.yt8m_lookup_rate, c.yt8m_lookup_retries,
            c.yt8m_lookup_backoff_s, batch=c.yt8m_lookup_batch,
        )
        answers = yt8m.resolve_ids([r["yt8m_id"] for r in pending], settings, self.run.manifest_root, self.map_batches)
        for row in pending:
            answer = answers[row["yt8m_id"]]
            if vid := answer["youtube_id"]:
                row.update(key=f"yt_{vid}", url=c.yt8m_video_url.format(id=vid), youtube_id=vid)
            else:
                raw = f"{row['source']}:{row['input_file']}:{row['input_row']}:{row['yt8m_id']}"
                row.update(key="bad_" + hashlib.sha1(raw.encode()).hexdigest()[:16], problem=answer["reason"])


# ---------------------------------------------------------------- reading inputs


def _source_and_path(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return name, Path(path)
    path = Path(spec)
    if "tfrecord" in path.name or path.is_dir():
        return "yt8m", path
    return ("disco10m" if path.suffix == ".parquet" else path.stem), path


def read_input(path: Path, source: str, default_license: str) -> list[Row]:
    if not path.is_file():
        raise InputError(f"ingest input {path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"ingest input {path}: empty file")
    records = _read_parquet(path) if path.suffix == ".parquet" else _read_text_table(path)
    if not records:
        raise InputError(f"ingest input {path}: no rows")
    columns = _pick_columns(path, list(records[0]))
    return [_candidate(rec, i, columns, source, path, default_license) for i, rec in enumerate(records)]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    """Only the columns ingest records, read row group by row group: DISCO-10M's 512-float
    `audio_embedding_spotify` (and any other column we never use) is never read."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        wanted = {c for candidates in COLUMNS.values() for c in candidates}
        columns = [c for c in names if (c in wanted or c.startswith("similarity_")) and "embedding" not in c]
        if not columns:
            columns = [c for c in names if "embedding" not in c]  # let _pick_columns name what is missing
        return [row for batch in parquet.iter_batches(columns=columns, batch_size=65_536) for row in batch.to_pylist()]
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
        col = columns.get(field_name)
        value = rec.get(col) if col else None
        return value.strip() if isinstance(value, str) else value

    raw = get("url") or get("youtube_id") or ""
    pseudo = str(raw).strip() if yt8m.PSEUDO_ID.match(str(raw).strip()) else None  # resolved in _resolve
    key, url, youtube_id, problem = ("", None, None, None) if pseudo else canonical(str(raw))
    if problem:
        key = "bad_" + hashlib.sha1(f"{source}:{path}:{index}:{raw}".encode()).hexdigest()[:16]
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
        "yt8m_id": pseudo,
        "yt8m_labels": None,
    }


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
