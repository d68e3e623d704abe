"""Options: what a config key means, declared once where the key is declared.

A stage's options are a dataclass of `option(...)` fields. Each carries its help text and, where it
applies, the values it may take (`choices`, checked by the config loader with one message style), the
key it must agree with (`same_as`, cross-checked when the whole config loads), and whether it changes
the stage's outputs (`output`): the stage's params — whose hash decides what is redone — are derived
from the options marked so, never from a hand-kept list. A leaf: it imports only pipeline/timeline.py.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.timeline import CLIP_S, STEP_HZ

# `output` may be a predicate of (stage options, run options): the option counts only where it is used
# (e.g. the CLIP model name only when filter.embedder is clip).
OutputWhen = bool | Callable[[Any, Any], bool]


class ConfigError(ValueError):
    pass


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    output: OutputWhen = True,
    same_as: str | None = None,
) -> Any:
    """A config field with its help text (shown by `discomv <stage> --help`).

    choices: the values it may take; output: whether (or when) it changes the stage's outputs;
    same_as: `section.key` this option restates and must equal (e.g. tokens.clip_s = clips.clip_s)."""
    metadata = {"help": help, "choices": choices, "output": output, "same_as": same_as}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def clip_length(restates: str | None = "clips.clip_s") -> Any:
    return option(CLIP_S, f"clip length in seconds ({CLIP_S:g} s = {int(CLIP_S * STEP_HZ)} steps of "
                  f"{STEP_HZ} Hz)", same_as=restates)


DEVICES = ("auto", "cpu", "cuda")


@dataclass
class WorkerOptions:
    """How a stage's workers run: never changes outputs. A stage config subclasses this and may
    restate a default (`batch_size: int = 4`); the meaning and help stay here."""

    num_cpus: float = option(1.0, "CPUs reserved per worker", output=False)
    concurrency: int = option(
        0, "actors, each loading its model once; 0 = as many as the cluster's CPUs (GPUs when num_gpus > 0) "
        "hold", output=False)
    batch_size: int = option(8, "rows per process() call", output=False)


@dataclass
class ModelWorkerOptions(WorkerOptions):
    """Worker options of a stage that runs a torch model."""

    num_gpus: float = option(0.0, "GPUs per actor; the model runs on CUDA when > 0", output=False)
    device: str = option("auto", "torch device: auto (cuda when a GPU is reserved) | cpu | cuda",
                         choices=DEVICES, output=False)
    seed: int = option(0, "seeds random-init weights (run.weights=random): identical on every worker",
                       output=lambda c, run: run.weights == "random")


@dataclass
class RunConfig:
    manifest_root: str = option("manifests", "where stage manifests (Parquet part files) go: a folder or a "
                                "URI (s3://bucket/prefix)")
    media_root: str = option("media", "where downloaded and derived media go: a folder or a URI "
                             "(s3://bucket/prefix; read through each node's media cache)")
    media_cache: str | None = option(None, "with a media_root URI: the folder of each node's cache of media "
                                     "(None: <temp dir>/discomv-media-<hash of media_root>)", output=False)
    media_cache_gb: float = option(20.0, "with a media_root URI: most GB a node's media cache holds; least "
                                   "recently used files go first, files in use never", output=False)
    shard_root: str = option("shards", "where WebDataset shards go: a folder or a URI (s3://bucket/prefix)")
    storage_options: dict[str, Any] = option(
        {}, "fsspec options for roots given as URIs (s3://bucket/prefix, gs://…), e.g. endpoint_url, "
        "anon, client_kwargs; credentials are better left to the client's environment (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE). Never written to manifests or logs "
        "(docs/storage.md)", output=False)
    models_root: str = option("models", "local weights folder (also $DISCOMV_MODELS)")
    weights: str = option(
        "pretrained",
        "pretrained: real weights (local folder, cache, or download) | "
        "random: same architectures randomly initialised, outputs stamped weights=random-init",
        choices=("pretrained", "random"),
    )
    flush_rows: int = option(16, "results appended to the manifest every N rows (durability unit)")
    retry_failed: bool = option(False, "also redo rows whose last status is failed")
    num_cpus: int | None = option(None, "CPUs for the embedded Ray (None = all)")
    executor: str = option(
        "stream",
        "how `discomv run` runs its stages: stream (one Ray Data pipeline, every stage alive at once, rows "
        "flowing on as each stage finishes them) | stages (each stage over every row, then the next)",
        choices=("stream", "stages"))
    keep_media: list[str] = option(
        [], "media `discomv run` keeps after the last stage that needs them has recorded its row: video "
        "(downloads), stems (instrumentals). Default: removed (a dropped video's download after filter; a "
        "kept video's download and stems once every clip of it has its artifacts); failed rows keep theirs",
        choices=("video", "stems"))
    media_window: int = option(
        0, "most videos `discomv run` has past download and not yet through the last stage reading their media "
        "(bounds the media on disk); 0 or less than the run's batches need: the least that keeps them full")


def field_meta(cls: type, name: str) -> dict[str, Any]:
    """An option's metadata, looked up through the class hierarchy: a subclass that restates only a
    default (`batch_size: int = 4`) keeps the base option's help, choices and output flag."""
    for klass in cls.__mro__:
        fields = getattr(klass, "__dataclass_fields__", {})
        if name in fields and fields[name].metadata:
            return dict(fields[name].metadata)
    return {}


def output_params(config: Any, run: Any) -> dict[str, Any]:
    """The options that change a stage's outputs under this config, by name."""
    params = {}
    for f in dataclasses.fields(config):
        output = field_meta(type(config), f.name).get("output", True)
        if output is True or (callable(output) and output(config, run)):
            params[f.name] = getattr(config, f.name)
    return params


def check_choices(section: str, config: Any) -> None:
    """Every option with `choices` holds one of them (the loader and every stage's constructor call
    this, so options built in code are checked as strictly as options read from YAML)."""
    for f in dataclasses.fields(config):
        choices = field_meta(type(config), f.name).get("choices")
        values = getattr(config, f.name)
        for value in values if isinstance(values, list) else [values]:
            _check_choice(section, f.name, choices, value)


def _check_choice(section: str, name: str, choices: tuple[Any, ...] | None, value: Any) -> None:
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise ConfigError(
            f"config key '{section}.{name}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            + (f" (did you mean '{close[0]}'?)" if close else "")
        )
