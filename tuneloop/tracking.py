"""Local run records: metrics.jsonl (one line per logged step and evaluation) and learning_curves.png.

Nothing reports anywhere else unless asked: the JSONL file is always local.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON Lines log, flushed per line so a crash loses nothing already logged."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    return out_path
