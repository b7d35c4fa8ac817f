"""What kind of problem a run solves, and what follows from it: the training loss (optionally class-weighted)
and the metrics every classification run reports besides its task's (macro-F1, per-class precision/recall).

Multi-label runs (a list of labels per example) score each label with its own sigmoid, learn with BCE
(`pos_weight` for class weights), predict a label where its score reaches a threshold and report f1_micro,
f1_macro, subset accuracy and each label's F1.

Accuracy hides a neglected minority class: a model that never predicts MRPC's rarer class still scores
its majority share. Macro-F1 and each class's recall show it, so every classification run reports them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from tuneloop.errors import ConfigError, DataError

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


def parse_class_weights(setting: str) -> str | list[float] | None:
    """'balanced' | 'none' | 'w1,w2,...' -> 'balanced', None or the list; anything else is a ConfigError."""
    text = str(setting).strip().lower()
    if text in ("none", "balanced"):
        return None if text == "none" else "balanced"
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"train.class_weights: give balanced, none or one positive number per class "
                          f"(e.g. 1,4), got {setting!r}") from None
    if any(not np.isfinite(w) or w <= 0 for w in weights):
        raise ConfigError(f"train.class_weights: every weight must be a positive number, got {setting!r}")
    return weights


MULTI_LABEL = "multi_label_classification"
DEFAULT_THRESHOLD = 0.5


def is_multi_label(model) -> bool:
    """Whether `model` (plain, PEFT- or DDP-wrapped) scores each label on its own (sigmoid) rather than one class."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "problem_type", None) == MULTI_LABEL


def multi_label_predictions(probs: torch.Tensor, thresholds: list[float] | None = None) -> torch.Tensor:
    """Multi-hot predictions: a label is on where its sigmoid score reaches its threshold (0.5 unless tuned).

    Compared in float64, as a JSON reader compares the stored scores with the stored thresholds."""
    limit = torch.tensor([DEFAULT_THRESHOLD] * probs.shape[-1] if thresholds is None else thresholds,
                         dtype=torch.float64, device=probs.device)
    return (probs.double() >= limit).long()


def pos_weights(setting: str, train_labels, label_names: list[str]) -> list[float] | None:
    """Multi-label `pos_weight` per label: given, or n_negative / n_positive in the training split ('balanced'),
    so that a rare label's few positives weigh as much as its many negatives."""
    parsed = parse_class_weights(setting)
    if parsed is None or isinstance(parsed, list):
        if isinstance(parsed, list) and len(parsed) != len(label_names):
            raise ConfigError(f"train.class_weights: {len(parsed)} weight(s) given for {len(label_names)} labels "
                              f"{label_names}")
        return parsed
    hot = np.asarray([list(row) for row in train_labels], dtype=np.float64)
    positives = hot.sum(0)
    missing = [label_names[i] for i in range(len(label_names)) if positives[i] in (0, len(hot))]
    if missing:
        raise DataError(f"train.class_weights balanced: label(s) {missing} are on in no training example or in all; "
                        f"give the weights (--class-weights w1,w2,...)")
    return [float(w) for w in (len(hot) - positives) / positives]


def pos_weighted_loss(weights: list[float], device) -> LossFn:
    """The model's loss with its BCE swapped for the pos_weight one (mean over examples and labels, as the model's)."""
    w = torch.tensor(weights, dtype=torch.float32, device=device)

    def loss(model, batch: dict) -> torch.Tensor:
        outputs = model(**batch)
        logits, labels = outputs.logits.float(), batch["labels"].float()
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        return outputs.loss - bce(logits, labels) + bce(logits, labels, pos_weight=w)

    return loss


def class_weights(setting: str, train_labels, label_names: list[str] | None) -> list[float] | None:
    """The weight of each class: given, or inverse frequency in the training split (scikit-learn's 'balanced':
    n_examples / (n_classes * count), so the weights average 1 over the training examples and the loss keeps
    its scale)."""
    parsed = parse_class_weights(setting)
    if parsed is None:
        return None
    if label_names is None:
        raise ConfigError("train.class_weights: weights are per class; this is a regression task (use none)")
    n = len(label_names)
    if isinstance(parsed, list):
        if len(parsed) != n:
            raise ConfigError(f"train.class_weights: {len(parsed)} weight(s) given for {n} classes {label_names}")
        return parsed
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(train_labels, dtype=np.int64)
    missing = [label_names[i] for i in range(n) if not (labels == i).any()]
    if missing:
        raise DataError(f"train.class_weights balanced: class(es) {missing} have no training example; "
                        f"give the weights (--class-weights w1,w2,...)")
    return [float(w) for w in compute_class_weight("balanced", classes=np.arange(n), y=labels)]


def model_loss(model, batch: dict) -> torch.Tensor:
    """The model's own loss (cross-entropy, MSE, plus whatever PEFT adds)."""
    return model(**batch).loss


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i w[y_i] * CE_i: the mean over examples, not over weights (torch's `weight=` divides by the batch's
    weight sum), so that a micro-batch's loss still adds up like its share of the examples under accumulation."""
    per_example = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return (per_example * weights[labels]).mean()


def weighted_loss(weights: list[float], device) -> LossFn:
    """The model's loss with its cross-entropy swapped for the class-weighted one; anything else the model adds
    to its loss (AdaLoRA's orthogonality penalty) stays."""
    w = torch.tensor(weights, dtype=torch.float32, device=device)

    def loss(model, batch: dict) -> torch.Tensor:
        outputs = model(**batch)
        labels = batch["labels"]
        plain = torch.nn.functional.cross_entropy(outputs.logits.float(), labels)
        return outputs.loss - plain + weighted_cross_entropy(outputs.logits, labels, w)

    return loss


def build_loss(setting: str, train_labels, label_names: list[str] | None, device,
               multi_label: bool = False) -> tuple[LossFn, list[float] | None]:
    """The loss the loop minimises, and the class weights it uses (None: unweighted; multi-label: pos_weight)."""
    if multi_label:
        weights = pos_weights(setting, train_labels, label_names)
        return (model_loss if weights is None else pos_weighted_loss(weights, device)), weights
    weights = class_weights(setting, train_labels, label_names)
    return (model_loss if weights is None else weighted_loss(weights, device)), weights


def per_class_metrics(predictions: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """f1_macro and each class's precision and recall (scikit-learn; 0 where a class is never predicted)."""
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    precision, recall, _, _ = precision_recall_fscore_support(labels, predictions, labels=list(range(len(label_names))),
                                                              zero_division=0.0)
    out = {"f1_macro": float(f1_score(labels, predictions, average="macro", zero_division=0.0))}
    out.update({f"precision_{name}": float(p) for name, p in zip(label_names, precision)})
    out.update({f"recall_{name}": float(r) for name, r in zip(label_names, recall)})
    if predictions.ndim == 2:  # multi-label: each label's own F1 too
        out.update({f"f1_{name}": float(f) for name, f in zip(label_names, f1_score(labels, predictions, average=None,
                                                                                  zero_division=0.0))})
    return out


def saved_thresholds(model_config) -> list[float] | None:
    """A multi-label model's tuned per-label thresholds (config.json's `tuneloop_thresholds`); None: 0.5 each."""
    return getattr(model_config, "tuneloop_thresholds", None)
