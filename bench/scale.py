"""Scale: the driver at DISCO-10M size. Generates a DISCO-10M-shaped Parquet (every published column,
the 512-float `audio_embedding_spotify` included; written row group by row group), then times, each
in a fresh driver process with its peak RSS (ru_maxrss of the driver alone, not its Ray workers):
`ingest` (the ingest stage, end to end), `plan` (planning download: pending rows built window by
window, or, for the previous code, `input_rows` + `done_keys`), `status` and `audit` (with --out).

Download's manifest is synthesised as a run leaves it. At --rows 1000000 both codes get the same
download rows as 16-row parts (download flushes every 16 rows; `--download-parts` of them, default
20,000 = 320,000 candidates downloaded: a fraction of the ~62,500 a full run leaves, said in the
output); this code then merges them as its `append` would have while they were written (timed
apart). At 15.3M rows (this code only: the previous one dies at 12 GB) download holds 80% of the
candidates (a run stopped there), in the merged layout `append` leaves (<= 15 parts per level), so
planning download builds the other 3.06M rows. Ingest is the stage as `discomv run` runs it
(`run_stage`: in the driver, a table at a time).

    python bench/scale.py [--rows 1000000] [--baseline /work/baseline] [--out build/scale]
    python bench/scale.py --rows 15300000 --no-baseline

Previous code: run from --baseline with PYTHONPATH set to it, same phases, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
DOWNLOADED = 0.8  # at 15.3M: the share of candidates download's manifest holds
PHASES = ("ingest", "merge", "plan", "status", "audit")  # + "synth" (untimed): download manifest
DISCO_TEXT = ["video_title_youtube", "track_name_spotify", "preview_url_spotify", "video_thumbnail_url_youtube",
              "search_query_youtube", "video_description_youtube", "track_id_spotify", "album_id_spotify",
              "primary_artist_name_spotify"]
SIMILARITY = ["similarity_duration", "similarity_query_video_title", "similarity_query_description", "similarity_audio"]


def video_id(i: int) -> str:
    return f"v{i:010d}"


def numbered(prefix: str, numbers, width: int = 0):
    """prefix + each number (zero-padded to `width`) as an Arrow string column, without Python strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.cast(pa.array(numbers), pa.string())
    if width:
        text = pc.utf8_lpad(text, width, "0")
    return pc.binary_join_element_wise(prefix, text, "")


def generate(path: Path, rows: int, group: int = 50_000) -> None:
    """DISCO-10M's columns (as published on its dataset card), one row group at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    block = rng.standard_normal((group + 7, 512), dtype=np.float32)  # random (incompressible), made once
    tails = pa.array([" " + "x" * k for k in range(40)])
    writer = None
    for start in range(0, rows, group):
        n = min(group, rows - start)
        index = np.arange(start, start + n)
        ids = numbered("v", index, 10)
        cols = {
            "video_url_youtube": pc.binary_join_element_wise("https://www.youtube.com/watch?v=", ids, ""),
            "video_duration_youtube_sec": rng.uniform(60, 600, n),
            "video_view_count_youtube": rng.integers(0, 10**7, n).astype(np.float64),
            "artist_id_spotify": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)),
                                                          numbered("artist", index % 50_000)),
            "track_duration_spotify_ms": rng.integers(60_000, 600_000, n),
            "explicit_content_spotify": rng.random(n) < 0.1,
        }
        for c in DISCO_TEXT:  # f"{c[:12]} {i} " + "x" * (i % 40)
            cols[c] = pc.binary_join_element_wise(numbered(f"{c[:12]} ", index), tails.take(index % 40), "")
        for c in SIMILARITY:
            cols[c] = rng.random(n).astype(np.float32)
        emb = block[start // group % 7:][:n]
        cols["audio_embedding_spotify"] = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * 512, 512, dtype=np.int32)), pa.array(emb.reshape(-1)))
        table = pa.table(cols)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def download_rows(start: int, n: int, version: str = "", phash: str = ""):
    """Download's manifest rows of candidates start..start+n: every fifth failed, the rest ok."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.manifest import full_schema
    from stages import STAGES

    schema = full_schema(STAGES["download"].schema)
    index = np.arange(start, start + n)
    ok = pa.array(index % 5 != 0)
    now = dt.datetime.now(dt.timezone.utc)
    cols = {}
    for f in schema:
        if f.name == "key":
            cols[f.name] = numbered("yt_v", index, 10)
        elif f.name == "status":
            cols[f.name] = pa.array(np.where(index % 5 != 0, "ok", "failed"))
        elif f.name == "reason":
            cols[f.name] = pc.if_else(ok, pa.scalar(None, pa.string()), "not_found: HTTP 404")
        elif f.name in ("stage_version", "params_hash"):
            cols[f.name] = pa.repeat(version if f.name == "stage_version" else phash, n)
        elif f.name == "finished_at":
            cols[f.name] = pa.repeat(pa.scalar(now, f.type), n)
        elif pa.types.is_string(f.type):
            cols[f.name] = numbered(f"{f.name}-", index)
        elif pa.types.is_floating(f.type):
            cols[f.name] = (index % 600).astype(np.float64)
        elif pa.types.is_integer(f.type):
            cols[f.name] = index
        else:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols, schema=schema)


