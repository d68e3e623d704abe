"""tokens: each clip's instrumental (32 kHz mono, from separate) → EnCodec codes, the VMAs targets.

MusicGen's codec (`facebook/encodec_32khz` through transformers' `EncodecModel`): 4 codebooks of
2048 entries at 50 Hz, so a 10 s clip is an int16 array [4, 500] in
`<media_root>/tokens/<key>.npy` (written under `.part`, renamed; np.save without pickle).

* Exact shapes always: the window is read sample-exact; a partial last clip (`padded_s > 0`) is
  padded with silence to the full clip length before encoding.
* Batched: the clips of a process() call are encoded in one forward pass; a thread pool reads the
  next clips' audio while the model runs (the runner has one map per stage, so CPU decode lives
  here rather than in separate CPU actors).
* Weights: `<models_root>/encodec/<model>/` (save_pretrained layout, `model.safetensors` only:
  never unpickled) → the Hugging Face cache → a download when online. `run.weights=random` builds
  the same architecture randomly initialised (codebooks included, so codes vary) and stamps rows
  `random-init`. The codec contract (32 kHz mono, 4 × 2048 codes at 50 Hz) is checked on load.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.media.audio import read_audio_window
from pipeline.media.files import save_npy_atomic
from pipeline.media.probe import MediaError
from pipeline.models.precision import PRECISIONS, pick_precision
from pipeline.models.weights import Weights, models_root, pick_device, resolve
from pipeline.options import ConfigError, ModelWorkerOptions, clip_length, option
from pipeline.stage import Resources, Result, Row, Stage
from pipeline.timeline import check_window

SAMPLE_RATE = 32000
CODEBOOKS = 4
CODEBOOK_SIZE = 2048
FRAME_RATE = 50
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
# a clip shorter than the media promised by more than this is a damaged file, not a partial clip
SHORT_AUDIO_TOLERANCE_S = 0.5
RANDOM_CODE_NORM = 0.1


@dataclass
class TokensConfig(ModelWorkerOptions):
    model: str = option("encodec_32khz", f"codec architecture: {' | '.join(ARCHITECTURES)} (test: tiny, for tests)",
                        choices=tuple(ARCHITECTURES))
    clip_s: float = clip_length()
    precision: str = option(
        "fp32", "fp32 | bf16 | auto (bf16 on CUDA). fp32 by default: codes are training targets, and "
        "bf16 distances can flip the nearest codebook entry", choices=PRECISIONS)
    decode_threads: int = option(2, "threads reading clip audio ahead of the model", output=False)
    batch_size: int = 8  # clips encoded in one forward pass


class Tokens(Stage):
    name = "tokens"
    upstream = "beats"
    version = "1"
    Config = TokensConfig
    requires = ("torch", "transformers", "soundfile", "numpy")
    schema = pa.schema(
        [
            ("tokens_path", pa.string()),
            ("tokens_shape", pa.list_(pa.int32())),
            ("tokens_dtype", pa.string()),
            ("codec_model", pa.string()),
            ("codec_weights_sha256", pa.string()),
            ("codec_precision", pa.string()),
            ("audio_samples_read", pa.int64()),  # from the file; the rest of the clip is silence
        ]
    )

    def __init__(self, config: TokensConfig, run: Any) -> None:
        super().__init__(config, run)
        check_config(config)

    @property
    def resources(self) -> Resources:
        return Resources.of(self.config)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "weights": self.run.weights}

    def preflight(self) -> None:
        resolve_codec_weights(self.config.model, self.run.weights, self.run.models_root)

    def setup(self) -> None:
        import torch

        c = self.config
        self.device = torch.device(pick_device(c.device, c.num_gpus))
        self.precision = pick_precision(c.precision, self.device.type)
        weights = resolve_codec_weights(c.model, self.run.weights, self.run.models_root)
        self.codec = load_codec(c.model, weights, c.seed).to(self.device)
        self.weights_stamp = weights.stamp
        self.samples = round(c.clip_s * SAMPLE_RATE)
        self.steps = round(c.clip_s * FRAME_RATE)
        self.identity = {
            "codec_model": HUB_REPOS.get(c.model, c.model) if not weights.is_random else c.model,
            "codec_weights_sha256": weights.sha256,
            "codec_precision": self.precision,
        }
        self.out_dir = Path(self.run.media_root) / "tokens"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.reader = ThreadPoolExecutor(max(1, c.decode_threads), thread_name_prefix="tokens-read")

    def fetch_weights(self, root: Path) -> list[tuple[str, Path]]:
        repo = HUB_REPOS.get(self.config.model)
        if repo is None:
            return []
        return [(f"encodec/{self.config.model}", download_codec(repo, root / "encodec" / self.config.model))]

    def process(self, rows: list[Row]) -> list[Result]:
        clips = list(self.reader.map(self.read_clip, rows))
        results = {c.key: c for c in clips if isinstance(c, Result)}
        ready = [c for c in clips if isinstance(c, AudioClip)]
        if ready:
            results.update(self.encode_and_save(ready))
        return [results[row["key"]] for row in rows]

    def read_clip(self, row: Row) -> AudioClip | Result:
        key, path = row["key"], row.get("instrumental32k_path") or ""
        if not path or not Path(path).is_file():
            return Result.failed(key, f"missing_file: no instrumental at {path!r} (re-run separate)", **self.identity)
        failure = check_window(row, self.config.clip_s)
        if failure:
            return Result.failed(key, failure, **self.identity)
        try:
            audio, read = read_audio_window(path, float(row["start_s"]), self.samples, SAMPLE_RATE)
        except MediaError as e:
            return Result.failed(key, str(e), **self.identity)
        expected = self.samples - round(float(row.get("padded_s") or 0.0) * SAMPLE_RATE)
        if read < expected - SHORT_AUDIO_TOLERANCE_S * SAMPLE_RATE:
            return Result.failed(
                key, f"short_audio: {read / SAMPLE_RATE:.2f}s of audio where the clip needs "
                f"{expected / SAMPLE_RATE:.2f}s (truncated instrumental?)", **self.identity)
        return AudioClip(key, audio, read)

    def encode_and_save(self, clips: list[AudioClip]) -> dict[str, Result]:
        codes = encode(self.codec, np.stack([c.audio for c in clips]), self.device, self.precision)
        if codes.shape[1:] != (CODEBOOKS, self.steps):
            raise RuntimeError(f"codec returned codes of shape {codes.shape[1:]}, expected {(CODEBOOKS, self.steps)}")
        results = {}
        for clip, clip_codes in zip(clips, codes, strict=True):
            path = self.out_dir / f"{clip.key}.npy"
            try:
                save_npy_atomic(path, clip_codes)
            except OSError as e:
                results[clip.key] = Result.failed(clip.key, f"io_error: {e}", **self.identity)
                continue
            results[clip.key] = Result.ok(
                clip.key, tokens_path=str(path), tokens_shape=list(clip_codes.shape),
                tokens_dtype=str(clip_codes.dtype), audio_samples_read=clip.samples_read, **self.identity)
        return results


@dataclass
class AudioClip:
    key: str
    audio: np.ndarray  # float32 [samples], silence-padded to the clip length
    samples_read: int


# ---------------------------------------------------------------- checks


def check_config(c: TokensConfig) -> None:
    if abs(c.clip_s * FRAME_RATE - round(c.clip_s * FRAME_RATE)) > 1e-9 or c.clip_s <= 0:
        raise ConfigError(f"config key 'tokens.clip_s' must be a positive multiple of 20 ms, got {c.clip_s}")


# ---------------------------------------------------------------- the codec


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
        cache_lookup=(lambda: _hub_cache(repo)) if repo else None,
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


def _hub_cache(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, WEIGHTS_FILE)
    if isinstance(found, str) and (Path(found).parent / "config.json").is_file():
        return Path(found)
    return None


__all__ = ["Tokens", "TokensConfig", "decode", "encode"]
