"""`tuneloop train --folds K`: K-fold cross-validation as a thin driver around `train`, like `--seeds`.

The training split is cut into K folds (stratified by label for classification, scikit-learn's
StratifiedKFold / KFold, shuffled with the run's seed); run i trains on the other folds and is evaluated on
fold i, into `OUT/fold-i/`. Each fold's data is written as JSON Lines under `OUT/fold-data/`, so a fold is an
ordinary run of one's own files: checkpoints, exact resume and every other flag work unchanged. Then
`folds_summary.json` holds every metric's per-fold values, mean, std and bootstrap CI (the statistics of
`--seeds`) plus the metrics of all out-of-fold predictions pooled, and `oof_predictions.jsonl` one
out-of-fold prediction for every training example, with its index in the training split.

A killed k-fold run continues with the same command: finished folds are reused, a fold with checkpoints
resumes from its newest one, a fold that stopped before its first checkpoint starts again.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tuneloop.errors import ConfigError, DataError, TuneloopError

SUMMARY = "folds_summary.json"
OOF = "oof_predictions.jsonl"


def parse_folds(text: str) -> int:
    try:
        k = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"--folds: expected an integer number of folds (e.g. --folds 5), got {text!r}") from None
    if k < 2:
        raise ConfigError(f"--folds: cross-validation needs at least 2 folds, got {k}")
    return k


def fold_dir(out: str | Path, i: int) -> Path:
    return Path(out) / f"fold-{i}"


def assign_folds(labels: np.ndarray | None, num_examples: int, k: int, seed: int) -> np.ndarray:
    """The fold of every training example; stratified when `labels` (class ids) are given."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if k > num_examples:
        raise DataError(f"--folds {k}: the training split has only {num_examples} examples")
    splitter = StratifiedKFold(k, shuffle=True, random_state=seed) if labels is not None else \
        KFold(k, shuffle=True, random_state=seed)
    folds = np.empty(num_examples, dtype=np.int64)
    try:
        for i, (_, held_out) in enumerate(splitter.split(np.zeros(num_examples), labels)):
            folds[held_out] = i
    except ValueError as e:
        raise DataError(f"--folds {k}: {str(e).splitlines()[0]}") from None
    return folds


