"""Tracking: TensorBoard's own event reader loads the scalars that metrics.jsonl holds; nothing else switched on."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_args
from tuneloop.cli import main


def test_tensorboard_events_hold_the_metrics_jsonl_scalars(tiny_model_dir, mrpc_slice, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, out, "--eval-every", "3")) == 0  # report_to auto: TensorBoard
    # (Accelerate's add_hparams writes the config into a subfolder; the scalars are in the run's own folder.)
    acc = EventAccumulator(str(out / "tensorboard" / "tuneloop"), size_guidance={"scalars": 0})
    acc.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for r in records:
        if r["type"] in ("train", "eval"):
            for k, v in r.items():
                if k not in ("type", "step") and isinstance(v, (int, float)):
                    expected.setdefault(f"{r['type']}/{k}", []).append((r["step"], v))
    assert set(acc.Tags()["scalars"]) == set(expected)
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/f1", "eval/loss"} <= set(expected)
    for tag, values in expected.items():
        logged = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in logged] == [s for s, _ in values]
        assert [v for _, v in logged] == pytest.approx([v for _, v in values], rel=1e-6)  # stored as float32


def test_report_to_none_and_missing_trackers(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, out, "--report-to", "none", "--max-train-samples", "8")) == 0
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()
    capsys.readouterr()
    assert main(tiny_args(tiny_model_dir, mrpc_slice, out, "--report-to", "tensorbord")) == 2
    assert capsys.readouterr().err.strip() == ("tuneloop: error: output.report_to: unknown tracker 'tensorbord' "
                                               "(did you mean 'tensorboard'?); one of auto, none, tensorboard, mlflow, wandb")
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        assert main(tiny_args(tiny_model_dir, mrpc_slice, out, "--report-to", "tensorboard,mlflow")) == 2
        assert capsys.readouterr().err.strip() == ("tuneloop: error: output.report_to: mlflow is not installed "
                                                   "(pip install 'tuneloop[mlflow]')")


def test_wandb_offline_run_gets_the_same_scalars(tiny_model_dir, mrpc_slice, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no server here: W&B writes its run files locally
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, out, "--report-to", "wandb", "--max-train-samples", "16",
                          "--epochs", "2")) == 0
    assert not (out / "tensorboard").exists()
    # wandb has no Python reader for its offline log; its protobuf keeps keys and JSON values as plain bytes.
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    raw = log.read_bytes()
    final_eval = json.loads((out / "eval_results.json").read_text())
    assert raw.count(b"eval/accuracy") >= 2 and raw.count(b"train/loss") >= 2  # 2 evaluations, 2+ log lines
    assert json.dumps(final_eval["accuracy"]).encode() in raw and json.dumps(final_eval["loss"]).encode() in raw


def test_mlflow_store_holds_the_config_and_every_metrics_jsonl_scalar(tiny_model_dir, mrpc_slice, tmp_path, monkeypatch):
    """A real MLflow store (SQLite, in a temp folder): MLflow's own client reads back the resolved config as the
    run's parameters and every scalar of metrics.jsonl at its step."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    import yaml

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, out, "--report-to", "mlflow", "--eval-every", "3")) == 0
    assert not (out / "tensorboard").exists()  # only what was asked for

    client = MlflowClient(tracking_uri=uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "tuneloop"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"  # named after the output folder
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert run.data.params == {f"{section}.{k}": str(v) for section, values in resolved.items() for k, v in values.items()}

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for r in records:
        if r["type"] in ("train", "eval"):
            for k, v in r.items():
                if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    expected.setdefault(f"{r['type']}/{k}", []).append((r["step"], v))
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/f1", "eval/loss"} <= set(expected)
    assert set(run.data.metrics) == set(expected)
    for key, values in expected.items():
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        assert [m.step for m in history] == [s for s, _ in values]
        assert [m.value for m in history] == pytest.approx([v for _, v in values], rel=1e-12)
