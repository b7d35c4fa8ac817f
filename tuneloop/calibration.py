"""--calibrate: temperature scaling (Guo et al., 2017) fitted on the validation split after training and folded
into the classifier's last layer, so that every loader (`transformers.pipeline` included) gets calibrated
probabilities without knowing about it: softmax(logits / T) where logits / T = (W x + b) / T = (W / T) x + b / T.

Dividing by one positive T never changes the argmax, so predictions and accuracy stay as they were; only the
confidence changes. The before/after expected calibration error (ECE, 15 equal-width confidence bins) and Brier
score are cross-fitted: the validation split is halved at random, T fitted on each half scores the other, so no
example is scored by a temperature that saw it. The temperature folded into the model is fitted on all of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tuneloop.errors import TuneloopError

NUM_BINS = 15
LOG_T_BOUNDS = (-5.0, 5.0)  # T in [0.007, 148]: far beyond any temperature a fine-tuned classifier needs


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    from scipy.special import softmax as scipy_softmax

    return scipy_softmax(logits / temperature, axis=-1)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    from scipy.special import log_softmax

    return float(-log_softmax(logits / temperature, axis=-1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the negative log-likelihood of softmax(logits / T), searched over log T."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                            method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> list[dict[str, float]]:
    """Per equal-width bin of top-class confidence: mean confidence, accuracy and count (empty bins left out)."""
    confidence, predicted = probs.max(-1), probs.argmax(-1)
    which = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
    bins = []
    for b in range(num_bins):
        inside = which == b
        if inside.any():
            bins.append({"low": b / num_bins, "high": (b + 1) / num_bins, "count": int(inside.sum()),
                         "confidence": float(confidence[inside].mean()),
                         "accuracy": float((predicted[inside] == labels[inside]).mean())})
    return bins


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> float:
    """sum over bins of (bin share) x |accuracy - confidence|."""
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(probs, labels, num_bins)) / len(labels))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of sum over classes (p_k - [k == y])^2 (0 is perfect, 2 the worst)."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(-1).mean())


def cross_fitted(logits: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, Any]:
    """Before/after scores where every example's calibrated probability comes from T fitted on the other half."""
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    calibrated = np.empty_like(logits, dtype=np.float64)
    temperatures = []
    for fit_on, score_on in (halves, halves[::-1]):
        t = fit_temperature(logits[fit_on], labels[fit_on])
        temperatures.append(t)
        calibrated[score_on] = softmax(logits[score_on], t)
    before = softmax(logits)
    return {"ece_before": expected_calibration_error(before, labels),
            "ece_after": expected_calibration_error(calibrated, labels),
            "brier_before": brier_score(before, labels), "brier_after": brier_score(calibrated, labels),
            "half_temperatures": temperatures,
            "reliability_before": reliability_bins(before, labels),
            "reliability_after": reliability_bins(calibrated, labels)}


def classifier_layers(model, num_labels: int) -> list[torch.nn.Linear]:
    """The Linear layers that produce the logits: every Linear with `num_labels` outputs (a PEFT head wrapper
    holds two, the trained copy and the original; dividing both keeps them consistent)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not layers:
        raise TuneloopError(f"--calibrate: found no Linear layer with {num_labels} outputs to fold the temperature into")
    return layers


@torch.no_grad()
def fold_temperature(model, temperature: float, num_labels: int) -> None:
    """(W x + b) / T: divide the classifier's last layer by T, in place."""
    for layer in classifier_layers(model, num_labels):
        layer.weight.div_(temperature)
        if layer.bias is not None:
            layer.bias.div_(temperature)


def gathered_logits(model, dataloader, accelerator) -> tuple[np.ndarray, np.ndarray]:
    """Every validation example's logits and label, once each, on every process."""
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in dataloader:
            out, y = accelerator.gather_for_metrics((model(**batch).logits.float(), batch["labels"]))
            logits.append(out.cpu().double().numpy())
            labels.append(y.cpu().numpy())
    return np.concatenate(logits), np.concatenate(labels)


def calibrate(run) -> dict[str, Any]:
    """Fit T on the first validation split, fold it into the model (on every process alike), and return the
    record written to calibration.json."""
    split, dataloader = next(iter(run.eval_dataloaders.items()))
    if "doc" in dataloader.dataset.column_names:  # per document; mean and max commute with dividing by T > 0
        from tuneloop.chunking import document_logits

        _, logits, labels = document_logits(run.model, dataloader, run.accelerator, run.config.data.chunk_aggregation)
    else:
        logits, labels = gathered_logits(run.model, dataloader, run.accelerator)
    temperature = fit_temperature(logits, labels)
    record = {"split": split, "num_examples": int(len(labels)), "temperature": temperature,
              "nll_before": nll(logits, labels, 1.0), "nll_fitted": nll(logits, labels, temperature),
              **cross_fitted(logits, labels, run.config.train.seed)}
    fold_temperature(run.accelerator.unwrap_model(run.model), temperature, logits.shape[1])
    return record


def summary(record: dict[str, Any]) -> dict[str, float]:
    """The scalars that go into eval_results.json (and so into --seeds / --folds summaries)."""
    return {k: record[k] for k in ("temperature", "ece_before", "ece_after", "brier_before", "brier_after")}
