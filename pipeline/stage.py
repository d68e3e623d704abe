"""The one contract every stage implements; the spine (runner, manifest) owns everything else."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from pipeline.options import check_choices, output_params

Row = dict[str, Any]

OK, DROPPED, FAILED = "ok", "dropped", "failed"
STATUSES = (OK, DROPPED, FAILED)
AUTO = 0  # Resources.concurrency: as many actors as the cluster holds at once


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. `concurrency=None` runs stateless Ray tasks;
    an int runs that many long-lived actors (models loaded once per actor); AUTO (0) as many actors
    as the cluster holds at once (CPUs, GPUs and `memory_bytes` each). `prepare_cpus`: CPUs
    per Ray task of the stage's `prepare` step, run upstream of those workers; None runs no such
    step (process() then prepares rows itself). `memory_bytes`: host memory one worker holds at its
    peak, reserved with Ray so workers are never packed past a node's memory (0: not declared)."""

    num_cpus: float = 1
    num_gpus: float = 0
    batch_size: int = 8
    concurrency: int | None = None
    prepare_cpus: float | None = None
    memory_bytes: int = 0

    @classmethod
    def of(cls, config: Any) -> Resources:
        """From a stage config's worker options (pipeline/options.py WorkerOptions)."""
        return cls(num_cpus=config.num_cpus, num_gpus=getattr(config, "num_gpus", 0.0),
                   batch_size=config.batch_size, concurrency=config.concurrency)


@dataclass
class Result:
    """One outcome per input row. `metrics` keys are columns of the stage's manifest schema."""

    key: str
    status: str
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def ok(cls, key: str, **metrics: Any) -> Result:
        return cls(key, OK, "", metrics)

    @classmethod
    def dropped(cls, key: str, reason: str, **metrics: Any) -> Result:
        return cls(key, DROPPED, reason, metrics)

    @classmethod
    def failed(cls, key: str, reason: str, **metrics: Any) -> Result:
        return cls(key, FAILED, reason, metrics)


class MissingDependency(RuntimeError):
    pass


class Stage:
    """A pure function of a batch of manifest rows -> result rows (plus artifacts on storage).

    Subclasses set the class attributes, define a `Config` dataclass (its fields are the
    stage's options) and implement `process`. A stage never imports ray, never writes a
    manifest and never decides what is pending.
    """

    name: ClassVar[str]
    upstream: ClassVar[str | None]
    version: ClassVar[str]
    schema: ClassVar[pa.Schema]  # the stage's own manifest columns
    requires: ClassVar[tuple[str, ...]] = ()  # importable modules, checked at construction
    # True: one input row → several results (video → clips). Each result's metrics then carry
    # `video_key` (the input's key), which must be a column of the schema; an input that yields
    # nothing must still return one result keyed by itself (e.g. dropped: too_short).
    fans_out: ClassVar[bool] = False
    # Files the stage makes that only later stages read (column → kind for run.keep_media): a
    # streaming run removes them once nothing needs them (pipeline/janitor.py).
    media: ClassVar[dict[str, str]] = {}
    # The media kinds (values of some stage's `media`) this stage reads: a streaming run frees a
    # video's media once the last stage reading them has recorded its clips.
    reads: ClassVar[frozenset[str]] = frozenset()
    Config: ClassVar[type]

    def __init__(self, config: Any, run: Any) -> None:
        self.config = config
        self.run = run
        if dataclasses.is_dataclass(config):
            check_choices(self.name, config)
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingDependency(
                f"stage '{self.name}' needs {', '.join(missing)}: run `make setup` "
                f"(or `pip install -e .`)"
            )

    @property
    def resources(self) -> Resources:
        return Resources()

    def params(self) -> dict[str, Any]:
        """What changes the stage's outputs; its hash decides what is redone. Derived from the options
        (each declares `output=`); a stage adds only what is not one of its options (run.weights, a
        file's digest)."""
        return output_params(self.config, self.run) if dataclasses.is_dataclass(self.config) else {}

    def reads_media(self) -> frozenset[str]:
        """The media kinds this stage reads with its options (`reads` unless an option changes it)."""
        return self.reads

    def preflight(self) -> None:
        """Cheap checks on the driver before any worker starts (weights present, options sane), so
        a run that cannot work fails once with a clear message instead of in every worker."""

    def setup(self) -> None:
        """Load models once per worker."""

    def fetch_weights(self, root: Path) -> list[tuple[str, Path]]:
        """Download this stage's real weights under `root` (needs network); returns
        (model name, file) pairs for `discomv weights` to pin by sha256."""
        return []

    def prepare(self, rows: list[Row]) -> list[Row]:
        """Optional CPU-only step before `process` (decoding, say), with no model loaded: one row
        back per row, same keys, same order, each with fields added; values JSON-able or numpy
        arrays. Under Ray, when `resources.prepare_cpus` is set, the runner runs it in separate CPU
        tasks upstream of the workers that run `process`, so a GPU worker is never left waiting on
        a decode. A stage that overrides it must still accept un-prepared rows in `process` (direct
        calls, or a prepare that raised) and turn a row it could not prepare into a failed Result
        there, never drop it. Default: no prepare step."""
        return rows

    @classmethod
    def has_prepare(cls) -> bool:
        return cls.prepare is not Stage.prepare

    def process(self, rows: list[Row]) -> list[Result]:
        raise NotImplementedError


MapBatches = Callable[..., Iterable[Any]]  # (fn, batches, parallel, num_cpus) -> results as they finish


def map_inline(fn: Callable[[Any], Any], batches: list[Any], parallel: int = 1, num_cpus: float = 1.0) -> Iterator[Any]:
    """Batches one after another, here."""
    return (fn(batch) for batch in batches)


class SourceStage(Stage):
    """The first stage: its rows come from input files, not from an upstream manifest.

    `map_batches(fn, batches, parallel, num_cpus)` is how `source_rows` fans I/O-bound work out over
    batches before its rows exist (YouTube-8M id lookups), yielding each result as it finishes: inline
    by default; the runner passes Ray tasks (pipeline/runner.py, map_source_batches), so a stage never
    imports Ray.

    A source stage that can give its rows as Arrow tables (`source_keys`, `source_tables`) and work
    on a table at a time (`process_table`: key, status, reason and its schema's columns) is run in the
    driver without Ray: ingest's work per row is a few Arrow kernels, cheaper than carrying 15.3M rows
    to a worker and back."""

    upstream: ClassVar[str | None] = None
    map_batches: MapBatches = staticmethod(map_inline)

    def source_rows(self) -> list[Row]:
        """Read the inputs into raw rows, each with a unique `key`."""
        raise NotImplementedError
