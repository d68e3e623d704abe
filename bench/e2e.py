"""End-to-end throughput of `discomv run` (every stage, ingest → shards, on Ray; streaming, and stage
after stage) against the same stages run one video at a time in a plain Python loop in one process,
same corpus, same run.

    python bench/e2e.py [--videos 4] [--fast] [--work DIR]

The corpus is the offline demo's (pipeline/tools/demo.py): synthetic music videos of each kind (moving,
looped still, slideshow, voice), 20 s each, plus its broken entries (truncated, audio only, video
only, an HTML page, a 404), listed in a DISCO-10M-style Parquet and served from 127.0.0.1. Settings
are the demo's (DEMO_SETTINGS, real Demucs/EnCodec/Hiera architectures with random weights);
`--fast` swaps in the small test models (separate random_init=tiny8k, tokens model=encodec_32khz_test, features
model=hiera_test_16x224).

- pipeline: `python -m pipeline.tools.cli run -c CONFIG` in a fresh process (embedded Ray: start-up, actors,
  manifests, status table, all counted), streaming (the default) and with `--set run.executor=stages`;
- plain loop: a fresh process that builds every stage, calls setup() once each, then for each input
  row calls process([row]) stage after stage (per clip after the fan-out), no Ray, no manifests.

All three write their own media and shards; the shard samples must be the same keys, and the
per-stage status counts must agree, or this exits 1. Rates: candidate videos per wall second, and hours of
downloaded audio per wall hour. Each runner's busy CPU over its run (the whole machine, /proc/stat)
is printed beside it, with the ceiling the loop's sets: a loop keeping a fraction u of the cores
busy can be beaten by at most 1/u by any executor doing its work on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import CpuMeter, describe, record  # noqa: E402 - bench/ is the script's folder


def write_run_config(folder: Path, inputs: list[str], fast: bool) -> Path:
    """The demo's config (roots under `folder`), with the small models when `fast`."""
    import yaml

    from pipeline.tools.demo import SMALL_MODELS, write_config

    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(folder, inputs)
    if fast:
        config = yaml.safe_load(path.read_text())
        for section, values in SMALL_MODELS.items():
            config.setdefault(section, {}).update(values)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------- the plain loop (baseline)


def plain_loop(config_path: Path) -> dict[str, Any]:
    """Every stage built and set up once, then one input row at a time through process([row])."""
    from stages import STAGES, load_config

    cfg = load_config(config_path)
    stages = {name: cls(cfg.stage(name), cfg.run) for name, cls in STAGES.items()}
    for stage in stages.values():
        stage.preflight()
        stage.setup()
    names = list(stages)
    fan_out = next(i for i, name in enumerate(names) if stages[name].fans_out)
    counts: Counter = Counter()
    audio_s = 0.0
    for source_row in stages[names[0]].source_rows():
        row = {"key": source_row["key"]}
        video = run_chain([stages[n] for n in names[: fan_out + 1]], source_row, row, counts)
        audio_s += (row.get("media_duration_s") or 0.0) if counts_ok(video, "download") else 0.0
        for clip in video.get(names[fan_out], []):
            clip_row = {**row, **clip.metrics, "key": clip.key,
                        "upstream_weights": dict(row.get("upstream_weights", {}))}
            run_chain([stages[n] for n in names[fan_out + 1:]], dict(clip_row), clip_row, counts)
        print(f"loop: {row['key']} done ({len(video.get(names[fan_out], []))} clips)", file=sys.stderr, flush=True)
    return {"statuses": {f"{stage}:{status}": n for (stage, status), n in sorted(counts.items())}, "audio_s": audio_s}


def counts_ok(results: dict[str, list[Any]], stage: str) -> bool:
    return any(r.status == "ok" for r in results.get(stage, []))


