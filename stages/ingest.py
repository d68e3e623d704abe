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
    candidates,
    canonical,  # noqa: F401  (ingest's public name, as before the split)
    canonical_columns,
    fraction,
    open_input,
    pick_columns,
    pseudo_key,
    raw_column,
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
        chunks, pseudo = [], []  # pseudo: (ord, pseudo id, source, where) of rows keyed after the lookups
        self._inputs: list[SourceInput] = []
        seen: set[str] = set()  # only with a limit: at most `limit` keys
        start = 0
        for spec in self.config.inputs:
            source_input = self._open(*source_and_path(spec), start)
            self._inputs.append(source_input)
            for table in source_input.tables(keys_only=True):
                ords = pa.array(range(start, start + table.num_rows), pa.int64())
                where = source_input.where(table, ords)
                keys = canonical_columns(raw_column(table, source_input.columns), source_input.source, *where)
                cut = self._limit_cut(keys, seen)
                keys, ords = {k: v.slice(0, cut) for k, v in keys.items()}, ords.slice(0, cut)
                pseudo += self._pseudo(keys, ords, source_input.source, [w.slice(0, cut) for w in where])
                chunks.append(pa.table({"key": keys["key"], "ord": ords}))
                start += cut
                if self._limit_reached(seen):
                    break
            source_input.rows = start - source_input.start
            if self._limit_reached(seen):
                break
        empty = pa.table({"key": pa.array([], pa.string()), "ord": pa.array([], pa.int64())})
        candidates = pa.concat_tables(chunks) if chunks else empty
        return self._dedupe(candidates, self._resolve(pseudo), {o: where for o, _, _, where in pseudo})

    def _limit_reached(self, seen: set[str]) -> bool:
        return self.config.limit is not None and len(seen) >= self.config.limit

    def _limit_cut(self, keys: dict[str, Any], seen: set[str]) -> int:
        """How many rows of a batch to read: all, or (with a limit) up to the row that completes it."""
        if self.config.limit is None:
            return len(keys["key"])
        for i, (key, pseudo) in enumerate(zip(keys["key"].to_pylist(), keys["yt8m_id"].to_pylist(), strict=True)):
            if take(key or "yt8m:" + pseudo, seen, None if pseudo else self.config.sample) and self._limit_reached(seen):
                return i + 1
        return len(keys["key"])

    @staticmethod
    def _pseudo(keys: dict[str, Any], ords: pa.Array, source: str, where: list[Any]) -> list[tuple]:
        """(ord, pseudo id, source, where) of the batch's YouTube-8M pseudo ids."""
        import numpy as np

        index = np.flatnonzero(keys["yt8m_id"].is_valid().to_numpy(zero_copy_only=False))
        if not len(index):
            return []
        files, rows = (w.take(index).to_pylist() for w in where)
        return [(o, p, source, (f, r)) for o, p, f, r in zip(
            ords.take(index).to_pylist(), keys["yt8m_id"].take(index).to_pylist(), files, rows, strict=True)]

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
        for table in self.source_tables(ords, size):
            yield table.to_pylist()

    def source_tables(self, ords: Any, size: int) -> Iterator[pa.Table]:
        """Pass 2: the candidate rows of `ords` (sorted, from `source_keys`) as Arrow tables of about
        `size` rows, read back with only the columns ingest records (never an embedding)."""
        import numpy as np

        ords = np.asarray(ords, dtype=np.int64)
        window: list[pa.Table] = []
        for source_input in self._inputs:
            lo, hi = np.searchsorted(ords, [source_input.start, source_input.start + source_input.rows])
            if lo == hi:
                continue
            wanted = np.zeros(source_input.rows, dtype=bool)  # a bit per input row, not a set of 15M ints
            wanted[ords[lo:hi] - source_input.start] = True
            last, index = int(ords[hi - 1]) - source_input.start, 0
            for table in source_input.tables():
                rows = np.flatnonzero(wanted[index:index + table.num_rows])
                if len(rows):
                    found = candidates(table.take(rows), source_input, source_input.start + index + rows,
                                       self.config.default_license)
                    window.append(self._resolved(found))
                    if sum(t.num_rows for t in window) >= size:
                        yield pa.concat_tables(window)
                        window = []
                index += table.num_rows
                if index > last:
                    break
        if window:
            yield pa.concat_tables(window)

    def _resolved(self, table: pa.Table) -> pa.Table:
        """Pseudo ids given their YouTube id's key and URL (or a `bad_` key and the lookup's reason),
        duplicates their `also_in`."""
        if table.column("yt8m_id").null_count < table.num_rows:
            pseudo = table.column("yt8m_id").to_pylist()
            cols = {name: table.column(name).to_pylist() for name in ("key", "url", "youtube_id", "problem")}
            where = zip(table.column("input_file").to_pylist(), table.column("input_row").to_pylist(), strict=True)
            for i, (p, spot) in enumerate(zip(pseudo, where, strict=True)):
                if p is None:
                    continue
                answer = self._answers[p]
                if vid := answer["youtube_id"]:
                    cols["key"][i], cols["url"][i], cols["youtube_id"][i] = \
                        f"yt_{vid}", self.config.yt8m_video_url.format(id=vid), vid
                else:
                    cols["key"][i], cols["problem"][i] = pseudo_key(answer, p, table.column("source")[i].as_py(),
                                                                    spot), answer["reason"]
            for name, values in cols.items():
                table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
        if self._also_in:
            keys = table.column("key").to_pylist()
            also_in = pa.array([self._also_in.get(k, []) for k in keys], pa.list_(pa.string()))
            table = table.set_column(table.schema.get_field_index("also_in"), "also_in", also_in)
        return table

    def process_table(self, table: pa.Table) -> pa.Table:
        """Every candidate's outcome, a table at a time: failed with the input's problem, dropped when
        listed longer than `max_duration_s`, else ok. Columns: key, status, reason, the schema's."""
        import pyarrow.compute as pc

        problem = table.column("problem")
        status = pc.if_else(problem.is_valid(), "failed", "ok")
        reason = problem
        if (max_s := self.config.max_duration_s) is not None:
            too_long = pc.and_(pc.fill_null(pc.greater(table.column("duration_s"), max_s), False), problem.is_null())
            status = pc.if_else(too_long, "dropped", status)
            listed = pc.if_else(too_long, table.column("duration_s"), None).to_pylist()
            reason = pc.if_else(too_long, pa.array(
                [None if d is None else f"too_long: listed {d:.0f}s > {max_s:.0f}s" for d in listed], pa.string()),
                problem)
        metrics = table.select(self.schema.names)
        return pa.table({"key": table.column("key"), "status": status, "reason": pc.fill_null(reason, ""),
                         **{n: metrics.column(n) for n in metrics.column_names}})

    def process(self, rows: list[Row]) -> list[Result]:
        outcomes = self.process_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA)).to_pylist()
        return [Result(o.pop("key"), o.pop("status"), o.pop("reason") or "", o) for o in outcomes]


# A candidate row as source_tables makes it: the key, the input's problem (failed when set), the schema.
ROW_SCHEMA = pa.schema([("key", pa.string()), ("problem", pa.string()), *Ingest.schema])
