"""Which float precision a model runs in: bf16 only where the hardware computes it natively."""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16")


def pick_precision(precision: str, device_type: str) -> str:
    """`auto`: bf16 on CUDA, fp32 elsewhere (EnCodec, Hiera)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def choose_precision(requested: str, native_bf16: bool) -> str:
    """`auto` is bf16 only where the hardware computes it natively: emulated bf16 on an older CPU
    is slower than fp32, not faster (CLIP)."""
    if requested != "auto":
        return requested
    return "bf16" if native_bf16 else "fp32"


def native_bf16(device: str) -> bool:
    """CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX that oneDNN runs bf16 on."""
    import torch

    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    has_instructions = any(
        getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return has_instructions and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
