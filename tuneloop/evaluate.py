"""Evaluation: stream predictions batch by batch (never all logits), gather across processes once."""

from __future__ import annotations

import math

import numpy as np
import torch


def compute_metrics(names: tuple[str, ...] | list[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Task metrics from scikit-learn / scipy. Classification: predicted ids; regression: predicted values."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions, average="binary", zero_division=0.0))
        elif name == "f1_micro":
            out[name] = float(f1_score(labels, predictions, average="micro", zero_division=0.0))
        elif name == "subset_accuracy":  # multi-label: every label of the example right
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1_macro":
            out[name] = float(f1_score(labels, predictions, average="macro", zero_division=0.0))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name in ("pearson", "spearman"):
            # A constant prediction has no correlation; report 0 rather than NaN.
            if np.std(predictions) == 0 or np.std(labels) == 0:
                out[name] = 0.0
            else:
                fn = pearsonr if name == "pearson" else spearmanr
                out[name] = float(fn(predictions, labels)[0])
        else:
            raise ValueError(f"unknown metric {name}")
    return out


@torch.no_grad()
def predict_batches(model, dataloader, accelerator, is_regression: bool, thresholds: list[float] | None = None):
    """Yield (predictions, probabilities-or-values, labels-or-None, per-example loss) per gathered batch.

    Multi-label: multi-hot predictions (at `thresholds`, else the model's stored ones) and every label's score."""
    from tuneloop.problems import is_multi_label, multi_label_predictions, saved_thresholds

    multi_label = is_multi_label(accelerator.unwrap_model(model))
    if multi_label and thresholds is None:  # tuned ones stored with the model, else 0.5
        thresholds = saved_thresholds(accelerator.unwrap_model(model).config)
    model.eval()
    for batch in dataloader:
        outputs = model(**batch)
        logits = outputs.logits.float()
        if multi_label:
            scores = logits.sigmoid()
            preds = multi_label_predictions(scores, thresholds)
        elif is_regression:
            preds = scores = logits.squeeze(-1)
        else:
            probs = logits.softmax(-1)
            scores, preds = probs.max(-1)
        labels = batch.get("labels")
        loss_sum = None
        if labels is not None:
            per_example = (torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(),
                                                                                reduction="none").mean(-1)
                           if multi_label else
                           torch.nn.functional.mse_loss(logits.squeeze(-1), labels.float(), reduction="none")
                           if is_regression else
                           torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
            loss_sum, labels = accelerator.gather_for_metrics((per_example, labels))
        preds, scores = accelerator.gather_for_metrics((preds, scores))
        yield preds, scores, labels, loss_sum


def evaluate(model, dataloader, accelerator, metrics: tuple[str, ...], is_regression: bool,
             label_names: list[str] | None = None, aggregation: str = "mean", rows: list | None = None) -> dict[str, float]:
    """Loss and task metrics over one labelled split (with `label_names`, also macro-F1 and per-class
    precision/recall); identical for 1 or N processes. Given a list, `rows` gets each gathered batch's
    (predictions, scores, labels) on the CPU, so the run's predictions.jsonl needs no second pass."""
    from tuneloop.problems import per_class_metrics

    if "doc" in dataloader.dataset.column_names:  # windows of long documents: one row per document
        return evaluate_documents(model, dataloader, accelerator, metrics, is_regression, label_names, aggregation)

    all_preds, all_labels, loss_total, count = [], [], 0.0, 0
    was_training = model.training
    for preds, scores, labels, per_example_loss in predict_batches(model, dataloader, accelerator, is_regression):
        preds, labels = preds.cpu(), labels.cpu()
        if rows is not None:
            rows.append((preds, scores.cpu(), labels))
        all_preds.append(preds.numpy())
        all_labels.append(labels.numpy())
        loss_total += per_example_loss.double().sum().item()
        count += per_example_loss.numel()
    if was_training:
        model.train()
    predictions, labels = np.concatenate(all_preds), np.concatenate(all_labels)
    result = {"loss": loss_total / count if count else math.nan}
    result.update(compute_metrics(metrics, predictions, labels))
    if label_names and not is_regression:
        result.update(per_class_metrics(predictions, labels, label_names))
    result["num_examples"] = int(count)
    return result


def evaluate_documents(model, dataloader, accelerator, metrics: tuple[str, ...], is_regression: bool,
                       label_names: list[str] | None, aggregation: str) -> dict[str, float]:
    """Metrics over documents whose windows' logits are aggregated (tuneloop.chunking): each document once."""
    from tuneloop.chunking import document_logits, document_loss, document_predictions
    from tuneloop.problems import per_class_metrics

    was_training = model.training
    _, logits, labels = document_logits(model, dataloader, accelerator, aggregation)
    if was_training:
        model.train()
    predictions, _ = document_predictions(logits, is_regression)
    result = {"loss": document_loss(logits, labels, is_regression)}
    result.update(compute_metrics(metrics, predictions, labels))
    if label_names and not is_regression:
        result.update(per_class_metrics(predictions, labels, label_names))
    result["num_examples"] = int(len(labels))
    return result