def run_chain(stages: list[Any], first_input: dict[str, Any], row: dict[str, Any], counts: Counter) -> dict[str, list[Any]]:
    """Feed `row` through `stages` in order while each says ok; every stage's own columns are merged
    into `row` for the next (the runner's upstream chain). Returns each stage's results."""
    from pipeline.manifest import COMMON_NAMES
    from pipeline.stage import Result

    results: dict[str, list[Any]] = {}
    for i, stage in enumerate(stages):
        given = first_input if i == 0 else {k: v for k, v in row.items()}
        try:
            out = stage.process([given])
        except Exception as e:  # the runner records a raising row as failed; so does the loop
            out = [Result.failed(row["key"], f"error: {type(e).__name__}: {e}")]
        results[stage.name] = out
        counts.update((stage.name, r.status) for r in out)
        ok = [r for r in out if r.status == "ok"]
        if not ok or stage.fans_out:
            break
        row.update({k: v for k, v in ok[0].metrics.items() if k not in COMMON_NAMES})
        weights = ok[0].metrics.get("weights") or getattr(stage, "weights_stamp", "none")
        row.setdefault("upstream_weights", {})[stage.name] = weights
    return results


# ---------------------------------------------------------------- measuring both


def timed_process(cmd: list[str], env: dict[str, str]) -> tuple[float, CpuMeter]:
    """Wall seconds of `cmd`, and the machine's busy CPU over them."""
    with CpuMeter() as cpu:
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, check=False)
        seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[1:4])} … exited with {proc.returncode}")
    return seconds, cpu


def pipeline_outcome(config_path: Path) -> dict[str, Any]:
    from pipeline.manifest import ManifestStore
    from stages import STAGES, load_config

    cfg = load_config(config_path)
    store = ManifestStore(cfg.run.manifest_root)
    counts: Counter = Counter()
    for name in STAGES:
        table = store.latest(name)
        counts.update((name, s) for s in (table.column("status").to_pylist() if table is not None else []))
    downloads = store.latest_rows("download").values()
    audio_s = sum(r.get("media_duration_s") or 0.0 for r in downloads if r["status"] == "ok")
    return {"statuses": {f"{stage}:{status}": n for (stage, status), n in sorted(counts.items())}, "audio_s": audio_s}


