"""LoRA and AdaLoRA through PEFT: `prepare_model(model, cfg.peft)` returns the model the loop trains.

The base model is frozen and the adapters plus the classifier head (PEFT's `modules_to_save`) train.
The loop stays the same loop: AdaLoRA's orthogonal regulariser is added to the loss by PEFT's own
forward, and its rank budget moves once per optimizer step through `AdaLoraBudget.step`. Checkpoints of
an adapter run hold only the trained tensors (`keep_trainable_in_checkpoints`). Saved runs: `OUT/model/`
holds what `AutoPeftModelForSequenceClassification.from_pretrained` loads plus the model config with the
label names; `OUT/model-merged/` (`--merge-adapter`) is a plain transformers model.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from tuneloop.config import PeftConfig
from tuneloop.errors import TuneloopError

ADAPTER_CONFIG = "adapter_config.json"

# Linear layers worth adapting, by architecture family; the first family whose names the model has wins.
TARGET_MODULES = {
    "bert": ["query", "key", "value", "dense"],  # BERT, RoBERTa, ELECTRA, MiniLM
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}


def head_module_names(model) -> list[str]:
    """The task head: top-level children of a `...ForSequenceClassification` model outside its encoder."""
    base = getattr(model, "base_model_prefix", None)
    return [name for name, child in model.named_children()
            if name != base and any(True for _ in child.parameters())]


def linear_names(model, heads: list[str]) -> list[str]:
    """Full names of the Linear layers outside the head."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in heads]


def resolve_target_modules(model, requested: list[str] | None) -> list[str]:
    """Full names of the layers to adapt; a requested name the model lacks is an error naming what exists."""
    heads = head_module_names(model)
    linears = linear_names(model, heads)
    short = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if requested is None:
        for names in TARGET_MODULES.values():
            if all(n in short for n in names):
                requested = names
                break
        else:  # an unknown architecture: every Linear layer outside the head
            return linears
    missing = [n for n in requested if n not in short and n not in linears]
    if missing:
        raise TuneloopError(f"peft.lora_target_modules: {type(model).__name__} has no Linear layer named "
                            f"{', '.join(repr(m) for m in missing)} (its Linear layers outside the head: "
                            f"{', '.join(short)})")
    return [n for n in linears if n in requested or n.rsplit(".", 1)[-1] in requested]


def peft_config(model, cfg: PeftConfig, num_training_steps: int):
    from peft import AdaLoraConfig, LoraConfig, TaskType

    common = dict(task_type=TaskType.SEQ_CLS, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                  target_modules=resolve_target_modules(model, cfg.lora_target_modules),
                  modules_to_save=head_module_names(model))
    if cfg.method == "lora":
        return LoraConfig(r=cfg.lora_rank, **common)
    # AdaLoRA's schedule counts tuneloop's optimizer steps (the loop calls it once per step).
    tinit = math.floor(cfg.adalora_warmup_fraction * num_training_steps)
    tfinal = math.floor(cfg.adalora_final_fraction * num_training_steps)
    if tinit >= num_training_steps - tfinal:
        raise TuneloopError(f"peft.adalora_warmup_fraction: no steps left to shrink the rank budget in "
                            f"({num_training_steps} optimizer steps); train longer or lower the fractions")
    return AdaLoraConfig(init_r=cfg.adalora_init_rank, target_r=cfg.adalora_target_rank, tinit=tinit, tfinal=tfinal,
                         deltaT=cfg.adalora_update_every, total_step=num_training_steps,
                         orth_reg_weight=cfg.adalora_orth_reg_weight, **common)


def prepare_model(model, cfg: PeftConfig, num_training_steps: int):
    """The model to train: unchanged for `method: none`, else wrapped by PEFT with only adapters and head trainable."""
    if cfg.method == "none":
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(model, cfg, num_training_steps))


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's copy of the original head is counted once, as PEFT counts."""
    if is_peft_model(model):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_parameters(model) -> str:
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"


class AdaLoraBudget:
    """AdaLoRA's rank allocator as a checkpointable object: importance averages and rank pattern survive a resume."""

    def __init__(self, model):
        self.peft_model = model
        self.adalora = model.base_model

    def step(self, global_step: int) -> None:
        """Call after `optimizer.step()` and before `zero_grad()`: the allocator scores the step's gradients."""
        self.adalora.update_and_allocate(global_step)

    def _config(self):
        return self.adalora.peft_config[self.adalora.trainable_adapter_name]

    def state_dict(self) -> dict:
        alloc = self.adalora.rankallocator
        return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
                "rank_pattern": self._config().rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        alloc = self.adalora.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
        self._config().rank_pattern = state["rank_pattern"]

    def ranks(self) -> dict[str, int]:
        """Rank each adapted layer has now (entries of its singular-value vector not masked to zero)."""
        name = self.adalora.trainable_adapter_name
        return {n: int((p != 0).sum()) for n, p in self.peft_model.named_parameters() if f"lora_E.{name}" in n}


def rank_budget(model) -> AdaLoraBudget | None:
    if is_peft_model(model) and hasattr(model.base_model, "rankallocator"):
        return AdaLoraBudget(model)
    return None


def keep_trainable_in_checkpoints(accelerator) -> None:
    """Checkpoints hold only trained tensors: the frozen base is reloaded from its source on resume."""

    def hook(models, weights, output_dir):
        for model, state in zip(models, weights):
            trained = {name for name, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in trained]:
                del state[key]

    accelerator.register_save_state_pre_hook(hook)


def save_adapter(model, tokenizer, target: Path) -> None:
    """Adapter + head (`adapter_model.safetensors`), the model config with label names, and the tokenizer."""
    model.save_pretrained(target)
    model.get_base_model().config.save_pretrained(target)
    tokenizer.save_pretrained(target)


def save_merged(model, tokenizer, target: Path) -> None:
    """The adapters folded into the weights: a plain transformers model (run at the very end: it unwraps the model)."""
    merged = model.merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter_model(model_dir: str | Path, label_names: list[str] | None, merge: bool = True):
    """A saved adapter folder as a model: its base model with the labels, adapters loaded (and merged for speed)."""
    from peft import PeftModel

    from tuneloop.model import build_model

    base_path = json.loads((Path(model_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    if base_path and not Path(base_path).exists() and base_path.startswith(("/", ".", "~")):
        raise TuneloopError(f"{model_dir} is an adapter whose base model {base_path} no longer exists; "
                            f"edit base_model_name_or_path in {ADAPTER_CONFIG} or use the run's model-merged/ folder")
    base = build_model(base_path, label_names)
    try:
        with warnings.catch_warnings():
            # PEFT 0.21 checks AdaLoRA's rank_pattern keys ("<layer>.lora_E") against module names and warns that
            # all of them were ignored, while AdaLoRA's own loading applies them (every saved shape loads).
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            model = PeftModel.from_pretrained(base, str(model_dir))
    except Exception as e:
        raise TuneloopError(f"cannot load the adapter in {model_dir}: {str(e).splitlines()[0]}") from None
    return model.merge_and_unload() if merge else model
