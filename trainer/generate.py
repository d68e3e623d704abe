"""Sample music for one clip's video features and decode it to a WAV with EnCodec.

    python -m trainer.generate --checkpoint runs/tiny/ckpt.pt --shards shards --key vid_000 --out clip.wav
    python -m trainer.generate --checkpoint runs/tiny/ckpt.pt --features hiera.npy --out clip.wav

Without `--encodec DIR` (a local facebook/encodec_32khz folder) the decoder is EnCodec's architecture with
random weights and the trained model's codebook table: the mechanics are real, the sound is not. The
sidecar `<out>.json` says which (`encodec: random-init | pretrained`).
"""

from __future__ import annotations

import argparse
import json
import sys
import wave
from pathlib import Path

import numpy as np
import torch

from trainer.data import find_sample
from trainer.model import ModelConfig, VideoToMusic
from trainer.train import PRETRAINED, RANDOM_INIT, load_checkpoint

SAMPLE_RATE = 32_000
HOP_LENGTH = 640  # 32 kHz / 50 Hz token rate


def encodec_32khz_config():
    """facebook/encodec_32khz's config, built locally (no hub access)."""
    from transformers import EncodecConfig

    return EncodecConfig(
        target_bandwidths=[2.2], sampling_rate=SAMPLE_RATE, audio_channels=1, normalize=False,
        chunk_length_s=None, overlap=None, hidden_size=128, num_filters=64, num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 4], norm_type="weight_norm", kernel_size=7, last_kernel_size=7,
        residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=False, pad_mode="reflect",
        compress=2, num_lstm_layers=2, trim_right_ratio=1.0, codebook_size=2048, use_conv_shortcut=False,
    )


def load_encodec(local_dir: str, codebook_table: torch.Tensor, seed: int) -> tuple[torch.nn.Module, str]:
    from transformers import EncodecModel

    if local_dir:
        return EncodecModel.from_pretrained(local_dir, local_files_only=True).eval(), PRETRAINED
    torch.manual_seed(seed)
    model = EncodecModel(encodec_32khz_config()).eval()
    # Random EnCodec starts with all-zero codebooks; use the table the model was trained against.
    for layer, table in zip(model.quantizer.layers, codebook_table, strict=False):
        layer.codebook.embed.copy_(table)
    return model, RANDOM_INIT


def load_model(checkpoint_path: Path, use_ema: bool) -> tuple[VideoToMusic, dict]:
    checkpoint = load_checkpoint(checkpoint_path)
    cfg = ModelConfig(**json.loads(checkpoint["config"])["model"])
    model = VideoToMusic(cfg)
    model.load_state_dict(checkpoint["ema" if use_ema else "model"])
    return model.eval(), checkpoint


def decode_to_audio(encodec: torch.nn.Module, tokens: torch.Tensor) -> np.ndarray:
    """tokens [K, S] → mono float32 samples, S × 640 of them."""
    with torch.no_grad():
        audio = encodec.decode(tokens[None, None], [None], return_dict=False)[0]
    return audio[0, 0, : tokens.shape[-1] * HOP_LENGTH].float().numpy()


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="discomv generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="ckpt.pt written by `discomv train`")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--key", help="clip key to look up in --shards (val, test, then train)")
    source.add_argument("--features", help="a hiera.npy file [T, D]")
    p.add_argument("--shards", help="shard root for --key")
    p.add_argument("--out", required=True, help="WAV to write (32 kHz mono)")
    p.add_argument("--steps", type=int, help="token steps to sample (default: the model's clip length)")
    p.add_argument("--top-k", type=int, default=250)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--encodec", default="", help="local facebook/encodec_32khz folder; default random-init")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.key and not args.shards:
        print("discomv generate: --key needs --shards", file=sys.stderr)
        return 2
    model, checkpoint = load_model(Path(args.checkpoint), use_ema=not args.raw_weights)
    if args.features:
        features = np.load(args.features, allow_pickle=False)
    else:
        features = find_sample(args.shards, args.key)["hiera"]
    video = torch.from_numpy(features.astype(np.float32))[None]
    steps = args.steps or model.cfg.max_steps
    if steps > model.cfg.max_steps or features.shape[0] > model.cfg.max_frames:
        print(f"discomv generate: the model was trained for at most {model.cfg.max_steps} steps and "
              f"{model.cfg.max_frames} video frames; got {steps} steps, {features.shape[0]} frames", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    tokens = model.generate(video, steps, args.top_k, args.temperature, generator)[0]

    encodec, encodec_stamp = load_encodec(args.encodec, model.codebook_table, args.seed)
    out = Path(args.out)
    write_wav(out, decode_to_audio(encodec, tokens))
    provenance = {
        "checkpoint": str(args.checkpoint), "step": checkpoint["step"], "key": args.key, "features": args.features,
        "weights": "raw" if args.raw_weights else "ema", "codebook": checkpoint["codebook"],
        "encodec": encodec_stamp, "steps": steps, "top_k": args.top_k, "temperature": args.temperature,
        "seed": args.seed, "sample_rate": SAMPLE_RATE,
    }
    out.with_name(out.name + ".json").write_text(json.dumps(provenance, indent=2))
    print(f"wrote {out} ({steps * HOP_LENGTH / SAMPLE_RATE:.2f} s, encodec {encodec_stamp})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