def write_jsonl(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
    os.replace(tmp, path)


def fold_files(raw, folds: np.ndarray, out: Path) -> list[tuple[Path, Path]]:
    """Write each fold's train and validation JSON Lines (labels by name) and return their paths."""
    frame = raw.splits["train"]
    if raw.label_names is not None:
        frame = frame.assign(label=[raw.label_names[int(i)] for i in frame["label"]])
    folder = out / "fold-data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(int(folds.max()) + 1):
        train_path, val_path = folder / f"fold-{i}-train.jsonl", folder / f"fold-{i}-validation.jsonl"
        write_jsonl(frame[folds != i], train_path)
        write_jsonl(frame[folds == i], val_path)
        paths.append((train_path, val_path))
    return paths


def fold_config(config, i: int, train_path: Path, val_path: Path, is_pair: bool):
    cfg = copy.deepcopy(config)
    d = cfg.data
    d.dataset = d.dataset_config = d.train_split = d.validation_split = d.test_split = d.data_dir = None
    d.train_file, d.validation_file, d.test_file = str(train_path), str(val_path), None
    d.text_columns = ["text", "text_pair"] if is_pair else ["text"]
    d.label_column = "label"
    d.max_train_samples = d.max_eval_samples = None  # applied once, before the split
    cfg.output.output_dir = str(fold_dir(config.output.output_dir, i))
    cfg.output.push_to_hub = None
    return cfg


def prepare_fold(cfg, i: int, k: int) -> bool:
    """False if fold i already finished with these settings; else set how it starts (fresh, resumed, redone)."""
    from tuneloop.checkpoint import checkpoints_dir, list_checkpoints
    from tuneloop.recipe import RUN_MARKERS
    from tuneloop.seeds import finished_with_same_config

    folder = Path(cfg.output.output_dir)
    if not cfg.output.overwrite and finished_with_same_config(folder, cfg):
        print(f"tuneloop: fold {i} ({i + 1}/{k}) already finished in {folder}; reusing it", flush=True)
        return False
    if not cfg.output.overwrite and (folder / "eval_results.json").is_file():
        raise TuneloopError(f"{folder} holds a finished fold with other settings; pass --overwrite or choose "
                            f"another --output-dir")
    if not cfg.output.overwrite and any(step >= 0 for step, _ in list_checkpoints(checkpoints_dir(folder))):
        cfg.checkpoint.resume = cfg.checkpoint.resume or "latest"
        print(f"tuneloop: fold {i} ({i + 1}/{k}) stopped before its end; resuming it in {folder}", flush=True)
        return True
    cfg.checkpoint.resume = None
    if any((folder / m).exists() for m in RUN_MARKERS):
        cfg.output.overwrite = True  # stopped before its first checkpoint: nothing to continue from
    print(f"tuneloop: fold {i} ({i + 1}/{k}) -> {folder}", flush=True)
    return True


def out_of_fold(raw, folds: np.ndarray, out: Path) -> list[dict[str, Any]]:
    """Every training example's prediction by the fold run that did not train on it, in training order."""
    rows: list[dict[str, Any] | None] = [None] * len(folds)
    for i in range(int(folds.max()) + 1):
        original = np.flatnonzero(folds == i)
        lines = (fold_dir(out, i) / "predictions.jsonl").read_text(encoding="utf-8").splitlines()[1:]
        for line in lines:
            r = json.loads(line)
            keep = {k: v for k, v in r.items() if k not in ("index", "text", "text_pair")}
            rows[int(original[r["index"]])] = {"index": int(original[r["index"]]), "fold": i, **keep}
    missing = [j for j, r in enumerate(rows) if r is None]
    if missing:
        raise TuneloopError(f"out-of-fold predictions miss {len(missing)} training example(s), e.g. index {missing[0]}")
    return rows


def pooled_metrics(raw, rows: list[dict[str, Any]]) -> dict[str, float]:
    """The task's metrics over all out-of-fold predictions at once."""
    from tuneloop.evaluate import compute_metrics
    from tuneloop.problems import per_class_metrics

    if raw.label_names is None:
        return compute_metrics(raw.metrics, np.array([r["prediction"] for r in rows]),
                               np.array([r["label"] for r in rows]))
    index = {n: j for j, n in enumerate(raw.label_names)}
    preds = np.array([index[r["prediction"]] for r in rows])
    labels = np.array([index[r["label"]] for r in rows])
    return {**compute_metrics(raw.metrics, preds, labels), **per_class_metrics(preds, labels, raw.label_names)}


def train_folds(config, k: int) -> dict[str, Any]:
    """Train K fold runs into OUT/fold-i, then write folds_summary.json and oof_predictions.jsonl."""
    from tuneloop.data import load_raw
    from tuneloop.recipe import train, write_json
    from tuneloop.seeds import BOOTSTRAP_RESAMPLES, format_table, summarize_results

    out = Path(config.output.output_dir)
    if (out / SUMMARY).exists() and not config.output.overwrite:
        raise TuneloopError(f"output folder {out} already holds a k-fold run ({SUMMARY}); "
                            f"pass --overwrite or choose another --output-dir")
    raw = load_raw(config.data)
    if raw.multi_label:
        raise ConfigError("train.folds: k-fold cross-validation does not support multi-label tasks yet")
    labels = None if raw.is_regression or raw.multi_label else raw.splits["train"]["label"].to_numpy()
    folds = assign_folds(labels, len(raw.splits["train"]), k, config.train.seed)
    for i, (train_path, val_path) in enumerate(fold_files(raw, folds, out)):
        cfg = fold_config(config, i, train_path, val_path, raw.is_pair)
        if prepare_fold(cfg, i, k):
            train(cfg)
    results = {i: json.loads((fold_dir(out, i) / "eval_results.json").read_text(encoding="utf-8")) for i in range(k)}
    rows = out_of_fold(raw, folds, out)
    summary = {"folds": list(range(k)), "stratified": labels is not None, "seed": config.train.seed,
               "fold_sizes": np.bincount(folds).tolist(), **summarize_results(results, "folds"),
               "out_of_fold": pooled_metrics(raw, rows)}
    write_jsonl(pd.DataFrame(rows), out / OOF)
    write_json(out / SUMMARY, summary)
    print(f"tuneloop: {k}-fold cross-validation, spread over folds (std: ddof=1; CI: percentile bootstrap of the "
          f"mean, {BOOTSTRAP_RESAMPLES} resamples)\n" + format_table(summary, "folds", "fold")
          + "\nout-of-fold, all training examples pooled: "
          + ", ".join(f"{k_}={v:.4f}" for k_, v in summary["out_of_fold"].items()), flush=True)
    return summary
