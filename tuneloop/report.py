"""`tuneloop report RUN_DIR`: one self-contained report.html (Jinja2, matplotlib PNGs as base64, no script, no network).

A run writes what the report needs beside its metrics: `predictions.jsonl` (the first evaluation split,
one small line per example; texts only for the most confident mistakes) and `run_summary.json` (data
sizes, lengths, label balance, throughput, memory). The report reads a single run, a multi-seed folder
(`seeds_summary.json`) or a search folder (`trials.csv`).
"""

from __future__ import annotations

import base64
import io
import json
import math
import resource
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.errors import TuneloopError
from tuneloop.labels import label_counts

NUM_MISTAKES = 20


# ---------------------------------------------------------------------------------------------
# Written by a run


def dev_predictions(run) -> dict[str, Any]:
    """Per-example predictions on the first evaluation split, in the split's own order. Called on every process.

    They are the last evaluation's when it ran at the final step (the recipe drops them when the model changed
    after it); otherwise one more pass over the split."""
    import torch

    from tuneloop.evaluate import predict_batches

    split, dataloader = next(iter(run.eval_dataloaders.items()))
    if "doc" in dataloader.dataset.column_names:  # long documents in windows: one row per document
        from tuneloop.chunking import document_logits, document_predictions

        ids, logits, labels = document_logits(run.model, dataloader, run.accelerator, run.config.data.chunk_aggregation)
        preds, scores = document_predictions(logits, run.is_regression)
        rows = list(zip(ids.tolist(), preds.tolist(), scores.tolist(), labels.tolist()))
        return {"split": split, "rows": rows, "frame": run.raw.splits[split], "label_names": run.raw.label_names}
    lengths = dataloader.dataset["length"]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # the evaluation sampler's order
    last = run.last_dev_rows
    if last is not None and last[0] == run.state.step:
        batches = last[1]
    else:
        batches = [(p.cpu(), s.cpu(), y.cpu()) for p, s, y, _ in
                   predict_batches(run.model, dataloader, run.accelerator, run.is_regression)]
    preds, scores, labels = (torch.cat([b[i] for b in batches]).tolist() for i in range(3))
    by_index = sorted(zip(order, preds, scores, labels))
    return {"split": split, "rows": by_index, "frame": run.raw.splits[split], "label_names": run.raw.label_names}


def write_predictions(predictions: dict[str, Any], path: Path) -> None:
    """One JSON line per example; only the NUM_MISTAKES most confident mistakes carry their texts."""
    names, frame = predictions["label_names"], predictions["frame"]
    rows = []
    for index, pred, score, label in predictions["rows"]:
        if names is None:
            rows.append({"index": index, "label": round(label, 4), "prediction": round(pred, 4),
                         "error": round(abs(pred - label), 4)})
        elif isinstance(label, list):
            rows.append(multi_label_row(index, pred, score, label, names))
        else:
            rows.append({"index": index, "label": names[int(label)], "prediction": names[int(pred)],
                         "confidence": round(score, 4)})
    key = (lambda r: -r["error"]) if names is None else (lambda r: -r["confidence"])
    wrong = [r for r in rows if (r["label"] != r["prediction"]) or names is None]
    for r in sorted(wrong, key=key)[:NUM_MISTAKES]:
        r["text"] = str(frame["text"].iloc[r["index"]])
        if "text_pair" in frame.columns:
            r["text_pair"] = str(frame["text_pair"].iloc[r["index"]])
    from tuneloop import atomic

    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in [{"split": predictions["split"]}, *rows]))


def multi_label_row(index: int, pred: list, scores: list, label: list, names: list[str]) -> dict[str, Any]:
    """A multi-label example: its true and predicted label lists, every label's score, and as confidence the
    probability of the predicted set under independent sigmoids."""
    confidence = math.prod(s if p else 1 - s for p, s in zip(pred, scores))
    return {"index": index, "label": [n for n, y in zip(names, label) if y], "prediction": [n for n, p in zip(names, pred) if p],
            "scores": dict(zip(names, scores)), "confidence": round(confidence, 4)}  # unrounded: they recompute the cut


