"""Early stopping on the main metric, and the best evaluation's weights as the saved model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from conftest import load_weights, tiny_args
from tuneloop.cli import main
from tuneloop.config import Config
from tuneloop.early_stopping import after_evaluation
from tuneloop.loop import TrainingState, record_evaluation


def test_stops_at_the_expected_evaluation_of_a_constructed_sequence():
    config = Config()
    config.eval.early_stopping_patience = 2
    logged = []
    run = SimpleNamespace(config=config, state=TrainingState(), main_metric="f1", log=logged.append,
                          accelerator=SimpleNamespace(is_main_process=False), best_weights=None)
    scores = [0.50, 0.60, 0.60, 0.55, 0.70, 0.80]  # a tie is no improvement: patience runs out at 0.55
    stopped_at = None
    for i, score in enumerate(scores):
        run.state.step = 10 * (i + 1)
        record_evaluation(run, {"f1": score})
        if after_evaluation(run):
            stopped_at = run.state.step
            break
    assert stopped_at == 40 and run.state.best_step == 20 and run.state.best_metric == 0.60
    assert [r["f1"] for r in logged] == scores[:4]

    config.eval.early_stopping_patience = None  # never stops, still counts
    run.state = TrainingState()
    for i, score in enumerate(scores):
        run.state.step = i + 1
        record_evaluation(run, {"f1": score})
        assert not after_evaluation(run)
    assert run.state.best_step == 6 and run.state.evals_without_improvement == 0


def test_training_stops_early_at_the_expected_step(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    out = tmp_path / "run"
    # A learning rate this small leaves every prediction unchanged: no evaluation after the first is better.
    assert main(tiny_args(tiny_model_dir, mrpc_slice, out, "--epochs", "3", "--learning-rate", "1e-12",
                          "--eval-every", "2", "--early-stopping-patience", "2", "--report-to", "none",
                          "--max-eval-samples", "16")) == 0
    assert "tuneloop: early stopping at optimizer step 6" in capsys.readouterr().out
    results = json.loads((out / "eval_results.json").read_text())
    assert (results["step"], results["best_step"], results["stopped_early"]) == (6, 2, True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [2, 4, 6]
    assert max(r["step"] for r in records if r["type"] == "train") == 6  # of 24 planned


def test_best_model_weights_equal_the_best_checkpoint(tiny_model_dir, mrpc_slice, tmp_path):
    common = ["--epochs", "3", "--learning-rate", "3e-3", "--load-best-model", "--report-to", "none",
              "--max-train-samples", "16", "--max-eval-samples", "16"]
    out = tmp_path / "ckpt"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, out, *common)) == 0
    results = json.loads((out / "eval_results.json").read_text())
    best, last = results["best_step"], results["step"]
    assert best < last  # otherwise this test would prove nothing
    assert results["best_model"] == f"checkpoint step-{best:06d}"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best_eval = next(r for r in evals if r["type"] == "eval" and r["step"] == best)
    assert results["f1"] == best_eval["f1"] and results["loss"] == best_eval["loss"]  # the best model's metrics
    saved = load_weights(out / "model" / "model.safetensors")
    kept = load_weights(out / "checkpoints" / f"step-{best:06d}" / "model.safetensors")
    final = load_weights(out / "checkpoints" / f"step-{last:06d}" / "model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    assert any(not torch.equal(saved[k], final[k]) for k in saved)

    # Without checkpoints the best weights are kept in memory: the same model comes out.
    mem = tmp_path / "memory"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, mem, *common, "--checkpoint-every-epoch", "false")) == 0
    assert json.loads((mem / "eval_results.json").read_text())["best_model"] == "in-memory copy"
    assert not (mem / "checkpoints").exists()
    again = load_weights(mem / "model" / "model.safetensors")
    assert all(torch.equal(saved[k], again[k]) for k in saved)
