"""Demucs weights: load a model or a bag of models, save one, or build htdemucs randomly initialised.

Weights come from `<models_root>/demucs/<model>/`, Demucs' `--repo` layout (`<model>.yaml` listing
signatures; `<sig>.safetensors` or `<sig>[-<hash>].th`), loaded without pickle (safetensors, or
`torch.load(weights_only=True)` allowing only Demucs model classes). `run.weights=random` builds the
same architecture randomly initialised.
"""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path
from typing import Any

from pipeline.models.weights import RANDOM_INIT, Weights, resolve, sha256_file

SOURCES = ["drums", "bass", "other", "vocals"]
VOCALS = "vocals"
# The published htdemucs (signature 955717e8) architecture; random init builds exactly this.
HTDEMUCS_KWARGS: dict[str, Any] = dict(
    sources=SOURCES, audio_channels=2, samplerate=44100, segment=Fraction(39, 5), channels=48,
    growth=2, nfft=4096, cac=True, depth=4, rewrite=True, multi_freqs=[], freq_emb=0.2, emb_scale=10,
    emb_smooth=True, kernel_size=8, stride=4, time_stride=2, context=1, context_enc=0, norm_starts=4,
    norm_groups=4, dconv_mode=3, dconv_depth=2, dconv_comp=8, dconv_init=1e-3, bottom_channels=512,
    t_layers=5, t_hidden_scale=4.0, t_heads=8, t_dropout=0.02, t_sparse_attn_window=400, rescale=0.1,
)
# Small random models for tests: same class and code path, a fraction of the compute. "tiny8k" also
# runs at 8 kHz so a 10-minute input separates in seconds on 2 CPU cores (memory tests).
TINY_KWARGS: dict[str, dict[str, Any]] = {
    "tiny": dict(channels=8, bottom_channels=0, t_layers=1, t_heads=2, dconv_mode=1, dconv_depth=1),
    "tiny8k": dict(channels=8, bottom_channels=0, t_layers=1, t_heads=2, dconv_mode=1, dconv_depth=1,
                   samplerate=8000),
}
MODEL_CLASSES = ("demucs.htdemucs.HTDemucs", "demucs.hdemucs.HDemucs", "demucs.demucs.Demucs")


def resolve_bag(model: str, root: Path) -> Weights:
    """The bag's yaml, pinned in `<root>/weights.lock.json` as "demucs/<model>"."""
    return resolve(f"demucs/{model}", "pretrained", root, f"{model}.yaml")


def load_bag(model: str, weights: str, root: Path, random_init: str = "htdemucs",
             seed: int = 0) -> tuple[Any, str, str | None]:
    """(BagOfModels, weights stamp, sha256 of the weights) for the bag `model` under `root`;
    `weights=random`: one `random_init` HTDemucs, seeded by `seed`."""
    import torch
    from demucs.apply import BagOfModels

    if weights == "random":
        torch.manual_seed(seed)
        return BagOfModels([build_random_htdemucs(random_init)]), RANDOM_INIT, None
    resolved = resolve_bag(model, root)
    assert resolved.path is not None
    bag, files = load_repo_bag(resolved.path.parent, model)
    return bag, resolved.stamp, combined_sha256(files)


def build_random_htdemucs(size: str = "htdemucs") -> Any:
    from demucs.htdemucs import HTDemucs

    if size != "htdemucs" and size not in TINY_KWARGS:
        raise ValueError(f"separate.random_init must be 'htdemucs' or one of {sorted(TINY_KWARGS)}, got {size!r}")
    return HTDemucs(**{**HTDEMUCS_KWARGS, **TINY_KWARGS.get(size, {})}).eval()


def save_repo_model(model: Any, folder: Path, name: str, signature: str, fmt: str = "th") -> Path:
    """Write `model` as a one-model bag in Demucs' `--repo` layout (`<name>.yaml` + weights), the
    layout both this stage and `python -m demucs --repo` read. `fmt`: th | safetensors."""
    import json

    import torch
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    args, kwargs = model._init_args_kwargs
    klass = f"{type(model).__module__}.{type(model).__name__}"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        metadata = {"klass": klass, "args": json.dumps(list(args), default=_json_fraction),
                    "kwargs": json.dumps(kwargs, default=_json_fraction)}
        path = folder / f"{signature}.safetensors"
        save_file(state, str(path), metadata=metadata)
    elif fmt == "th":
        path = folder / f"{signature}.th"
        package = {"klass": type(model), "args": args, "kwargs": kwargs, "state": state, "training_args": {}}
        torch.save(package, path)
    else:
        raise ValueError(f"unknown weights format {fmt!r}: th | safetensors")
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"models": [signature]}))
    return path


def _json_fraction(value: Any) -> Any:
    if isinstance(value, Fraction):
        return {"_type": "fraction", "numerator": value.numerator, "denominator": value.denominator}
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def load_repo_bag(folder: Path, name: str) -> tuple[Any, list[Path]]:
    """A bag from a Demucs `--repo` folder, read without unpickling arbitrary objects."""
    import yaml
    from demucs.apply import BagOfModels

    spec = yaml.safe_load((folder / f"{name}.yaml").read_text())
    files = [model_file(folder, sig) for sig in spec["models"]]
    models = [load_model_file(path) for path in files]
    bag = BagOfModels(models, spec.get("weights"), spec.get("segment"))
    bag.eval()
    return bag, files


def model_file(folder: Path, signature: str) -> Path:
    candidates = [folder / f"{signature}.safetensors", folder / f"{signature}.th",
                  *sorted(folder.glob(f"{signature}-*.th"))]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no weights for Demucs signature {signature} in {folder}")


def load_model_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_th(path)


def _load_safetensors(path: Path) -> Any:
    from demucs.hf import load_safetensors_model
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        klass = (f.metadata() or {}).get("klass", "")
    if klass not in MODEL_CLASSES:
        raise ValueError(f"{path}: model class {klass!r} is not a Demucs model; refusing to load it")
    return load_safetensors_model(path)


def _load_th(path: Path) -> Any:
    import torch
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs
    from demucs.states import load_model

    with torch.serialization.safe_globals([HTDemucs, HDemucs, Demucs, Fraction]):
        package = torch.load(path, map_location="cpu", weights_only=True)
    if package.get("klass") not in (HTDemucs, HDemucs, Demucs):
        raise ValueError(f"{path}: not a Demucs model package")
    return load_model(package)


def combined_sha256(files: list[Path]) -> str:
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return h.hexdigest()

