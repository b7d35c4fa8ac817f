"""`mixed_precision: auto`: bf16 where the hardware runs it fast, fp32 where bf16 would be slower."""

from __future__ import annotations

import torch


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_mixed_precision(requested: str, use_cpu: bool | None = None) -> str:
    """The concrete precision ('no', 'bf16', 'fp16') for a configured value, resolving 'auto'."""
    if requested != "auto":
        return requested
    on_gpu = torch.cuda.is_available() if use_cpu is None else not use_cpu
    if on_gpu:
        # Ampere and newer run bf16 natively (no loss scaling needed); older GPUs get fp16 with scaling.
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"
