"""Precision in one place: `train.mixed_precision` decides; `auto` picks bf16 only where it is faster than fp32.

`auto` is decided from the device and the model (`resolve_mixed_precision`):
- GPU, hidden size below GPU_BF16_MIN_HIDDEN: tf32 (fp32 weights and activations, matmuls on TF32 tensor
  cores). Autocast adds cast kernels around every linear layer; for small matmuls they cost more than bf16
  saves (H200, MRPC, batch 8: MiniLM, hidden 384, 358 samples/s in fp32 vs 241 in bf16).
- GPU, larger models: bf16 where the GPU has it (Ampere and newer; BERT-base, hidden 768: 267 samples/s vs
  205 in fp32), else fp16 with loss scaling.
- CPU: bf16 where it has AVX512-BF16 or AMX, else fp32 (emulated bf16 is slower than fp32).
Accelerate reads its own precision from `accelerate launch`
(which exports ACCELERATE_MIXED_PRECISION from its config file or flag), but tuneloop passes its value
to `Accelerator(mixed_precision=...)`, which silently wins. Rather than let two settings quietly
differ, tuneloop keeps its value and warns with both.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import yaml

from tuneloop.config import Config
from tuneloop.errors import ConfigError

log = logging.getLogger(__name__)


def _cpu_check(name: str) -> bool:
    """torch.cpu's own capability check `name`; False on a torch without it."""
    return getattr(getattr(torch, "cpu", None), name, lambda: False)()


def cpu_has_amx() -> bool:
    return _cpu_check("_is_amx_tile_supported")


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated and slower."""
    return _cpu_check("_is_avx512_bf16_supported") or cpu_has_amx()


# Smallest hidden size for which `auto` picks bf16 on a GPU. Measured on one H200 (MRPC, batch 8, PyTorch
# 2.11): hidden 384 (MiniLM) is faster in fp32, hidden 768 (BERT-base) in bf16; between them is unmeasured.
GPU_BF16_MIN_HIDDEN = 768


def model_hidden_size(name_or_path: str | None) -> int | None:
    """The width of the model's matmuls, from its config alone (no weights); None if it cannot be read."""
    try:
        from transformers import AutoConfig

        from tuneloop.model import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except Exception:  # offline Hub id, no config: decide by the device alone
        return None
    for name in ("hidden_size", "d_model", "dim", "n_embd"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def resolve_mixed_precision(requested: str, use_cpu: bool | None = None, model: str | None = None,
                            hidden_size: int | None = None) -> str:
    """The concrete precision ('no', 'tf32', 'bf16', 'fp16') for a configured value, resolving 'auto'
    from the device (a GPU unless `use_cpu`) and the model's hidden size (given, or read from `model`)."""
    if requested != "auto":
        return requested
    on_gpu = torch.cuda.is_available() if use_cpu is None else not use_cpu
    if on_gpu:
        hidden = hidden_size if hidden_size is not None else model_hidden_size(model)
        if hidden is not None and hidden < GPU_BF16_MIN_HIDDEN:
            return "tf32"
        # Ampere and newer run bf16 natively (no loss scaling needed); older GPUs get fp16 with scaling.
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"


def accelerate_precision(precision: str) -> str:
    """What Accelerate is given: tf32 is fp32 autocast-wise ('no'), with TF32 matmuls switched on by `apply_tf32`."""
    return "no" if precision == "tf32" else precision


def apply_tf32(precision: str, device_type: str) -> None:
    """tf32 on a GPU: fp32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs, fp32 sums)."""
    if precision == "tf32" and device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def default_accelerate_config() -> Path | None:
    """The file `accelerate config` writes (and `accelerate launch` reads when given no --config_file)."""
    try:
        from accelerate.commands.config import default_config_file
    except ImportError:
        return None
    path = Path(default_config_file)
    return path if path.is_file() else None


def read_accelerate_precision(path: str | Path) -> str | None:
    """`mixed_precision` of an accelerate config file (YAML or JSON); None when it sets none."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"launch.accelerate_config: file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"launch.accelerate_config: cannot read {p}: {e}") from None
    value = data.get("mixed_precision") if isinstance(data, dict) else None
    return str(value).lower() if value is not None else None


def accelerate_precisions(config: Config) -> list[tuple[str, str]]:
    """(where, value) for every Accelerate setting of mixed precision that applies to this run."""
    found = []
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if env:
        found.append(("ACCELERATE_MIXED_PRECISION (set by accelerate launch)", env.lower()))
    path = config.launch.accelerate_config or default_accelerate_config()
    if path:
        value = read_accelerate_precision(path)
        if value is not None:
            found.append((f"accelerate config {path}", value))
    return found


def reconcile_mixed_precision(config: Config, warn: bool = True) -> str:
    """The run's precision: `train.mixed_precision` (resolved if `auto`); a warning names any Accelerate
    setting that differs."""
    requested = config.train.mixed_precision
    ours = resolve_mixed_precision(requested, use_cpu=not torch.cuda.is_available() or config_uses_cpu(config),
                                   model=config.model.name_or_path)
    shown = f"'{requested}'" if requested == ours else f"'{requested}' ({ours} here)"
    if warn:
        for where, value in accelerate_precisions(config):
            if value != accelerate_precision(ours):
                log.warning("mixed precision: %s says '%s' but train.mixed_precision is %s; using '%s' "
                            "(set --mixed-precision to choose)", where, value, shown, ours)
    return ours


def config_uses_cpu(config: Config) -> bool:
    """Whether this run trains on the CPU although a GPU is present (`accelerate launch --cpu` or ACCELERATE_USE_CPU)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def check_device_precision(precision: str, device_type: str, warn: bool = True) -> None:
    """fp16 needs loss scaling, which Accelerate only does on GPUs; on a CPU use bf16."""
    if warn and precision == "fp16" and device_type == "cpu":
        log.warning("mixed precision fp16 on a CPU runs without loss scaling (small gradients can vanish); "
                    "bf16 is the CPU choice")
