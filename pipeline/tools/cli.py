"""`discomv <stage|run|status|compact|demo>`; the Makefile targets are thin wrappers over this."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.config import describe
from pipeline.options import ConfigError, RunConfig
from stages import load_config

log = logging.getLogger("discomv")


def _options_text(section: str, cls: type) -> str:
    lines = [f"config options (set in YAML under '{section}:' or with --set {section}.KEY=VALUE):"]
    for name, type_name, default, help_text in describe(cls):
        lines.append(f"  {section}.{name} ({type_name}, default {default!r})\n      {help_text}")
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (sections: run, ingest, download, ...)")
    p.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one option; repeatable, e.g. --set download.rate_limit=2M",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    from stages import STAGES

    parser = argparse.ArgumentParser(
        prog="discomv",
        description="Build DISCO-MV-style video→music training sets: ingest → download → filter → ... → shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_options_text("run", RunConfig),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stage_cls in STAGES.items():
        doc = (stage_cls.__module__ and sys.modules[stage_cls.__module__].__doc__ or "").strip()
        p = sub.add_parser(
            name, help=doc.splitlines()[0] if doc else name, description=doc,
            epilog=_options_text(name, stage_cls.Config),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(p)
    p = sub.add_parser("run", help="run every stage in order (or --from/--to)")
    _common(p)
    p.add_argument("--from", dest="first", choices=list(STAGES), help="first stage")
    p.add_argument("--to", dest="last", choices=list(STAGES), help="last stage")
    p = sub.add_parser("status", help="one-screen summary of the manifests: counts per status and reason")
    _common(p)
    p = sub.add_parser("compact", help="rewrite each stage manifest as one part file (latest row per key)")
    _common(p)
    p.add_argument("stages", nargs="*", help="stages to compact (default: all)")
    p = sub.add_parser("audit", help="join every manifest: funnel, terminal states, reasons; SQL; one key's lineage")
    _common(p)
    p.add_argument("--sql", help="duckdb SQL over views `audit` (joined) and one per stage, e.g. "
                   "\"select terminal, count(*) from audit group by 1\"")
    p.add_argument("--key", help="print the full lineage of one key across stages")
    p.add_argument("--out", help="write the joined table as Parquet (default <manifest_root>/audit.parquet)")
    p.add_argument("--html", help="write a self-contained HTML report with plots to this path")
    p.add_argument("--card", help="write a Markdown dataset card to this path")
    p = sub.add_parser("browse", help="a local read-only web app: the candidates and clips, play a clip with "
                       "its instrumental and beats, the frames the filter saw")
    _common(p)
    p.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 shares it on a trusted network)")
    p = sub.add_parser("verify", help="re-read every shard: sha256, members, arrays, one shard per sharded clip")
    _common(p)
    p = sub.add_parser("takedown", help="remove videos/clips from the shards (rewriting only those) and mark them")
    _common(p)
    p.add_argument("keys", nargs="*", help="video keys (all their clips) or clip keys")
    p.add_argument("--file", help="a file of keys, one per line")
    p = sub.add_parser("cost", help="extrapolate measured per-stage CPU/GPU-seconds to DISCO-MV scale")
    _common(p)
    p.add_argument("--candidate-hours", type=float, help="hours of candidate video at scale "
                   "(default: 15.3M candidates × DISCO-MV's 77 s mean)")
    p.add_argument("--cluster", help="a cluster shape, e.g. 32cpu:8,8gpu+64cpu:4 (node groups): also print the "
                   "makespan stage after stage vs streaming")
    for name, what in (("train", "train the bundled VMAs-style model on the shards (trainer/train.py)"),
                       ("generate", "sample music for a clip's video features (trainer/generate.py)")):
        p = sub.add_parser(name, help=what, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER, help=f"passed to python -m trainer.{name} (--help there)")
    p = sub.add_parser("weights", help="download every stage's real weights into run.models_root and pin sha256")
    _common(p)
    p = sub.add_parser("demo", help="build the offline demo corpus, serve it on 127.0.0.1 and run the pipeline")
    p.add_argument("--out", default="demo", help="demo working folder (default: demo/)")
    p.add_argument("--videos", type=int, default=8, help="number of synthetic videos")
    p.add_argument("--port", type=int, default=18765,
                   help="port of the local server the videos are downloaded from (fixed: keys depend on it)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("train", "generate"):  # the trainer owns its options (and its --help)
        import importlib

        return importlib.import_module(f"trainer.{argv[0]}").main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s discomv: %(message)s", datefmt="%H:%M:%S",
    )
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from pipeline.models.weights import WeightsNotFound
        from pipeline.stage import MissingDependency
        from stages.ingest import InputError

        if isinstance(e, (InputError, MissingDependency, WeightsNotFound)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def _dispatch(args: argparse.Namespace) -> int:
    from pipeline.runner import run_stage
    from pipeline.tools.summary import print_run, print_status
    from stages import STAGES

    progress = not getattr(args, "no_progress", False) and sys.stderr.isatty()  # a bar in a log file is noise
    if args.command == "demo":
        from pipeline.runner import ensure_ray
        from pipeline.tools.demo import run_demo

        ensure_ray()  # first: the line naming where Ray runs and its dashboard
        config_path = run_demo(args.out, n_videos=args.videos, progress=progress, port=args.port)
        return _finish_demo(config_path.parent, config_path)
    cfg = load_config(args.config, args.overrides)
    if args.command in STAGES:
        run_stage(args.command, cfg, progress=progress)
        return 0
    if args.command == "run":
        names = list(STAGES)
        first = names.index(args.first) if args.first else 0
        last = names.index(args.last) if args.last else len(names) - 1
        chosen = names[first : last + 1]
        stages = [STAGES[name](cfg.stage(name), cfg.run) for name in chosen]  # options checked, then weights,
        for stage in stages:  # before hours of work start
            stage.preflight()
        from pipeline.runner import ensure_ray
        from pipeline.stream import run_pipeline

        ensure_ray(cfg.run.num_cpus)
        summaries = run_pipeline(chosen, cfg, progress)
        print_status(cfg)
        print_run(summaries)
        return 0
    if args.command == "status":
        print_status(cfg)
        return 0
    if args.command == "compact":
        from pipeline.manifest import ManifestStore

        store = ManifestStore(cfg.run.manifest_root)
        for name in args.stages or list(store.stages()):
            parts, rows = store.compact(name)
            print(f"{name}: {parts} part files → 1 ({rows} rows)")
        return 0
    if args.command == "cost":
        from pipeline.tools.cost import ClusterShape, estimate, makespan, print_cost, print_makespan

        try:
            cluster = ClusterShape.parse(args.cluster) if args.cluster else None
        except ValueError as e:
            raise ConfigError(str(e)) from e
        costs = estimate(cfg, args.candidate_hours)
        print_cost(costs)
        if cluster:
            print_makespan(makespan(costs, cluster), cluster)
        return 0
    if args.command == "verify":
        return run_verify(cfg)
    if args.command == "takedown":
        return run_takedown(cfg, args.keys, args.file)
    if args.command == "audit":
        return run_audit(args, cfg)
    if args.command == "browse":
        from pipeline.tools.browse.server import serve

        return serve(cfg, args.config, args.host, args.port)
    if args.command == "weights":
        return fetch_all_weights(cfg)
    raise AssertionError(args.command)


def run_audit(args: argparse.Namespace, cfg) -> int:
    from pathlib import Path

    from rich.console import Console

    from pipeline.manifest import ManifestStore
    from pipeline.tools import audit

    store = ManifestStore(cfg.run.manifest_root)
    if args.sql:
        Console().print(audit.query(store, args.sql).to_pandas().to_string(index=False))
        return 0
    if args.key:
        rows = audit.lineage(store, args.key)
        if not rows:
            print(f"no rows for key {args.key!r} in {store.root}", file=sys.stderr)
            return 1
        console = Console()
        for row in rows:
            head = f"[b]{row['stage']}[/b] {row['status']} {row['reason'] or ''} ({row['finished_at']:%Y-%m-%d %H:%M:%S}, "
            head += f"v{row['stage_version']}, weights={row['weights']}, node={row['node']})"
            console.print(head)
            skip = {"stage", "status", "reason", "finished_at", "stage_version", "weights", "node", "key"}
            for name, value in row.items():
                if name not in skip and value not in (None, "", []):
                    console.print(f"    {name}: {value}", highlight=False)
        return 0
    default_out = Path("audit.parquet") if store.remote else store.root / "audit.parquet"  # a local file
    table = audit.print_audit(store, Path(args.out) if args.out else default_out)
    if table is not None and (args.html or args.card):
        from pipeline.tools import report

        if args.html:
            threshold = getattr(cfg.stages.get("filter"), "threshold", None)
            html_path = report.write_html(table, Path(args.html), threshold, audit.clip_table(store))
            print(f"report: {html_path}")
        if args.card:
            print(f"dataset card: {report.write_card(table, Path(args.card))}")
    return 0


def run_verify(cfg) -> int:
    from pipeline.manifest import ManifestStore
    from pipeline.webds.index import shard_root
    from pipeline.webds.verify import verify

    store = ManifestStore(cfg.run.manifest_root)
    sharded = set(store.ok_keys("shards")) if store.latest("shards") is not None else None
    report = verify(shard_root(cfg.run.shard_root), sharded)
    for fault in report.faults:
        print(f"FAULT {fault}")
    checked = "checked against the manifest" if sharded is not None else "no shards manifest to check against"
    verdict = "OK" if report.ok else f"{len(report.faults)} FAULTS"
    print(f"verify {cfg.run.shard_root}: {report.shards} shards, {report.samples} samples, {checked}: {verdict}")
    return 0 if report.ok else 1


def run_takedown(cfg, keys: list[str], key_file: str | None) -> int:
    from pathlib import Path

    from pipeline.manifest import ManifestStore
    from pipeline.webds.index import shard_root
    from pipeline.webds.takedown import mark_in_manifests, remove_from_shards
    from stages import STAGES

    wanted = set(keys) | (set(Path(key_file).read_text().split()) if key_file else set())
    if not wanted:
        print("error: give keys or --file", file=sys.stderr)
        return 2
    removed = remove_from_shards(shard_root(cfg.run.shard_root), wanted)
    for shard, gone in removed.items():
        print(f"{shard}: removed {len(gone)} samples")
    marked = mark_in_manifests(ManifestStore(cfg.run.manifest_root), wanted, list(STAGES))
    print(f"takedown: {sum(map(len, removed.values()))} samples removed from {len(removed)} shards; "
          f"{marked} manifest rows marked dropped (takedown)")
    return run_verify(cfg)


def fetch_all_weights(cfg) -> int:
    from pipeline.models.weights import models_root, pin
    from stages import STAGES

    root = models_root(cfg.run.models_root)
    root.mkdir(parents=True, exist_ok=True)
    for name, stage_cls in STAGES.items():
        for model, path in stage_cls(cfg.stage(name), cfg.run).fetch_weights(root):
            print(f"{name}: {model} → {path} sha256 {pin(root, model, path)}")
    print(f"pinned in {root / 'weights.lock.json'}")
    return 0




def _finish_demo(work: Path, config_path: Path) -> int:
    """After the stages: verify the shards, a short training run on them, the audit report."""
    from pipeline.tools.demo import TRAIN_STEPS

    code = main(["verify", "-c", str(config_path)])
    runs = work / "runs" / "tiny"
    if code == 0 and any((work / "shards").glob("train-*.tar")):
        code = main(["train", "--shards", str(work / "shards"), "--config", "tiny", "--steps", str(TRAIN_STEPS),
                     "--out", str(runs), "--set", "eval_interval=10"])
    main(["audit", "-c", str(config_path), "--html", str(work / "report.html"), "--card", str(work / "DATASET_CARD.md")])
    print(f"\nmanifests: {work / 'manifests'}   media: {work / 'media'}   shards: {work / 'shards'}")
    print(f"report: {work / 'report.html'}   dataset card: {work / 'DATASET_CARD.md'}   training log: {runs / 'log.csv'}")
    print(f"next: make status CONFIG={config_path}   (or any stage: make filter CONFIG={config_path})")
    return code


if __name__ == "__main__":  # last: `python -m pipeline.tools.cli` needs every function above defined
    sys.exit(main())
