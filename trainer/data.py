"""Stream DISCO-MV WebDataset shards into torch batches; nothing is copied to local disk.

Training order is a pure function of (seed, rank, worker, samples already seen), so a resumed run
continues the same stream: shards are shuffled per epoch with `seed + epoch`, split by node then by
DataLoader worker, and samples go through a seeded shuffle buffer. With more than one rank, or fewer
shards than readers, each reader instead samples shards with replacement (`ResampledShards`), so no
rank ever runs dry and ranks stay in step.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from pipeline.webds.sample import ARRAY_MEMBERS, load_npy

log = logging.getLogger("discomv.trainer")


@dataclass
class DataConfig:
    shards: str = "shards"  # local folder or fsspec URI holding {split}-NNNNNN.tar
    batch_size: int = 8
    shuffle_buffer: int = 256
    num_workers: int = 0  # DataLoader workers per rank
    resampled: bool = False  # forced on when ranks × workers > shards
    seed: int = 0


def list_shards(root: str, split: str) -> list[str]:
    """Shard URLs for one split, sorted; local paths or fsspec URIs. Only shards with a sidecar are
    finished (on an object store the sidecar is written last, docs/storage.md)."""
    if "://" not in root:
        return [str(p) for p in sorted(Path(root).glob(f"{split}-*.tar"))]
    import fsspec

    fs, _, (path,) = fsspec.get_fs_token_paths(root)
    protocol = root.split("://", 1)[0]
    open_with_fsspec(protocol)
    names = set(fs.ls(path.rstrip("/"), detail=False, refresh=True))
    tars = sorted(fs.glob(f"{path.rstrip('/')}/{split}-*.tar"))
    return [f"{protocol}://{p}" for p in tars if p.removesuffix(".tar") + ".json" in names]


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> Any:
    """webdataset's opener for a URL scheme it has no handler of its own for: fsspec's file."""
    import fsspec

    return fsspec.open(url, mode).open()


def open_with_fsspec(protocol: str) -> None:
    """Let webdataset open `protocol://` shards (s3, gs, …) through fsspec, in whichever process
    reads them; its own schemes (pipe:, http:, gs: via gsutil) are kept."""
    import importlib

    schemes = importlib.import_module("webdataset.gopen").gopen_schemes  # the module (the package exports its function)
    schemes.setdefault(protocol, gopen_fsspec)


def count_samples(root: str, split: str) -> int | None:
    """Samples in a split from `index.parquet` beside the shards (a folder or fsspec URI), if there is one."""
    import pyarrow.parquet as pq

    if "://" in root:
        import fsspec

        fs, path = fsspec.core.url_to_fs(f"{root.rstrip('/')}/index.parquet")
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["split", "num_samples"]).to_pydict()
    elif not (Path(root) / "index.parquet").is_file():
        return None
    else:
        table = pq.read_table(Path(root) / "index.parquet", columns=["split", "num_samples"]).to_pydict()
    return sum(n for s, n in zip(table["split"], table["num_samples"], strict=True) if s == split)


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Our own decoder: only the fields we use, .npy without pickle (webdataset's default would unpickle .pkl)."""
    sample = {name.removesuffix(".npy"): load_npy(raw[name]) for name in ARRAY_MEMBERS if name in raw}
    sample["key"] = raw["__key__"]
    sample["meta"] = json.loads(raw["json"]) if "json" in raw else {}
    return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64)),
        "video": torch.from_numpy(np.stack([s["hiera"] for s in samples]).astype(np.float32)),
        "beat_weights": torch.from_numpy(np.stack([s["beat_weights"] for s in samples]).astype(np.float32)),
        "keys": [s["key"] for s in samples],
    }


def _epoch_dataset(urls: list[str], seed: int, epoch: int, shuffle_buffer: int) -> wds.WebDataset:
    order = list(urls)
    random.Random(seed + epoch).shuffle(order)
    dataset = wds.WebDataset(
        order,
        shardshuffle=False,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,
    )
    return dataset.shuffle(shuffle_buffer, seed=seed * 1_000_003 + epoch) if shuffle_buffer > 1 else dataset