def shard_keys(config_path: Path) -> tuple[set[str], list[str]]:
    """Sample keys in the shards, and verify()'s faults."""
    from pipeline.webds.index import read_shards
    from pipeline.webds.verify import verify
    from stages import load_config

    root = Path(load_config(config_path).run.shard_root)
    keys = {key for info in read_shards(root).values() for key in info.keys}
    return keys, verify(root).faults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=4, help="synthetic music videos (plus the demo's 5 broken entries)")
    parser.add_argument("--fast", action="store_true", help="small test models instead of the real architectures")
    parser.add_argument("--work", type=Path, default=None, help="keep corpus, media, manifests and shards here")
    parser.add_argument("--loop-config", type=Path, help=argparse.SUPPRESS)  # the baseline's own process
    parser.add_argument("--loop-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loop_config:
        args.loop_out.write_text(json.dumps(plain_loop(args.loop_config)))
        return 0
    return compare(args.videos, args.fast, args.work or Path(tempfile.mkdtemp(prefix="bench-e2e-")))


def compare(n_videos: int, fast: bool, work: Path) -> int:
    from pipeline.tools.demo import make_corpus, write_disco_parquet
    from pipeline.tools.localserver import LocalServer

    header = describe("at the start")
    entries = make_corpus(work / "source", n_videos)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded Ray, this machine
    env["HF_HUB_OFFLINE"] = "1"
    cli = [sys.executable, "-m", "pipeline.tools.cli", "run", "--no-progress", "-c"]
    runs = []
    with LocalServer(work / "source") as server:
        parquet = write_disco_parquet(work / "disco10m.parquet", server.url, entries)
        inputs = [f"disco10m={parquet}"]
        for label, folder, extra in (("`discomv run` (streaming: one Ray Data pipeline)", "stream", []),
                                     ("`discomv run`, run.executor=stages (stage after stage)", "stages",
                                      ["--set", "run.executor=stages"])):
            config = write_run_config(work / folder, inputs, fast)
            seconds, cpu = timed_process(cli + [str(config)] + extra, env)
            runs.append((label, seconds, cpu, pipeline_outcome(config), *shard_keys(config)))
        loop_config = write_run_config(work / "loop", inputs, fast)
        loop_out = work / "loop" / "outcome.json"
        loop_s, loop_cpu = timed_process([sys.executable, str(Path(__file__).resolve()), "--loop-config",
                                          str(loop_config), "--loop-out", str(loop_out)], env)
    runs.append(("plain loop, one video at a time, one process", loop_s, loop_cpu, json.loads(loop_out.read_text()),
                 *shard_keys(loop_config)))
    return report(len(entries), fast, header, runs)


def report(candidates: int, fast: bool, header: str, runs: list[tuple]) -> int:
    """runs: (label, seconds, CPU meter, outcome, shard keys, verify faults) for streaming, stage after
    stage, loop."""
    (_, stream_s, _, ours, keys, _), (_, stages_s, _, _, _, _), (_, loop_s, loop_cpu, _, _, _) = runs
    audio_h = ours["audio_s"] / 3600
    models = "test models (tiny8k / encodec_32khz_test / hiera_test_16x224)" if fast else "real architectures, random init"
    print(f"\n### end-to-end: {candidates} candidates ({candidates - 5} synthetic 20 s music videos + 5 broken), "
          f"{models}, demo settings\n")
    print("| runner | wall s | videos/s | audio-h per h | machine CPU over the run | shard samples |")
    print("|---|---:|---:|---:|---|---:|")
    for label, seconds, cpu, _, run_keys, _ in runs:
        print(f"| {label} | {seconds:.1f} | {candidates / seconds:.3f} | {audio_h * 3600 / seconds:.2f} | "
              f"{cpu.describe()} | {len(run_keys)} |")
    for label, _, _, outcome, _, _ in runs:
        print(f"per-stage statuses, {label}: {outcome['statuses']}")
    print(f"streaming / plain loop: {loop_s / stream_s:.2f}×; streaming / stage after stage: {stages_s / stream_s:.2f}×; "
          f"downloaded audio {ours['audio_s']:.0f} s\nmachine: {header}")
    print(loop_cpu.ceiling("the plain loop") + "; more than that needs work on other resources at once "
          "(GPU stages, downloads waiting on the network)")
    problems = []
    for label, _, _, outcome, run_keys, _ in runs[1:]:
        if run_keys != keys:
            problems.append(f"shard samples differ: streaming {len(keys)}, {label} {len(run_keys)}")
        if outcome["statuses"] != ours["statuses"]:
            problems.append(f"per-stage status counts differ from {label}")
        if abs(outcome["audio_s"] - ours["audio_s"]) > 1e-6:
            problems.append(f"downloaded audio differs: {outcome['audio_s']} vs {ours['audio_s']}")
    problems += [f"verify: {fault}" for run in runs for fault in run[5]]
    if not keys:
        problems.append("no shard samples: nothing measured end to end")
    if problems:
        print("MISMATCH: " + "; ".join(problems))
        return 1
    record("end-to-end", f"`discomv run` streaming: {candidates / stream_s:.3f} videos/s, {audio_h * 3600 / stream_s:.2f} "
           f"audio-h/h ({candidates} candidates → {len(keys)} shard samples in {stream_s:.0f} s; {models}); stage after "
           f"stage {stages_s:.0f} s (streaming at {stages_s / stream_s:.2f}× its speed)",
           f"plain loop, one video at a time: {candidates / loop_s:.3f} videos/s, {audio_h * 3600 / loop_s:.2f} audio-h/h "
           f"({loop_s:.0f} s)", loop_s / stream_s, "same shard samples and per-stage statuses in all three; "
           f"the loop kept {loop_cpu.fraction:.0%} of the cores busy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