def run_summary(run, train_seconds: float) -> dict[str, Any]:
    """Data sizes, token lengths and label balance; throughput and peak memory of the run."""
    import torch

    raw = run.raw
    data = {}
    lengths = {"train": run.train_sampler.lengths, **{s: dl.dataset["length"] for s, dl in run.eval_dataloaders.items()}}
    for split, frame in raw.splits.items():
        entry: dict[str, Any] = {"examples": len(frame)}
        if split in lengths and run.config.data.long_text == "chunk":
            entry["windows"] = len(lengths[split])
        if split in lengths:
            arr = np.asarray(lengths[split])
            entry["tokens"] = {"mean": round(float(arr.mean()), 1), "p50": int(np.percentile(arr, 50)),
                               "p90": int(np.percentile(arr, 90)), "max": int(arr.max())}
        if "label" in frame.columns and raw.label_names is not None:
            entry["labels"] = dict(zip(raw.label_names, label_counts(frame["label"], len(raw.label_names))))
        elif "label" in frame.columns:
            entry["labels"] = {"mean": float(frame["label"].mean()), "std": float(frame["label"].std())}
        data[split] = entry
    state = run.state
    device = run.accelerator.device
    memory = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        memory["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return {"task": raw.task_name, "is_regression": raw.is_regression, "label_names": raw.label_names,
            "data": data, "train_seconds": round(train_seconds, 2), "optimizer_steps": state.step,
            "samples_seen": state.samples_seen,
            "samples_per_second": round(state.samples_seen / train_seconds, 2) if train_seconds > 0 else None,
            "memory": memory, "device": str(device), "processes": run.accelerator.num_processes,
            "precision": run.accelerator.mixed_precision,
            "class_weights": dict(zip(raw.label_names, run.class_weights)) if run.class_weights else None}


# ---------------------------------------------------------------------------------------------
# Read by `tuneloop report`


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _file_png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def _records(run_dir: Path) -> list[dict[str, Any]]:
    from tuneloop.tracking import MetricsLog

    return MetricsLog(run_dir / "metrics.jsonl").records()


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_predictions(path: Path) -> tuple[str | None, list[dict[str, Any]]]:
    from tuneloop.tracking import read_jsonl

    lines = read_jsonl(path) if path.is_file() else []
    if not lines or "split" not in lines[0]:  # missing, empty or cut short: a run without predictions
        return None, []
    return lines[0]["split"], lines[1:]


