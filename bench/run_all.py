"""`make bench`: run every benchmark one after another and write ONE Markdown table of their results
(stage | this project | baseline (same run) | ratio | machine) into README.md between the
`<!-- bench:begin -->` / `<!-- bench:end -->` markers, and print it.

    python bench/run_all.py [--only filter,shards] [--quick] [--readme README.md | --no-readme]

Each script reports its row(s) through `machine.record()` (a JSON line appended to $BENCH_RESULTS,
a fresh file per script here). A script that exits non-zero, or records nothing, gets a row saying
so with its exit code, and this exits non-zero at the end. `--quick` passes small sizes through the
options each script already has (a smoke run; rows say `quick`) and leaves README.md alone unless
`--readme` is given. With `--only`, rows of the scripts not run are kept from the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
NOT_BENCHMARKS = {"machine", "run_all", "gpu"}  # gpu.py: every GPU path at once (make bench-gpu)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
HEADER = ("| stage | this project | baseline (same run) | ratio | machine |", "|---|---|---|---|---|")
SCRIPT_IN_CELL = re.compile(r"bench/(\w+)\.py")

# Small sizes for a smoke run, through each script's own options (argv, env).
QUICK: dict[str, tuple[list[str], dict[str, str]]] = {
    "beats": (["--clips", "1", "--size", "320x240"], {}),
    "e2e": (["--fast", "--videos", "4"], {}),
    "features": (["--tokens-batches", "1,2", "--features-batches", "1,2", "--features-model", "hiera_test_16x224"], {}),
    "filter": (["--videos", "8", "--duration", "10"], {}),
    "load": (["--candidates", "40"], {}),
    "separate": (["--files", "2", "--model", "tiny"], {}),
    "shards": ([], {"BENCH_CLIPS": "60"}),
    "train": (["--steps", "2", "--warmup", "1", "--configs", "tiny"], {}),
}


@dataclass
class ScriptRun:
    name: str
    exit_code: int
    rows: list[dict] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    seconds: float = 0.0


def discover(only: list[str] | None = None) -> list[str]:
    names = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in NOT_BENCHMARKS)
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"--only: no benchmark {', '.join(unknown)}; there are {', '.join(names)}")
        names = [n for n in names if n in only]
    return names


def run_script(name: str, quick: bool) -> ScriptRun:
    """Run bench/<name>.py, echoing its output, and collect the rows it recorded."""
    extra_args, extra_env = QUICK.get(name, ([], {})) if quick else ([], {})
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        results = Path(tmp) / "results.jsonl"
        env = {**os.environ, **extra_env, "BENCH_RESULTS": str(results),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, str(BENCH / f"{name}.py"), *extra_args]
        print(f"== bench/{name}.py {' '.join(extra_args)}".rstrip(), flush=True)
        started = time.perf_counter()
        tail: deque[str] = deque(maxlen=20)
        with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                tail.append(line.rstrip("\n"))
        rows = read_rows(results)
    return ScriptRun(name, proc.returncode, rows, list(tail), time.perf_counter() - started)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def format_ratio(ratio: float | None, note: str) -> str:
    text = "—" if ratio is None else f"{ratio:.2f}×"
    return f"{text}; {note}" if note else text


def table_rows(run: ScriptRun, quick: bool, machine: str) -> list[str]:
    """Markdown rows for one script: its recorded rows, plus one saying it failed when it did."""
    suffix = ", quick" if quick else ""
    lines = [
        f"| {cell(row['stage'])} (`bench/{run.name}.py`{suffix}) | {cell(row['ours'])} | {cell(row['baseline'])} | "
        f"{cell(format_ratio(row.get('ratio'), row.get('note', '')))} | {cell(row['machine'])} |"
        for row in run.rows
    ]
    if run.exit_code != 0 or not run.rows:
        what = (f"FAILED: exit code {run.exit_code}" if run.exit_code != 0
                else "no result recorded (exit code 0)")
        last = next((line for line in reversed(run.tail) if line.strip()), "")
        detail = f"; last output: `{cell(last)[-160:]}`" if last else ""
        lines.append(f"| {run.name} (`bench/{run.name}.py`{suffix}) | {what}{cell(detail)} | — | — | {cell(machine)} |")
    return lines


def merge_table(existing: list[str], runs: list[ScriptRun], new_rows: list[str]) -> list[str]:
    """Our header, then the rows of scripts not run this time (when the existing table is in our
    format), then this run's rows, all sorted by script name so the table order is stable."""
    ran = {run.name for run in runs}
    kept = []
    if tuple(existing[:2]) == HEADER:
        for line in existing[2:]:
            match = SCRIPT_IN_CELL.search(line.split("|")[1] if line.count("|") > 1 else "")
            if line.startswith("|") and match and match.group(1) not in ran:
                kept.append(line)
    rows = sorted(kept + new_rows, key=lambda line: SCRIPT_IN_CELL.search(line).group(1))  # type: ignore[union-attr]
    return [*HEADER, *rows]


def check_markers(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{readme}: needs exactly one {BEGIN} followed by one {END} around the Performance table")
    return text


def write_between_markers(readme: Path, table: list[str], footer: str) -> None:
    head, rest = check_markers(readme).split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n" + "\n".join(table) + f"\n\n{footer}\n{END}{tail}", encoding="utf-8")


def existing_table(readme: Path) -> list[str]:
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return []
    inside = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return [line.strip() for line in inside.splitlines() if line.strip().startswith("|")]


def build_table(runs: list[ScriptRun], quick: bool, machine: str, readme: Path | None) -> list[str]:
    new_rows = [line for run in runs for line in table_rows(run, quick, machine)]
    return merge_table(existing_table(readme) if readme else [], runs, new_rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names, e.g. filter,shards")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every benchmark")
    parser.add_argument("--readme", type=Path, default=None, help="file with the bench markers (default README.md; "
                        "with --quick, none unless given)")
    parser.add_argument("--no-readme", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    readme = None if args.no_readme else args.readme or (None if args.quick else REPO / "README.md")
    if readme is not None:
        check_markers(readme)  # fail before half an hour of benchmarks, not after
    names = discover([n for n in args.only.split(",") if n])
    runs = [run_script(name, args.quick) for name in names]

    from machine import describe

    machine = describe("at the end")
    table = build_table(runs, args.quick, machine, readme)
    command = " ".join(["python bench/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    footer = (f"Written by `{command}` "
              f"on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; each row one run, its baseline measured in "
              f"the same run ({', '.join(f'{r.name} {r.seconds:.0f} s' for r in runs)}).")
    print("\n" + "\n".join(table) + f"\n\n{footer}")
    if readme is not None:
        write_between_markers(readme, table, footer)
        print(f"\nwritten to {readme} between {BEGIN} and {END}")
    failed = [r for r in runs if r.exit_code != 0 or not r.rows]
    if failed:
        print(f"\n{len(failed)} benchmark(s) failed or recorded nothing: "
              + ", ".join(f"{r.name} (exit {r.exit_code})" for r in failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