def write_download(manifests: Path, parts: int, rows: int, merged_layout: bool, cfg) -> None:
    """Download's manifest: `parts` flat parts of 16 rows, or (merged_layout) `rows` rows in the
    part sizes the merge policy leaves (base-16 digits of rows/16)."""
    import pyarrow.parquet as pq

    from pipeline.runner import stage_params_hash
    from stages import STAGES

    stage = STAGES["download"](cfg.stage("download"), cfg.run)
    made_by = (stage.version, stage_params_hash(stage))  # done rows of this code's download
    d = manifests / "download"
    d.mkdir(parents=True, exist_ok=True)
    if not merged_layout:
        for p in range(parts):
            pq.write_table(download_rows(p * 16, 16, *made_by), d / f"part-{p:020d}-00000000.parquet")
        return
    from pipeline.manifest import MERGE_FANIN

    sizes, units, level = [], rows // 16, 0
    while units:
        sizes = [(level, 16 * MERGE_FANIN**level)] * (units % MERGE_FANIN) + sizes
        units //= MERGE_FANIN
        level += 1
    start = 0
    for i, (lvl, size) in enumerate(sizes):
        path = d / f"part-{i:020d}-00000000{f'-L{lvl}' if lvl else ''}.parquet"
        with pq.ParquetWriter(path, download_rows(0, 1).schema) as w:
            for s in range(start, start + size, 200_000):
                w.write_table(download_rows(s, min(200_000, start + size - s), *made_by))
        start += size


# ---------------------------------------------------------------- one phase, in its own driver


def phase(name: str, data: Path, manifests: Path, rows: int = 0, parts: int = 0) -> None:
    sets = ["--set", f"run.manifest_root={manifests}", "--set", f"ingest.inputs=[{data}]"]
    try:
        from stages import load_config

        cfg = load_config(None, [s for s in sets if s != "--set"])
    except ImportError:  # the previous code's loader
        from pipeline.config import load_config

        cfg = load_config(None, [s for s in sets if s != "--set"])
    from pipeline.manifest import ManifestStore

    store = ManifestStore(manifests)
    started = time.perf_counter()
    note = ""
    if name == "synth":
        write_download(manifests, parts, int(rows * DOWNLOADED), merged_layout=rows > 0, cfg=cfg)
        note = f"{len(store.parts('download'))} parts"
    elif name == "ingest":
        from pipeline.runner import run_stage

        note = run_stage("ingest", cfg, progress=False).line()
    elif name == "merge":
        before = len(store.parts("download"))
        store.merge("download")
        note = f"download parts {before} -> {len(store.parts('download'))}"
    elif name == "plan":
        from pipeline import runner
        from stages import STAGES

        stage = STAGES["download"](cfg.stage("download"), cfg.run)
        phash = runner.stage_params_hash(stage)
        if hasattr(runner, "plan_stage"):
            plan = runner.plan_stage(stage, store, STAGES, phash)
            built = sum(len(w) for w in plan.windows())
            note = f"{plan.pending} pending of {plan.total} ({built} rows built, a window at a time)"
        else:
            rows = runner.input_rows(stage, store)
            done = store.done_keys("download", stage.version, phash)
            pending = [r for r in rows if r["key"] not in done]
            note = f"{len(pending)} pending of {len(rows)}"
    elif name == "status":
        try:
            from pipeline.tools.summary import print_status
        except ImportError:
            from pipeline.summary import print_status
        print_status(cfg)
    elif name == "audit":
        try:
            from pipeline.tools import audit
        except ImportError:
            from pipeline import audit
        audit.print_audit(store, manifests.parent / "audit.parquet")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps({"phase": name, "seconds": seconds, "peak_gb": peak, "note": note}), flush=True)


