"""ingest: DISCO-10M Parquet, YouTube-8M TFRecords or id lists, URL lists → one candidates table.

Keys are canonical: `yt_<11-char id>` for anything on YouTube (so the same video from two
sources is one candidate), `url_<sha1>` for other http(s) URLs, `bad_<sha1>` for rows rejected
with a reason. The first source to list a key keeps it; the others are recorded in `also_in`.
YouTube-8M's 4-character pseudo ids are resolved to YouTube ids first (pipeline/sources/yt8m.py),
so they dedupe like any other YouTube id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.options import ConfigError, option
from pipeline.sources import yt8m
from pipeline.sources.inputs import (
    InputError,
    SourceInput,
    candidate,
    canonical,  # noqa: F401  (ingest's public name, as before the split)
    fraction,
    key_of,
    open_input,
    pick_columns,
    pseudo_key,
    raw_value,
    source_and_path,
    take,
)
from pipeline.stage import Result, Row, SourceStage

log = logging.getLogger("discomv")


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
        self._inputs: list[SourceInput] = []
        start = 0
        for spec in self.config.inputs:
            source_input = self._open(*source_and_path(spec), start)
            self._inputs.append(source_input)
            for batch in source_input.batches(keys_only=True):
                keys = []
                for i, rec in enumerate(batch):
                    ord_, raw = start + i, raw_value(rec, source_input.columns)
                    if yt8m.PSEUDO_ID.match(str(raw).strip()):
                        pseudo.append((ord_, str(raw).strip(), source_input.source, source_input.where(rec, ord_)))
                        keys.append(None)
                        taken = take("yt8m:" + str(raw).strip(), seen, None) if limit is not None else False
                    else:
                        keys.append(key_of(raw, source_input.source, source_input.where(rec, ord_))[0])
                        taken = take(keys[-1], seen, sample) if limit is not None else False
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

    def _open(self, source: str, path: Path, start: int) -> SourceInput:
        try:
            files = yt8m.tfrecord_files(path)
            if files is None:
                names, _ = open_input(path)
                return SourceInput(source, path, pick_columns(path, names), start)
            for file in files:
                if not file.is_file():
                    raise InputError(f"ingest input {file}: no such file")
            vocabulary = yt8m.find_vocabulary(files, self.config.yt8m_vocabulary)
            wanted = yt8m.select_labels(yt8m.read_vocabulary(vocabulary), self.config.yt8m_labels, vocabulary)
            log.info("ingest %s: %d files, videos with labels %s", path, len(files), sorted(set(wanted.values())))
            return SourceInput(source, path, {"youtube_id": "id"}, start, tfrecords=files, labels=wanted)
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
        keys = [pseudo_key(self._answers[p], p, source, where) for _, p, source, where in pseudo]
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
            keep = [fraction(k) < self.config.sample for k in kept.column("key").to_pylist()]
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

    def _row(self, source_input: SourceInput, rec: dict[str, Any], index: int) -> Row:
        row = candidate(rec, source_input.where(rec, source_input.start + index), source_input.columns, source_input.source,
                         self.config.default_license)
        if pseudo := row["yt8m_id"]:
            answer = self._answers[pseudo]
            if vid := answer["youtube_id"]:
                row.update(key=f"yt_{vid}", url=self.config.yt8m_video_url.format(id=vid), youtube_id=vid)
            else:
                row.update(key=pseudo_key(answer, pseudo, row["source"], (row["input_file"], row["input_row"])),
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
