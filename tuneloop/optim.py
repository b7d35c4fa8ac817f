"""AdamW with decoupled weight decay (none on biases and LayerNorm weights) and the LR schedule."""

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


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW as one fused kernel where PyTorch has it for the parameters' device, else multi-tensor."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # e.g. a device or dtype without a fused implementation
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def num_training_steps(batches_per_epoch: int, epochs: int, accumulation_steps: int) -> int:
    """Optimizer steps of the whole run: a short last window still steps once per epoch."""
    return math.ceil(batches_per_epoch / accumulation_steps) * epochs


def num_warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    if warmup >= total_steps:
        raise ConfigError(f"optim.warmup_steps: warmup ({warmup} steps) is not shorter than training "
                          f"({total_steps} optimizer steps)")
    return warmup


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=num_warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)
