"""Run records: metrics.jsonl (one line per logged step and evaluation), learning_curves.png, and trackers.

metrics.jsonl is always written and stays the record. Every record also fans out to the `sinks` of the
log: Accelerate's trackers (TensorBoard by default when installed; MLflow or W&B only when asked with
`--report-to`) and hooks such as the search's pruning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.naming import did_you_mean, dotted_keys

TRACKERS = ("tensorboard", "mlflow", "wandb")
# The Python module each tracker needs, and what to install for it.
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
TRACKER_INSTALL = {"tensorboard": "'tuneloop[track]'", "mlflow": "'tuneloop[mlflow]'", "wandb": "wandb"}


class MetricsLog:
    """Append-only JSON Lines log, flushed per line so a crash loses nothing already logged."""

    def __init__(self, path: str | Path, enabled: bool = True, sinks: list[Callable[[dict], None]] | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.sinks = list(sinks or [])  # called with every record after it is written, on the main process

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        for sink in self.sinks:
            sink(record)

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path) if self.path.exists() else []


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file; a line cut short by a kill (the last one of an unfinished run) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_learning_curves(records: list[dict[str, Any]], out_path: str | Path, main_metric: str) -> Path:
    """Training loss, learning rate and the task's main eval metric against optimizer steps."""
    # A Figure of its own, not pyplot: no backend switch, so a notebook's inline plots keep working.
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig = Figure(figsize=(15, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], marker=".", label="train loss")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r.get("loss") for r in evals], marker="o", label="eval loss")
    axes[0].set(title="loss", xlabel="optimizer step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    axes[1].set(title="learning rate", xlabel="optimizer step")
    axes[2].plot([r["step"] for r in evals], [r.get(main_metric) for r in evals], marker="o", color="tab:green")
    axes[2].set(title=f"eval {main_metric}", xlabel="optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
    from tuneloop import atomic

    out_path = Path(out_path)
    with atomic.replacing(out_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return out_path


def check_report_to(names: list[str]) -> None:
    """Validate `output.report_to`; naming a tracker whose package is missing is one line saying what to install."""
    import importlib.util

    allowed = ("auto", "none", *TRACKERS)
    for name in names:
        if name not in allowed:
            raise ConfigError(f"output.report_to: unknown tracker '{name}'{did_you_mean(name, allowed)}; "
                              f"one of {', '.join(allowed)}")
        if name in TRACKERS and importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise ConfigError(f"output.report_to: {name} is not installed (pip install {TRACKER_INSTALL[name]})")
    if len(names) > 1 and ("none" in names or "auto" in names):
        raise ConfigError(f"output.report_to: 'none' and 'auto' stand alone, got {','.join(names)}")


def resolve_trackers(names: list[str]) -> list[str]:
    """The trackers a run reports to: `auto` is TensorBoard when installed and nothing else."""
    import importlib.util

    if names == ["auto"]:
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    return [n for n in names if n != "none"]


def tracker_kwargs(config) -> dict[str, Any]:
    """Accelerator arguments for the trackers; TensorBoard writes OUT/tensorboard/tuneloop/."""
    trackers = resolve_trackers(config.output.report_to)
    if not trackers:
        return {}
    from accelerate.utils import ProjectConfiguration

    out = Path(config.output.output_dir)
    return {"log_with": trackers, "project_config": ProjectConfiguration(project_dir=str(out),
                                                                          logging_dir=str(out / "tensorboard"))}


def start_trackers(accelerator, config, metrics_log: MetricsLog) -> None:
    """Open the configured trackers (TensorBoard/MLflow write under the output folder) and fan the log out to them."""
    if not accelerator.log_with:
        return
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dotted_keys(config.to_dict()).items()}
    try:
        out = Path(config.output.output_dir)
        # Runs are named after their output folder in every tracker's UI (MLflow would pick a random name).
        accelerator.init_trackers("tuneloop", config=flat,
                                  init_kwargs={"wandb": {"dir": str(out), "name": out.name},
                                               "mlflow": {"run_name": out.name}})
    except Exception as e:  # a tracker's server or login is the user's environment, not a crash of ours
        raise TuneloopError(f"could not start tracker(s) {', '.join(map(str, accelerator.log_with))}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    metrics_log.sinks.append(lambda record: log_to_trackers(accelerator, record))


def finish_trackers(accelerator) -> None:
    """Close the trackers without ending the process group (Accelerate's end_training does both)."""
    for tracker in getattr(accelerator, "trackers", []):
        tracker.finish()


def log_to_trackers(accelerator, record: dict[str, Any]) -> None:
    """Numeric values of train and eval records, as `train/loss`, `eval/accuracy`, at their optimizer step."""
    kind = record.get("type")
    if kind not in ("train", "eval"):
        return
    values = {f"{kind}/{k}": v for k, v in record.items()
              if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    accelerator.log(values, step=record["step"])