def _resampled_dataset(urls: list[str], seed: int, shuffle_buffer: int) -> wds.DataPipeline:
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    # deterministic=True: ResampledShards then seeds from (rank, worker, seed) only, so a resume replays.
    stages = [wds.ResampledShards(urls, seed=seed, deterministic=True), wds.tarfile_to_samples()]
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, seed=seed * 1_000_003 + rank * 1009 + worker))
    return wds.DataPipeline(*stages)


class TrainStream(torch.utils.data.IterableDataset):
    """Endless stream of decoded samples for this rank; `skip` samples (per reader) already consumed."""

    def __init__(self, urls: list[str], cfg: DataConfig, resampled: bool, skip: int = 0):
        super().__init__()
        self.urls, self.cfg, self.resampled, self.skip = urls, cfg, resampled, skip

    def _raw(self) -> Iterator[dict[str, Any]]:
        if self.resampled:
            yield from _resampled_dataset(self.urls, self.cfg.seed, self.cfg.shuffle_buffer)
            return
        for epoch in count():
            yield from _epoch_dataset(self.urls, self.cfg.seed, epoch, self.cfg.shuffle_buffer)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for protocol in {u.split("://", 1)[0] for u in self.urls if "://" in u}:  # a spawned DataLoader worker
            open_with_fsspec(protocol)
        _, _, _, num_workers = wds.utils.pytorch_worker_info()
        # Skipping happens before decoding: a resume reads the raw bytes it passes over, nothing more.
        raw = islice(self._raw(), self.skip // max(1, num_workers), None)
        return map(decode_sample, raw)


def train_loader(cfg: DataConfig, world_size: int = 1, samples_seen: int = 0) -> Iterator[dict[str, Any]]:
    """Endless iterator of training batches for this rank, resuming after `samples_seen` of its samples.

    Resume is exact with `num_workers=0`; with workers it is exact when the batches consumed split evenly
    over workers (DataLoader asks them round-robin), otherwise it is off by less than a batch per worker.
    """
    urls = list_shards(cfg.shards, "train")
    if not urls:
        raise FileNotFoundError(f"no train-*.tar under {cfg.shards}: run `discomv shards` first")
    readers = world_size * max(1, cfg.num_workers)
    resampled = cfg.resampled or len(urls) < readers
    if resampled and not cfg.resampled:
        log.info("data: %d train shards < %d readers; sampling shards with replacement", len(urls), readers)
    stream = TrainStream(urls, cfg, resampled, skip=samples_seen)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=cfg.batch_size,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )
    return iter(loader)


def eval_batches(cfg: DataConfig, split: str = "val", max_batches: int | None = None) -> Iterator[dict[str, Any]]:
    """One pass over a split, in shard order, this rank's share only (split by node)."""
    urls = list_shards(cfg.shards, split)
    if not urls:
        return iter(())
    dataset = wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=None, empty_check=False
    ).map(decode_sample)
    batches = (collate(chunk) for chunk in _chunks(iter(dataset), cfg.batch_size))
    return islice(batches, max_batches)


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(islice(items, size)):
        yield chunk


def peek_sample(root: str, split: str = "train") -> dict[str, Any]:
    """The first sample of a split: the shapes the model is built for come from the data."""
    urls = list_shards(root, split)
    if not urls:
        raise FileNotFoundError(f"no {split}-*.tar under {root}")
    dataset = wds.WebDataset(urls[:1], shardshuffle=False, nodesplitter=None, workersplitter=None)
    return decode_sample(next(iter(dataset)))


def find_sample(root: str, key: str) -> dict[str, Any]:
    """A sample by `__key__`, scanning val, test, then train shards."""
    for split in ("val", "test", "train"):
        urls = list_shards(root, split)
        dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        for raw in dataset:
            if raw["__key__"] == key:
                return decode_sample(raw)
    raise KeyError(f"no sample with key {key!r} in the shards under {root}")
