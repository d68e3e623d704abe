"""MusicGen's codec, EnCodec 32 kHz (`facebook/encodec_32khz` through transformers' `EncodecModel`).

4 codebooks of 2048 entries at 50 Hz (the clip timeline's `STEP_HZ`), so a 10 s clip is an int16
array [4, 500]. Weights: `<models_root>/encodec/<model>/` (save_pretrained layout,
`model.safetensors` only: never unpickled) → the Hugging Face cache → a download when online.
Random init builds the same architecture (codebooks included, so codes vary). The codec contract
(32 kHz mono, 4 × 2048 codes at 50 Hz) is checked on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.models.weights import Weights, hub_cached, models_root, resolve
from pipeline.options import ConfigError
from pipeline.timeline import STEP_HZ

SAMPLE_RATE = 32000
CODEBOOKS = 4
CODEBOOK_SIZE = 2048
FRAME_RATE = STEP_HZ  # 50 Hz: 32 kHz / 640-sample hop; the clip timeline is the codec's frame grid
BANDWIDTH_KBPS = 2.2  # 4 codebooks × 11 bits × 50 Hz
WEIGHTS_FILE = "model.safetensors"
HUB_REPOS = {"encodec_32khz": "facebook/encodec_32khz"}
# facebook/encodec_32khz as transformers' conversion script builds it; random init builds exactly this
ENCODEC_32KHZ: dict[str, Any] = dict(
    sampling_rate=SAMPLE_RATE, audio_channels=1, codebook_size=CODEBOOK_SIZE,
    target_bandwidths=[BANDWIDTH_KBPS], upsampling_ratios=[8, 5, 4, 4], num_filters=64,
    use_causal_conv=False, normalize=False, use_conv_shortcut=False,
)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "encodec_32khz": ENCODEC_32KHZ,
    # same rate, codebooks and frame rate, a fraction of the compute: for tests, never for data
    "encodec_32khz_test": {**ENCODEC_32KHZ, "num_filters": 4, "hidden_size": 16, "codebook_dim": 16,
                           "num_lstm_layers": 1},
}
RANDOM_CODE_NORM = 0.1


def encode(codec: Any, audio: np.ndarray, device: Any, precision: str) -> np.ndarray:
    """[B, samples] float32 → int16 codes [B, codebooks, steps]."""
    import torch

    batch = torch.from_numpy(audio).unsqueeze(1).to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = codec.encode(batch, bandwidth=BANDWIDTH_KBPS)
    codes = out.audio_codes  # [chunks=1, B, codebooks, steps]: the 32 kHz model encodes in one chunk
    if codes.shape[0] != 1:
        raise RuntimeError(f"codec encoded in {codes.shape[0]} chunks; expected one (chunk_length_s=None)")
    codes = codes[0]
    if codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
        raise RuntimeError(f"codes outside 0..{CODEBOOK_SIZE - 1}: {codes.min()}..{codes.max()}")
    return codes.to(torch.int16).cpu().numpy()


def decode(codec: Any, codes: np.ndarray) -> np.ndarray:
    """int16 codes [B, codebooks, steps] → float32 audio [B, samples] (checks and listening)."""
    import torch

    batch = torch.from_numpy(codes.astype(np.int64)).unsqueeze(0)
    with torch.inference_mode():
        audio = codec.decode(batch, [None]).audio_values
    return audio[:, 0].float().numpy()


def resolve_codec_weights(model: str, mode: str, root: str) -> Weights:
    repo = HUB_REPOS.get(model)
    return resolve(
        f"encodec/{model}", mode, models_root(root), WEIGHTS_FILE,
        # a cached model.safetensors is only usable beside its config.json (from_pretrained reads both)
        cache_lookup=(lambda: hub_cached(repo, (WEIGHTS_FILE,), beside=("config.json",))) if repo else None,
        download=(lambda target: download_codec(repo, target)) if repo else None,
    )


def load_codec(model: str, weights: Weights, seed: int) -> Any:
    import torch
    from transformers import EncodecConfig, EncodecModel

    if weights.path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            codec = EncodecModel(EncodecConfig(**ARCHITECTURES[model]))
            randomize_codebooks(codec)
    else:
        codec = EncodecModel.from_pretrained(
            str(weights.path.parent), use_safetensors=True, local_files_only=True)
    check_codec_contract(codec.config, model)
    return codec.eval()


def randomize_codebooks(codec: Any) -> None:
    """transformers initialises codebooks to zeros (k-means fills them in training), so a random-init
    codec would map every frame to code 0. Random entries of one small, equal length (near the
    encoder's output scale) make the nearest entry depend on the frame, not on the entry's length."""
    import torch

    for layer in codec.quantizer.layers:
        entries = torch.randn_like(layer.codebook.embed)
        layer.codebook.embed.copy_(torch.nn.functional.normalize(entries, dim=-1) * RANDOM_CODE_NORM)
        layer.codebook.inited.fill_(1)


def check_codec_contract(config: Any, model: str) -> None:
    found = (config.sampling_rate, config.audio_channels, config.codebook_size, config.frame_rate,
             int(1000 * BANDWIDTH_KBPS // (config.frame_rate * config.codebook_nbits)))
    wanted = (SAMPLE_RATE, 1, CODEBOOK_SIZE, FRAME_RATE, CODEBOOKS)
    if found != wanted:
        raise ConfigError(
            f"codec weights for {model} are not MusicGen's codec: (rate, channels, codebook size, frame rate, "
            f"codebooks at {BANDWIDTH_KBPS} kbps) = {found}, expected {wanted}")


def download_codec(repo: str, target: Path) -> Path:
    from transformers import EncodecModel

    target.mkdir(parents=True, exist_ok=True)
    EncodecModel.from_pretrained(repo).save_pretrained(str(target))  # safetensors
    return target / WEIGHTS_FILE
