"""Training FLOPs, the machine's matmul peak and model FLOPs utilisation (MFU).

Training FLOPs of one example of real length l (PaLM appendix B, Chinchilla's approximation):
    6 * N * l            forward + backward through every non-embedding weight (N of them), per real token
  + 12 * L * H * l * l   attention scores and their weighted sum (QK^T and AV: 2 matmuls, 2 FLOPs per
                         multiply-add, x3 for forward + backward) over the example's own l tokens
with L layers of hidden size H. Only real tokens count, and attention only over an example's own real
tokens: padding is work the hardware does but the model does not need, so a padded row shows up as a
lower MFU. Summed over the examples trained: 6*N*real_tokens + 12*L*H*sum(l**2).

MFU = (training FLOPs / training seconds) / peak, where peak is the best of a few large square matmuls
in the precision the row trains in (fp32 rows: fp32 matmul; bf16 autocast rows: bf16 matmul), measured
in the same benchmark invocation.
"""

from __future__ import annotations

import time
from typing import Any


def non_embedding_params(model) -> int:
    """All parameters except those of embedding tables (word, position, token type)."""
    import torch

    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding)


def model_shape(model_path: str, num_labels: int = 2) -> dict[str, Any]:
    """Parameter counts, layers and hidden size of the sequence classifier, built on the meta device
    (no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_path, num_labels=num_labels)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return {"params": sum(p.numel() for p in model.parameters()), "non_embedding_params": non_embedding_params(model),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def training_flops(non_embedding: int, layers: int, hidden: int, real_tokens: int, sum_sq_len: int) -> float:
    """6 * N * real tokens + 12 * L * H * sum over examples of real_length**2."""
    return 6.0 * non_embedding * real_tokens + 12.0 * layers * hidden * sum_sq_len


def mfu(flops: float, seconds: float, peak_flops_per_second: float) -> float:
    return flops / seconds / peak_flops_per_second


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 10, warmup: int = 3, device: str = "cpu") -> dict[str, Any]:
    """FLOP/s of an n x n x n matmul in fp32, tf32 (fp32 inputs on TF32 tensor cores: GPUs), bf16 or fp16 on
    `device` with torch's default threads: best of `reps` after `warmup` (the best is the least disturbed by
    other work on the machine); the median too. On a GPU each matmul is timed between synchronisations."""
    import torch

    dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype_name == "tf32" else "highest")
    try:
        for _ in range(warmup):
            torch.matmul(a, b)
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_float32_matmul_precision(previous)
    flop = 2.0 * n ** 3
    times.sort()
    return {"dtype": dtype_name, "n": n, "reps": reps, "device": device, "threads": torch.get_num_threads(),
            "peak_flops_per_second": flop / times[0], "median_flops_per_second": flop / times[len(times) // 2]}
