"""Per-label decision thresholds for multi-label models (`--tune-thresholds`).

A sigmoid score of 0.5 is the right cut only for a calibrated model with balanced costs; a rare label is often
best predicted from a lower score. After training, each label's threshold is chosen on the first validation split
to maximise that label's F1, and stored in the model's config.json (`tuneloop_thresholds`, in label-id order), so
`evaluate`, `predict`, `serve` and every later load of the folder cut the scores where it was tuned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tuneloop.evaluate import compute_metrics, predict_batches
from tuneloop.problems import DEFAULT_THRESHOLD, multi_label_predictions

METRICS = ("f1_micro", "f1_macro", "subset_accuracy")


def best_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The threshold that maximises F1 of (scores >= threshold) against truth; midway between the last score on
    and the first off, so that a score on the boundary is not decided by rounding. No positive: 0.5."""
    positives = float(truth.sum())
    if positives == 0:
        return DEFAULT_THRESHOLD
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order].astype(np.float64), truth[order].astype(np.float64)
    f1 = 2 * np.cumsum(y) / (np.arange(1, len(s) + 1) + positives)
    f1[np.r_[s[1:] == s[:-1], False]] = -1.0  # a cut inside a run of equal scores is not a threshold
    k = int(np.argmax(f1))
    return float(s[k] if k == len(s) - 1 else (s[k] + s[k + 1]) / 2)


def scores_and_labels(run) -> tuple[str, np.ndarray, np.ndarray]:
    split, dataloader = next(iter(run.eval_dataloaders.items()))
    scores, labels = [], []
    for _, s, y, _ in predict_batches(run.model, dataloader, run.accelerator, False, thresholds=[DEFAULT_THRESHOLD]
                                      * run.raw.num_labels):
        scores.append(s.cpu())
        labels.append(y.cpu())
    return split, torch.cat(scores).numpy(), torch.cat(labels).numpy()


def tune_thresholds(run) -> dict[str, Any]:
    """Choose, store in the model's config (on every process alike) and return the record of thresholds.json."""
    split, scores, labels = scores_and_labels(run)
    names = run.raw.label_names
    thresholds = [best_threshold(scores[:, j], labels[:, j]) for j in range(len(names))]
    before = multi_label_predictions(torch.from_numpy(scores)).numpy()
    after = multi_label_predictions(torch.from_numpy(scores), thresholds).numpy()
    run.accelerator.unwrap_model(run.model).config.tuneloop_thresholds = thresholds
    return {"split": split, "num_examples": int(len(labels)), "thresholds": dict(zip(names, thresholds)),
            **{f"{k}_before": v for k, v in compute_metrics(METRICS, before, labels).items()},
            **{f"{k}_tuned": v for k, v in compute_metrics(METRICS, after, labels).items()}}


def summary(record: dict[str, Any]) -> dict[str, float]:
    """The scalars that go into eval_results.json: the validation metrics at 0.5 and at the tuned thresholds."""
    return {k: v for k, v in record.items() if k.endswith(("_before", "_tuned"))}
