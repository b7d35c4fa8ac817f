"""Precision in one place: `train.mixed_precision` decides; `auto` picks bf16 only where the hardware runs it fast.

`auto` resolves to bf16 on CPUs with AVX512-BF16/AMX and on Ampere-or-newer GPUs, fp16 (with loss
scaling) on older GPUs, fp32 elsewhere. Accelerate reads its own precision from `accelerate launch`
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
    ours = resolve_mixed_precision(requested)
    shown = f"'{requested}'" if requested == ours else f"'{requested}' ({ours} here)"
    if warn:
        for where, value in accelerate_precisions(config):
            if value != ours:
                log.warning("mixed precision: %s says '%s' but train.mixed_precision is %s; using '%s' "
                            "(set --mixed-precision to choose)", where, value, shown, ours)
    return ours


def check_device_precision(precision: str, device_type: str, warn: bool = True) -> None:
    """fp16 needs loss scaling, which Accelerate only does on GPUs; on a CPU use bf16."""
    if warn and precision == "fp16" and device_type == "cpu":
        log.warning("mixed precision fp16 on a CPU runs without loss scaling (small gradients can vanish); "
                    "bf16 is the CPU choice")
