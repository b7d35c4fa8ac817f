"""AdamW (torch, or 8-bit from bitsandbytes) with decoupled weight decay (none on biases and LayerNorm
weights), per-group learning rates (classifier head, LoRA+ B matrices, layer-wise decay) and the LR schedule."""

from __future__ import annotations

import math

import torch

from tuneloop.config import OptimConfig
from tuneloop.errors import ConfigError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and normalisation weights are excluded, as in BERT's recipe."""
    decay, no_decay = [], []
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d)
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, norm_types) or "norm" in type(module).__name__.lower():
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("bias") or id(p) in no_decay_ids:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def head_parameter_ids(model: torch.nn.Module) -> set[int]:
    """The classifier head's parameters (under PEFT: its trained copy), found as the model's non-encoder children."""
    from tuneloop.adapters import head_module_names

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {id(p) for name in head_module_names(base) for p in getattr(base, name).parameters()}


def layer_decay_factors(model: torch.nn.Module, decay: float | None) -> dict[int, float]:
    """id(parameter) -> decay^(L + 1 - depth) (tuneloop.model.layer_depth); empty when decay is off."""
    if decay is None or decay == 1:
        return {}
    from tuneloop.model import encoder_layers, layer_depth

    layers_name, layers = encoder_layers(model)
    top = len(layers) + 1
    return {id(p): decay ** (top - layer_depth(n, layers_name, len(layers))) for n, p in model.named_parameters()}


def learning_rate_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """`param_groups` split further by learning rate: the body, the head (head_learning_rate), LoRA+ B
    matrices (learning_rate x loraplus_lr_ratio), each scaled by its layer's decay factor (layer_decay).
    The body's decayed group at the full learning_rate stays first: it is the one logged."""
    head = head_parameter_ids(model) if cfg.head_learning_rate is not None else set()
    lora_b = ({id(p) for n, p in model.named_parameters() if ".lora_B." in n}
              if cfg.loraplus_lr_ratio is not None else set())
    factors = layer_decay_factors(model, cfg.layer_decay)

    def lr_of(p):
        if id(p) in head:
            return cfg.head_learning_rate
        base = cfg.learning_rate * cfg.loraplus_lr_ratio if id(p) in lora_b else cfg.learning_rate
        return base * factors.get(id(p), 1.0)

    groups = []
    for base in param_groups(model, cfg.weight_decay):
        by_lr: dict[float, list] = {}
        for p in base["params"]:
            by_lr.setdefault(lr_of(p), []).append(p)
        for lr in sorted(by_lr, key=lambda v: v != cfg.learning_rate):
            groups.append({"params": by_lr[lr], "weight_decay": base["weight_decay"], "lr": lr})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """AdamW as one fused kernel where PyTorch has it for the parameters' device, else multi-tensor;
    `adamw_8bit`: bitsandbytes' blockwise 8-bit AdamW, checked to run on `device` first."""
    groups = learning_rate_groups(model, cfg)
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if cfg.name == "adamw_8bit":
        return adamw_8bit(groups, kwargs, torch.device(device))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # e.g. a device or dtype without a fused implementation
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def adamw_8bit(groups: list[dict], kwargs: dict, device: torch.device) -> torch.optim.Optimizer:
    import logging

    try:
        # bitsandbytes logs about optional 4-bit CPU kernels on import; 8-bit AdamW does not use them.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("optim.name adamw_8bit needs bitsandbytes, which is not installed: "
                          "pip install 'tuneloop[bnb]' (or pip install bitsandbytes)") from None
    # One step on a probe tensor: bitsandbytes raises only at step time where it has no kernel for the device.
    probe = torch.zeros(4096, device=device, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"optim.name adamw_8bit: bitsandbytes {bnb.__version__} has no 8-bit AdamW for device "
                          f"{device.type} ({first}); use --optimizer adamw") from None
    return bnb.optim.AdamW8bit(groups, **kwargs)


def num_training_steps(batches_per_epoch: int, epochs: int, accumulation_steps: int) -> int:
    """Optimizer steps of the whole run: a short last window still steps once per epoch."""
    return math.ceil(batches_per_epoch / accumulation_steps) * epochs


def num_warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup steps: `warmup_steps` as given (an error if it leaves no step after warmup), or `warmup_ratio`
    of the run rounded up and capped below `total_steps`: a ratio is valid for every run length, so a tiny
    dataset (1 optimizer step) trains with no warmup rather than failing."""
    if cfg.warmup_steps > 0:
        if cfg.warmup_steps >= total_steps:
            raise ConfigError(f"optim.warmup_steps: warmup ({cfg.warmup_steps} steps) is not shorter than training "
                              f"({total_steps} optimizer steps)")
        return cfg.warmup_steps
    return max(0, min(math.ceil(cfg.warmup_ratio * total_steps), total_steps - 1))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=num_warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)
