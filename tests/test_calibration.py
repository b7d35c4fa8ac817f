"""Temperature scaling: fitted T, folded into the head (argmax unchanged, probabilities = softmax(logits / T))."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_args
from tuneloop.calibration import brier_score, expected_calibration_error, fit_temperature, fold_temperature
from tuneloop.cli import main


def test_fit_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(20000, 3))
    # Labels drawn from softmax(logits / 2.5): the logits are 2.5x overconfident.
    probs = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum(-1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_ece_and_brier_known_values():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    # bins: 0.9 -> acc 1 (gap 0.1); 0.8 -> acc 0 (gap 0.8); 0.7 -> acc 1 (gap 0.3); 0.6 -> acc 1 (gap 0.4)
    assert expected_calibration_error(probs, labels) == pytest.approx((0.1 + 0.8 + 0.3 + 0.4) / 4)
    assert brier_score(probs, labels) == pytest.approx((0.02 + 1.28 + 0.18 + 0.32) / 4)


def test_folding_divides_the_logits(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    batch = AutoTokenizer.from_pretrained(tiny_model_dir)(["a cat", "the dog sat", "rain"], padding=True,
                                                          return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
        fold_temperature(model, 2.5, 2)
        after = model(**batch).logits
    torch.testing.assert_close(after, before / 2.5)


def test_calibrated_model_is_the_uncalibrated_one_divided_by_t(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    from transformers import pipeline

    plain, calibrated = tmp_path / "plain", tmp_path / "calibrated"
    common = ("--report-to", "none", "--epochs", "2", "--checkpoint-every-epoch", "false")
    assert main(tiny_args(tiny_model_dir, mrpc_slice, plain, *common)) == 0
    assert main(tiny_args(tiny_model_dir, mrpc_slice, calibrated, *common, "--calibrate")) == 0
    capsys.readouterr()
    record = json.loads((calibrated / "calibration.json").read_text())
    results = json.loads((calibrated / "eval_results.json").read_text())
    t = record["temperature"]
    assert t > 0 and results["temperature"] == t and record["num_examples"] == 40
    assert {"ece_before", "ece_after", "brier_before", "brier_after"} <= set(results)
    # Same seed: the same training; calibration changed the probabilities only.
    assert results["accuracy"] == json.loads((plain / "eval_results.json").read_text())["accuracy"]
    texts = [{"text": "The cat sat on the mat .", "text_pair": "A cat was sitting on the mat ."},
             {"text": "Stocks fell sharply on Monday .", "text_pair": "He plays the violin ."}]
    with torch.no_grad():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(plain / "model")
        enc = tok([r["text"] for r in texts], [r["text_pair"] for r in texts], padding=True, return_tensors="pt")
        logits = AutoModelForSequenceClassification.from_pretrained(plain / "model").eval()(**enc).logits
    expected = (logits / t).softmax(-1)
    pipe = pipeline("text-classification", model=str(calibrated / "model"), top_k=None)
    for row, probs in zip(texts, expected):
        scores = {s["label"]: s["score"] for s in pipe(row)}
        assert [scores["not_equivalent"], scores["equivalent"]] == pytest.approx(probs.tolist(), abs=1e-5)
    # The saved predictions' argmax equals the uncalibrated run's.
    preds = lambda run: [json.loads(l)["prediction"] for l in (run / "predictions.jsonl").read_text().splitlines()[1:]]
    assert preds(calibrated) == preds(plain)
    assert main(["report", str(calibrated)]) == 0
    assert 'alt="reliability diagram"' in (calibrated / "report.html").read_text()


def test_calibrate_on_regression_is_one_line(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "reg.csv"
    data.write_text("text,label\n" + "".join(f"sentence number {i},{i / 7:.3f}\n" for i in range(12)))
    code = main(["train", "--task", "null", "--model", str(tiny_model_dir), "--train-file", str(data), "--validation-file", str(data),
                 "--output-dir", str(tmp_path / "out"), "--calibrate", "--report-to", "none"])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert err.startswith("tuneloop: error: eval.calibrate: temperature scaling calibrates class probabilities")


def test_calibrate_on_a_regression_task_is_refused_before_any_data_is_read():
    from tuneloop.config import Config
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.calibrate: .* stsb is a regression task"):
        Config.from_flags(task="stsb", calibrate=True)
