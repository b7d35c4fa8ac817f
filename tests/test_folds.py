"""K-fold cross-validation: every training example predicted once out of fold; a killed run continues."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import tiny_args
from tuneloop.cli import main
from tuneloop.folds import assign_folds


def test_stratified_folds_cover_every_example_once_with_the_class_balance():
    labels = np.array([0] * 30 + [1] * 10)
    folds = assign_folds(labels, 40, 5, seed=0)
    assert sorted(np.bincount(folds).tolist()) == [8] * 5
    for i in range(5):
        assert (labels[folds == i] == 1).sum() == 2  # 10 positives over 5 folds
    assert not (assign_folds(labels, 40, 5, seed=1) == folds).all()


def _train_labels(data_dir, n):
    names = {"0": "not_equivalent", "1": "equivalent"}
    lines = (data_dir / "train.tsv").read_text("utf-8-sig").splitlines()[1:n + 1]
    return [names[line.split("\t")[0]] for line in lines]


PAUSE_IN_FOLD_1 = """
import pathlib, sys, time
import tuneloop.loop as loop
original = loop.save_checkpoint
def save_then_pause_in_fold_1(run, metric=None):
    path = original(run, metric)
    if "fold-1" in path.parts:
        pathlib.Path(sys.argv[-1]).write_text("fold 1 has a checkpoint")
        time.sleep(120)
    return path
loop.save_checkpoint = save_then_pause_in_fold_1
from tuneloop.cli import main
sys.exit(main(sys.argv[1:-1]))
"""


def test_killed_k_fold_run_continues_and_equals_an_uninterrupted_one(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    from sklearn.metrics import accuracy_score, f1_score

    flags = ("--folds", "3", "--epochs", "2", "--checkpoint-every", "1", "--report-to", "none",
             "--max-train-samples", "36")
    whole = tmp_path / "whole"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, whole, *flags)) == 0
    printed = capsys.readouterr().out
    assert "3-fold cross-validation" in printed and "out-of-fold, all training examples pooled" in printed
    oof = [json.loads(l) for l in (whole / "oof_predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in oof] == list(range(36))  # every training example exactly once, in order
    assert [r["label"] for r in oof] == _train_labels(mrpc_slice, 36)
    summary = json.loads((whole / "folds_summary.json").read_text())
    assert summary["folds"] == [0, 1, 2] and summary["fold_sizes"] == [12, 12, 12] and summary["stratified"]
    per_fold = [json.loads((whole / f"fold-{i}" / "eval_results.json").read_text()) for i in range(3)]
    assert summary["metrics"]["f1"]["values"] == [r["f1"] for r in per_fold]
    assert summary["metrics"]["f1"]["mean"] == pytest.approx(np.mean([r["f1"] for r in per_fold]))
    assert {r["fold"] for r in oof} == {0, 1, 2} and all(r["num_examples"] == 12 for r in per_fold)
    y, p = [r["label"] for r in oof], [r["prediction"] for r in oof]
    assert summary["out_of_fold"]["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert summary["out_of_fold"]["f1"] == pytest.approx(f1_score(y, p, pos_label="equivalent"))

    # Killed while fold 1 trains (it has a checkpoint), then the same command again. The first run holds still
    # after fold 1's first checkpoint (PAUSE_IN_FOLD_1), so the kill lands there however loaded the machine is.
    killed, marker = tmp_path / "killed", tmp_path / "marker"
    args = tiny_args(tiny_model_dir, mrpc_slice, killed, *flags)
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_FOLD_1, *args, str(marker)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ})
    deadline = time.time() + 300
    while not marker.exists():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    cmd = [sys.executable, "-m", "tuneloop", *args]
    assert (killed / "fold-0" / "eval_results.json").is_file() and not (killed / "fold-2").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert rerun.returncode == 0, rerun.stderr
    assert "fold 0 (1/3) already finished" in rerun.stdout
    assert "fold 1 (2/3) stopped before its end; resuming it" in rerun.stdout
    assert (killed / "oof_predictions.jsonl").read_text() == (whole / "oof_predictions.jsonl").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--folds", "1"], "--folds: cross-validation needs at least 2 folds, got 1"),
    (["--folds", "three"], "--folds: expected an integer number of folds"),
    (["--folds", "2", "--seeds", "0,1"], "--folds: give it alone"),
])
def test_bad_folds_are_one_line(tiny_model_dir, mrpc_slice, tmp_path, capsys, flags, message):
    code = main(tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "bad", *flags))
    err = capsys.readouterr().err
    assert code != 0 and err.startswith(f"tuneloop: error: {message}") and len(err.strip().splitlines()) == 1
