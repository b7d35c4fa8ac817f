"""Class-weighted loss and the per-class metrics every classification run reports."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_args
from tuneloop.cli import main
from tuneloop.problems import class_weights, per_class_metrics, weighted_loss


def test_weighted_loss_equals_a_hand_computed_weighted_cross_entropy(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = dict(tok(["a cat", "the dog sat down", "stocks fell", "rain"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    weights = [0.25, 3.0]
    with torch.no_grad():
        loss = weighted_loss(weights, "cpu")(model, batch).item()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.tolist()
    by_hand = 0.0
    for z, y in zip(logits, [0, 1, 1, 0]):
        log_softmax_y = z[y] - math.log(sum(math.exp(v) for v in z))
        by_hand += -weights[y] * log_softmax_y
    assert loss == pytest.approx(by_hand / 4, rel=1e-5)
    # Equal weights of 1 give the model's own loss.
    with torch.no_grad():
        assert weighted_loss([1.0, 1.0], "cpu")(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)


def test_balanced_weights_are_inverse_frequency():
    assert class_weights("balanced", [0, 0, 0, 1], ["a", "b"]) == pytest.approx([4 / 6, 4 / 2])
    assert class_weights("1,5", [0, 1], ["a", "b"]) == [1.0, 5.0]
    assert class_weights("none", [0, 1], ["a", "b"]) is None


def test_per_class_metrics_known_values():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    m = per_class_metrics(preds, labels, ["x", "y", "z"])
    # x: tp 3, fp 1, fn 1; y: tp 1, fp 1, fn 1; z: tp 2
    assert m == pytest.approx({"f1_macro": (0.75 + 0.5 + 1.0) / 3, "precision_x": 0.75, "precision_y": 0.5,
                               "precision_z": 1.0, "recall_x": 0.75, "recall_y": 0.5, "recall_z": 1.0})


def test_balanced_run_logs_saves_and_reports_per_class_metrics(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    from sklearn.metrics import f1_score, precision_score, recall_score

    out = tmp_path / "run"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, out, "--class-weights", "balanced", "--report-to", "none")) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "run_summary.json").read_text())
    train_labels = [line.split("\t")[0] for line in (mrpc_slice / "train.tsv").read_text("utf-8-sig").splitlines()[1:]]
    n, pos = len(train_labels), train_labels.count("1")
    assert summary["class_weights"] == pytest.approx({"not_equivalent": n / (2 * (n - pos)), "equivalent": n / (2 * pos)})
    assert "class weights not_equivalent" in printed
    results = json.loads((out / "eval_results.json").read_text())
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()[1:]]
    y, p = [r["label"] for r in rows], [r["prediction"] for r in rows]
    assert results["f1_macro"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    for name in ("equivalent", "not_equivalent"):
        assert results[f"recall_{name}"] == pytest.approx(recall_score(y, p, pos_label=name, zero_division=0))
        assert results[f"precision_{name}"] == pytest.approx(precision_score(y, p, pos_label=name, zero_division=0))
    card = (out / "model" / "README.md").read_text()
    assert "| class | precision | recall |" in card
    assert f"| equivalent | {results['precision_equivalent']:.4f} | {results['recall_equivalent']:.4f} |" in card


@pytest.mark.parametrize("flags, message", [
    (["--class-weights", "1,2,3"], "train.class_weights: 3 weight(s) given for 2 classes"),
    (["--class-weights", "heavy"], "train.class_weights: give balanced, none or one positive number per class"),
    (["--class-weights", "1,-2"], "train.class_weights: every weight must be a positive number"),
])
def test_bad_class_weights_are_one_line(tiny_model_dir, mrpc_slice, tmp_path, capsys, flags, message):
    code = main(tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "bad", *flags))
    err = capsys.readouterr().err
    assert code != 0 and err.startswith(f"tuneloop: error: {message}") and len(err.strip().splitlines()) == 1
