"""Several seeds: the summary's numbers come from the per-seed eval_results.json; compare says when runs differ."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import yaml
from scipy.stats import bootstrap, ttest_ind

from conftest import tiny_args
from tuneloop.cli import main
from tuneloop.seeds import compare_metric


def test_seeds_summary_equals_the_per_seed_results(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    out = tmp_path / "seeds"
    args = tiny_args(tiny_model_dir, mrpc_slice, out, "--seeds", "3,1,2", "--report-to", "none",
                     "--max-train-samples", "24", "--checkpoint-every-epoch", "false")
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "seeds_summary.json").read_text())
    assert summary["seeds"] == [3, 1, 2] and summary["main_metric"] == "f1"
    per_seed = {s: json.loads((out / f"seed-{s}" / "eval_results.json").read_text()) for s in (3, 1, 2)}
    assert [yaml.safe_load((out / f"seed-{s}" / "config.yaml").read_text())["train"]["seed"] for s in (3, 1, 2)] == [3, 1, 2]
    assert list(summary["metrics"]) == ["f1", "accuracy", "f1_macro", "precision_not_equivalent", "precision_equivalent",
                                        "recall_not_equivalent", "recall_equivalent", "loss"]
    for name, m in summary["metrics"].items():
        values = [per_seed[s][name] for s in (3, 1, 2)]
        assert m["values"] == values
        assert m["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert m["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        if m["std"] > 0:
            ci = bootstrap((np.array(values),), np.mean, n_resamples=10_000, method="percentile",
                           rng=np.random.default_rng(0)).confidence_interval
            assert m["ci95"] == pytest.approx([ci.low, ci.high], abs=1e-12)
        else:
            assert m["ci95"] == [m["mean"], m["mean"]]
        assert min(values) - 1e-12 <= m["ci95"][0] <= m["mean"] <= m["ci95"][1] <= max(values) + 1e-12
    loss = summary["metrics"]["loss"]
    assert len(set(loss["values"])) == 3  # the seeds really differ
    row = next(line.split() for line in printed.splitlines() if line.startswith("loss "))
    assert row == ["loss", *(f"{v:.4f}" for v in loss["values"]), f"{loss['mean']:.4f}", f"{loss['std']:.4f}",
                   f"[{loss['ci95'][0]:.4f},", f"{loss['ci95'][1]:.4f}]"]
    card = (out / "seed-1" / "model" / "README.md").read_text()
    assert "seed_spread:" in card and "| mean over seeds |" in card

    # Started again (e.g. after a crash before the summary): finished seeds are reused, not retrained.
    (out / "seeds_summary.json").unlink()
    before = (out / "seed-3" / "metrics.jsonl").read_text()
    assert main(args) == 0
    assert printed.count("already finished") == 0 and capsys.readouterr().out.count("already finished") == 3
    assert (out / "seed-3" / "metrics.jsonl").read_text() == before
    assert json.loads((out / "seeds_summary.json").read_text()) == summary

    # The multi-seed folder has its report: the per-seed table and spread.
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "Seeds 3, 1, 2: spread" in html and f"{summary['metrics']['loss']['mean']:.4f}" in html


def test_repeated_seed_is_one_line(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    assert main(tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "o", "--seeds", "0,1,1")) == 2
    assert capsys.readouterr().err.strip() == \
        "tuneloop: error: --seeds: seed 1 is given twice in '0,1,1'; every seed must differ"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "o", "--seeds", "0,x")) == 2
    assert "'x' is not an integer seed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def write_summary(folder, values):
    folder.mkdir()
    metrics = {"accuracy": {"values": values, "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))}}
    (folder / "seeds_summary.json").write_text(json.dumps({"seeds": list(range(len(values))), "metrics": metrics}))


def test_compare_says_whether_runs_differ_beyond_their_spread(tmp_path, capsys):
    a, b, c = [0.80, 0.81, 0.82], [0.86, 0.87, 0.885], [0.79, 0.83, 0.815]
    write_summary(tmp_path / "a", a)
    write_summary(tmp_path / "b", b)
    write_summary(tmp_path / "c", c)
    r = compare_metric(a, b)
    welch = ttest_ind(b, a, equal_var=False)
    assert r["p_value"] == pytest.approx(welch.pvalue) and r["t"] == pytest.approx(welch.statistic)
    assert r["difference"] == pytest.approx(np.mean(b) - np.mean(a)) and r["differ"]
    assert r["ci95"][0] > 0  # the bootstrap interval of the difference excludes 0 too
    assert not compare_metric(a, c)["differ"]
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "accuracy: A 0.8100 ± 0.0100, B 0.8717" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 0
    assert "no difference beyond the seed spread" in capsys.readouterr().out
    single = tmp_path / "single"
    single.mkdir()
    (single / "eval_results.json").write_text("{}")
    assert main(["compare", str(tmp_path / "a"), str(single)]) == 1
    assert capsys.readouterr().err.strip() == (f"tuneloop: error: compare: {single} holds no multi-seed run "
                                               f"(seeds_summary.json missing) (a single run: train it with "
                                               f"--seeds 0,1,2 to measure its spread)")


def _tuneloop(args):
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tuneloop", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_seeds_killed_at_random_moments_then_the_same_command_gives_the_uninterrupted_summary(
        tiny_dropout_model_dir, mrpc_slice, tmp_path):
    import random
    import signal
    import time

    def args(out):
        return tiny_args(tiny_dropout_model_dir, mrpc_slice, out, "--seeds", "0,1", "--report-to", "none",
                         "--max-train-samples", "24", "--max-eval-samples", "16", "--checkpoint-every", "1")

    assert main(args(tmp_path / "reference")) == 0
    reference = json.loads((tmp_path / "reference" / "seeds_summary.json").read_text())
    out, rng = tmp_path / "killed", random.Random(0)
    for _ in range(3):  # kill -9 at a random moment after the first seed has started
        proc = _tuneloop(args(out))
        deadline = time.time() + 120
        while not (out / "seed-0" / "config.yaml").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 5.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    proc = _tuneloop(args(out))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert json.loads((out / "seeds_summary.json").read_text()) == reference
    for seed in (0, 1):
        steps = [json.loads(l)["step"] for l in (out / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()
                 if '"train"' in l]
        assert steps == sorted(set(steps))  # no step logged twice by a resumed seed


def test_an_empty_predictions_file_does_not_count_as_a_finished_seed(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    out = tmp_path / "seeds"
    args = tiny_args(tiny_model_dir, mrpc_slice, out, "--seeds", "0,1", "--report-to", "none",
                     "--max-train-samples", "16", "--max-eval-samples", "8")
    assert main(args) == 0
    summary = json.loads((out / "seeds_summary.json").read_text())
    predictions = (out / "seed-1" / "predictions.jsonl").read_text()
    (out / "seed-1" / "predictions.jsonl").write_text("")  # as a kill during an in-place write left it
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "seed 0 (1/2) already finished" in printed and "seed 1 (2/2) did not finish" in printed
    assert (out / "seed-1" / "predictions.jsonl").read_text() == predictions
    assert json.loads((out / "seeds_summary.json").read_text()) == summary


def test_seed_and_seeds_together_is_one_line(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    """Before: --seed 3 --seeds 0,1 trained seeds 0 and 1 and dropped the 3 without a word."""
    assert main(tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "out", "--seed", "3", "--seeds", "0,1")) == 2
    assert capsys.readouterr().err.strip() == ("tuneloop: error: train.seed: --seeds sets each run's seed, so --seed 3 "
                                               "would apply to none; drop one of them")
    assert not (tmp_path / "out").exists()
