"""Settings that help only one kind of device, resolved per device at setup.

A recipe says what it wants (`--config fast`: fast, within the memory the course loop needs); how to get
there depends on the device. Settings that change no hyperparameter (attention kernel, dropout mask
generator) default to `auto`, so every run gets its device's fastest step, not only `--config fast`. Every `auto` below becomes a concrete value before training starts, and the
resolved config is the one written to the run's config.yaml and to every checkpoint.

Three kinds of device, because they differ in what is cheap:
- `gpu`: memory to spare at MRPC sizes, launch-bound small steps, fused SDPA kernels;
- `cpu-bf16`: a CPU with AVX512-BF16 or AMX, where bf16 matmuls beat fp32;
- `cpu`: a CPU without them (AVX2), where bf16 is emulated.

| setting (auto) | gpu | cpu-bf16 | cpu |
|---|---|---|---|
| train.mixed_precision | tf32 below hidden 768, else bf16 (fp16 without bf16) | bf16 | no |
| train.gradient_checkpointing | false | true (false when forced to fp32) | false |
| model.attn_implementation | sdpa | lean | lean |
| model.dropout_masks | torch | fast | fast |

Gradient checkpointing trades one more forward per step for memory. On a bf16 CPU it keeps the fast
recipe's batch 32 under the course loop's peak RSS at nearly no cost (fast dropout masks pay for the
recomputation); on an AVX2-only CPU it made `--config fast` slower (1,600 MRPC pairs, 1 epoch, 2 cores:
137 s with it, 101 s without); a GPU has the memory and gains nothing.
"""

from __future__ import annotations

import copy
import logging

from tuneloop.config import Config
from tuneloop.precision import cpu_has_fast_bf16, resolve_mixed_precision

log = logging.getLogger(__name__)

DEVICE_KINDS = ("gpu", "cpu-bf16", "cpu")

CHECKPOINTING = {"gpu": False, "cpu-bf16": True, "cpu": False}
ATTENTION = {"gpu": "sdpa", "cpu-bf16": "lean", "cpu": "lean"}
DROPOUT_MASKS = {"gpu": "torch", "cpu-bf16": "fast", "cpu": "fast"}


def device_kind(device_type: str) -> str:
    """`gpu` for any accelerator, else `cpu-bf16` or `cpu` by the CPU's bf16 support."""
    if device_type != "cpu":
        return "gpu"
    return "cpu-bf16" if cpu_has_fast_bf16() else "cpu"


# The settings resolve_for_device replaces when they are `auto`: a run's config.yaml holds the device's value.
AUTO_RESOLVED = ("train.mixed_precision", "train.gradient_checkpointing", "model.attn_implementation",
                 "model.dropout_masks")


def resolve_for_device(config: Config, device_type: str) -> Config:
    """A copy of `config` with every device-dependent `auto` replaced by this device's value."""
    resolved = copy.deepcopy(config)
    kind = device_kind(device_type)
    t, m = resolved.train, resolved.model
    if t.mixed_precision == "auto":
        t.mixed_precision = resolve_mixed_precision("auto", use_cpu=device_type == "cpu", model=m.name_or_path) \
            if device_type in ("cpu", "cuda") else "no"
    if kind == "cpu-bf16" and t.mixed_precision == "no":
        # A bf16 CPU forced to fp32 steps like a CPU without bf16: recomputing an fp32 step only costs (1,600 MRPC
        # pairs, 1 epoch, --config fast in fp32: 85.3 s of training checkpointed, the course hparams' 71.0 s without).
        kind = "cpu"
    if t.gradient_checkpointing == "auto":
        t.gradient_checkpointing = CHECKPOINTING[kind]
    if m.attn_implementation == "auto":
        m.attn_implementation = ATTENTION[kind]
    if m.dropout_masks == "auto":
        m.dropout_masks = DROPOUT_MASKS[kind]
    explain_unused(resolved, device_type)
    return resolved


def explain_unused(config: Config, device_type: str) -> None:
    """One line for each setting that this device cannot honour, rather than quietly training otherwise."""
    if config.train.mixed_precision == "tf32" and device_type != "cuda":
        log.warning("train.mixed_precision tf32 uses a GPU's TF32 matmuls; on this %s device it trains in fp32 "
                    "(as 'no')", device_type)
    if config.model.dropout_masks == "fast" and device_type != "cpu":
        log.warning("model.dropout_masks fast applies on CPUs; on this %s device dropout draws torch's masks",
                    device_type)
