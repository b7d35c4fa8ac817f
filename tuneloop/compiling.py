"""torch.compile for training: which mode, how inputs are padded, and CUDA graphs' step marks.

`train.compile: true` compiles with Inductor's default mode. `reduce-overhead` adds CUDA graphs: a whole
forward (and backward) is replayed with one launch, which is what a launch-bound GPU step (batch 8, a
small model) needs. A graph is recorded per input shape, so shapes are bounded: lengths are padded to a
multiple of COMPILE_PAD_MULTIPLE (with max_length 128: four lengths, times the full and the last batch
size), and shapes are compiled static (dynamic=False) with room for that many recompiles. On a CPU,
`reduce-overhead` compiles as the default mode does (CUDA graphs are GPU-only).
"""

from __future__ import annotations

from typing import Any

COMPILE_PAD_MULTIPLE = 32  # reduce-overhead: lengths 32, 64, 96, 128 for max_length 128
RECOMPILE_LIMIT = 64  # training and evaluation shapes, each compiled once


def dynamo_kwargs(compile_setting: bool | str) -> dict[str, Any]:
    """Accelerator(...) arguments for `train.compile`."""
    if not compile_setting:
        return {"dynamo_backend": "no"}
    from accelerate.utils import TorchDynamoPlugin

    mode = None if compile_setting is True else compile_setting
    if mode == "reduce-overhead":
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    return {"dynamo_plugin": TorchDynamoPlugin(backend="inductor", mode=mode,
                                               dynamic=False if mode == "reduce-overhead" else None)}


def compile_padding(compile_setting: bool | str, pad_to_multiple_of: int | None) -> int | None:
    """The multiple lengths are padded to: 8 when compiled (fewer recompiles), 32 with CUDA graphs."""
    if compile_setting == "reduce-overhead":
        return max(pad_to_multiple_of or 1, COMPILE_PAD_MULTIPLE)
    if compile_setting:
        return pad_to_multiple_of or 8
    return pad_to_multiple_of


def mark_cudagraph_steps(model, compile_setting: bool | str) -> None:
    """CUDA graphs reuse their output memory; marking each forward as a new step tells PyTorch the previous
    step's outputs (already reduced to the loss sums) may be overwritten."""
    if compile_setting != "reduce-overhead":
        return
    import torch

    model.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