def run_phase(code: Path, name: str, data: Path, manifests: Path, cap_gb: float, timeout_s: float,
              extra: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(HERE), "--phase", name, "--data", str(data), "--manifests", str(manifests), *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, killed = [0.0], [""]

    def watch() -> None:
        while proc.poll() is None:
            try:
                rss = int(next(ln for ln in open(f"/proc/{proc.pid}/status") if ln.startswith("VmRSS")).split()[1])
            except (OSError, StopIteration):
                break
            peak[0] = max(peak[0], rss / 2**20)
            if peak[0] > cap_gb or time.perf_counter() - started > timeout_s:
                killed[0] = f"stopped at {peak[0]:.1f} GB" if peak[0] > cap_gb else f"stopped after {timeout_s:.0f} s"
                proc.kill()
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    out, _ = proc.communicate()
    result = next((json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if result is None:
        tail = " | ".join(out.strip().splitlines()[-3:])[-300:]
        return {"phase": name, "seconds": time.perf_counter() - started, "peak_gb": peak[0],
                "note": killed[0] or f"FAILED rc={proc.returncode}: {tail}"}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--baseline", default="/work/baseline", help="checkout of the previous code")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--download-parts", type=int, default=20_000, help="16-row download parts (1M run)")
    ap.add_argument("--out", default=str(ROOT / "build" / "scale"))
    ap.add_argument("--cap-gb", type=float, default=8.0, help="stop a driver past this RSS (shared machine)")
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--keep", action="store_true", help="keep the generated Parquet")
    ap.add_argument("--reuse", action="store_true", help="use the Parquet a --keep run left in --out")
    ap.add_argument("--codes", default="this,previous", help="which codes to measure (this,previous)")
    ap.add_argument("--phase", choices=(*PHASES, "synth"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--manifests", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        full_rows = args.rows if args.rows > 2_000_000 else 0
        phase(args.phase, Path(args.data), Path(args.manifests), full_rows, args.download_parts)
        return 0

    sys.path.insert(0, str(ROOT))
    out = Path(args.out).resolve()
    data = out / "disco10m.parquet"
    wanted = args.codes.split(",")
    for label in wanted:
        shutil.rmtree(out / label, ignore_errors=True)
    t0 = time.perf_counter()
    reused = args.reuse and data.exists()
    if not reused:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        generate(data, args.rows)
    print(f"{'reused' if reused else 'generated'} {data} ({args.rows:,} rows, {data.stat().st_size / 2**30:.1f} GiB) in "
          f"{time.perf_counter() - t0:.0f}s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    full = args.rows > 2_000_000
    codes = {"this": ROOT} if args.no_baseline or full else {"this": ROOT, "previous": Path(args.baseline)}
    codes = {label: code for label, code in codes.items() if label in wanted}
    results: dict[str, dict[str, dict]] = {}
    for label, code in codes.items():
        manifests = out / label / "manifests"
        results[label] = {}
        for name in PHASES:
            if name == "merge" and label != "this":
                continue
            results[label][name] = run_phase(code, name, data, manifests, args.cap_gb, args.timeout_s)
            print(f"  {label:8s} {name:7s} {json.dumps(results[label][name])}", flush=True)
            if name == "ingest":
                if label != "this" and not list((manifests / "ingest").glob("part-*")) and (out / "this").is_dir():
                    shutil.copytree(out / "this" / "manifests" / "ingest", manifests / "ingest")
                    results[label][name]["note"] += " (its ingest manifest: this code's, to go on)"
                synth = run_phase(code, "synth", data, manifests, args.cap_gb, args.timeout_s,
                                  ("--rows", str(args.rows), "--download-parts", str(args.download_parts)))
                print(f"  {label:8s} synthesised download manifest in {synth['seconds']:.0f}s ({synth['note']})",
                      flush=True)
    if not args.keep:
        data.unlink()
    print(f"\nbench/scale.py: {args.rows:,} candidates; download manifest: "
          + (f"{DOWNLOADED:.0%} of the candidates, merged layout" if full else f"{args.download_parts:,} parts x 16 rows "
             f"({args.download_parts * 16:,} downloaded; a full run leaves {args.rows // 16:,})")
          + f"; load average at the end {os.getloadavg()[0]:.1f}")
    labels = list(results)
    print(f"{'phase':8s}" + "".join(f"{lab + ' s':>14s}{lab + ' GB':>14s}" for lab in labels) + "  notes")
    for name in PHASES:
        cells, notes = "", []
        for lab in labels:
            r = results[lab].get(name)
            cells += f"{r['seconds']:14.1f}{r['peak_gb']:14.2f}" if r else f"{'-':>14s}{'-':>14s}"
            if r and r.get("note"):
                notes.append(f"{lab}: {r['note']}")
        print(f"{name:8s}{cells}  {'; '.join(notes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