def _confusion_png(rows: list[dict[str, Any]], names: list[str]) -> tuple[str, list[list[int]]]:
    import matplotlib.pyplot as plt

    index = {n: i for i, n in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=int)
    for r in rows:
        matrix[index[r["label"]], index[r["prediction"]]] += 1
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 1.2 + 1.0 * len(names)), constrained_layout=True)
    ax.imshow(matrix, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    return _png(fig), matrix.tolist()


def reliability_png(calibration: dict[str, Any]) -> str:
    """Accuracy against confidence per bin, before and after temperature scaling (cross-fitted)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, label="perfectly calibrated")
    for key, name in (("reliability_before", "before"), ("reliability_after", "after")):
        bins = calibration[key]
        ece = calibration[f"ece_{name}"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability, T = {calibration['temperature']:.3f}")
    ax.legend(loc="upper left")
    return _png(fig)


def _scatter_png(rows: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)
    labels = [r["label"] for r in rows]
    ax.scatter(labels, [r["prediction"] for r in rows], s=8, alpha=0.5)
    lo, hi = min(labels), max(labels)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
    ax.set(xlabel="true", ylabel="predicted", title="predictions vs labels")
    return _png(fig)


def is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and (folder / "metrics.jsonl").is_file()


def run_section(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows about one training run."""
    import matplotlib

    matplotlib.use("Agg")
    from tuneloop.tracking import plot_learning_curves

    records = _records(run_dir)
    results = _read_json(run_dir / "eval_results.json") or {}
    summary = _read_json(run_dir / "run_summary.json") or {}
    calibration = _read_json(run_dir / "calibration.json")
    main_metric = results.get("main_metric") or "accuracy"
    curves = _file_png(run_dir / "learning_curves.png")
    if curves is None and records:  # an unfinished run: draw what it logged so far
        buf = run_dir / ".curves.tmp.png"
        plot_learning_curves(records, buf, main_metric)
        curves = _file_png(buf)
        buf.unlink()
    evals = [r for r in records if r.get("type") == "eval"]
    eval_keys = [k for k in (evals[0] if evals else {}) if k not in ("type",)]
    split, rows = _read_predictions(run_dir / "predictions.jsonl")
    names = summary.get("label_names")
    confusion = scatter = None
    matrix: list[list[int]] = []
    mistakes = [r for r in rows if "text" in r]
    if rows and names and isinstance(rows[0]["label"], list):  # multi-label: no confusion matrix of sets
        mistakes.sort(key=lambda r: -r["confidence"])
    elif rows and names:
        confusion, matrix = _confusion_png(rows, names)
        mistakes.sort(key=lambda r: -r["confidence"])
    elif rows:
        scatter = _scatter_png(rows)
        mistakes.sort(key=lambda r: -r["error"])
    train_records = [r for r in records if r.get("type") == "train" and r.get("samples_per_second")]
    throughput = [r["samples_per_second"] for r in train_records]
    return {
        "path": str(run_dir), "name": run_dir.name,
        "config": (run_dir / "config.yaml").read_text(encoding="utf-8"),
        "results": results, "summary": summary, "main_metric": main_metric, "curves": curves,
        "eval_keys": eval_keys, "evals": evals, "split": split, "num_predictions": len(rows),
        "confusion": confusion, "matrix": matrix, "label_names": names, "scatter": scatter,
        "mistakes": mistakes[:NUM_MISTAKES],
        "throughput": {"median": float(np.median(throughput)), "min": min(throughput), "max": max(throughput)}
        if throughput else None,
        "finished": bool(results),
        "reliability": reliability_png(calibration) if calibration else None,
    }


def seeds_section(folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    metrics = summary["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), constrained_layout=True, squeeze=False)
    for ax, (name, m) in zip(axes[0], metrics.items()):
        ax.scatter(range(len(m["values"])), m["values"], color="tab:blue", zorder=3, label="seeds")
        ax.axhline(m["mean"], color="tab:green", label="mean")
        ax.axhspan(m["ci95"][0], m["ci95"][1], color="tab:green", alpha=0.15, label="95% CI of the mean")
        ax.set_xticks(range(len(m["values"])), [str(s) for s in summary["seeds"]])
        ax.set(title=name, xlabel="seed")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return {"summary": summary, "plot": _png(fig),
            "runs": [run_section(folder / f"seed-{s}") for s in summary["seeds"] if is_run(folder / f"seed-{s}")]}


def search_section(folder: Path) -> dict[str, Any]:
    import pandas as pd

    table = pd.read_csv(folder / "trials.csv")
    best = (folder / "best_config.yaml").read_text(encoding="utf-8") if (folder / "best_config.yaml").is_file() else None
    rows = [["" if pd.isna(v) else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
            for row in table.itertuples(index=False)]
    return {"columns": list(table.columns), "rows": rows,
            "history": _file_png(folder / "optimization_history.png"),
            "importances": _file_png(folder / "param_importances.png"), "best_config": best,
            "summary": _read_json(folder / "search_summary.json")}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return "–" if value is None else str(value)


def render_report(folder: str | Path, output: str | Path | None = None) -> Path:
    """Write FOLDER/report.html (or `output`) for a run, a multi-seed folder or a search folder."""
    import matplotlib

    matplotlib.use("Agg")
    try:
        import jinja2
    except ImportError:
        raise TuneloopError("the report needs Jinja2: pip install jinja2") from None
    folder = Path(folder)
    if not folder.is_dir():
        raise TuneloopError(f"report: {folder} is not a folder")
    seeds = _read_json(folder / "seeds_summary.json")
    context: dict[str, Any] = {"title": folder.resolve().name, "run": None, "seeds": None, "search": None}
    if (folder / "trials.csv").is_file():
        context["kind"] = "search"
        context["search"] = search_section(folder)
    elif seeds is not None:
        context["kind"] = "seeds"
        context["seeds"] = seeds_section(folder, seeds)
    elif is_run(folder):
        context["kind"] = "run"
        context["run"] = run_section(folder)
    else:
        raise TuneloopError(f"report: {folder} holds no run (expected config.yaml and metrics.jsonl, "
                            f"seeds_summary.json or trials.csv)")
    env = jinja2.Environment(loader=jinja2.PackageLoader("tuneloop", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = _fmt
    html = env.get_template("report.html.j2").render(**context)
    out = Path(output) if output else folder / "report.html"
    from tuneloop import atomic

    return atomic.write_text(out, html)
