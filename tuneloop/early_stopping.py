"""Early stopping on the main metric, and the best evaluation's weights as the saved model.

The loop calls `after_evaluation` once per evaluation (after `record_evaluation` has updated the best
score). The best weights come from the kept best checkpoint when every evaluation has one (the default:
evaluate and checkpoint at each epoch end, keep_best), else from a CPU copy taken at the best evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tuneloop.errors import TuneloopError

log = logging.getLogger(__name__)


def best_from_checkpoints(config) -> bool:
    """Whether the best evaluation is sure to have a kept checkpoint (else keep a copy in memory)."""
    c = config.checkpoint
    return c.keep_best and c.checkpoint_every_epoch and not config.eval.eval_every


def update_patience(improved: bool, evals_without_improvement: int, patience: int | None) -> tuple[int, bool]:
    """(new count of evaluations without a new best, whether to stop now)."""
    count = 0 if improved else evals_without_improvement + 1
    return count, patience is not None and count >= patience


def after_evaluation(run) -> bool:
    """Track patience and (if needed) keep the best weights; True when training should stop early."""
    state, cfg = run.state, run.config
    improved = state.best_step == state.step
    state.evals_without_improvement, state.stopped_early = update_patience(
        improved, state.evals_without_improvement, cfg.eval.early_stopping_patience)
    if improved and cfg.eval.load_best_model and not best_from_checkpoints(cfg):
        model = run.accelerator.unwrap_model(run.model)
        run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if state.stopped_early and run.accelerator.is_main_process:
        print(f"tuneloop: early stopping at optimizer step {state.step}: no better {run.main_metric} than "
              f"{state.best_metric:.4f} (step {state.best_step}) in {state.evals_without_improvement} evaluation(s)",
              flush=True)
    return state.stopped_early


def load_best_weights(run, out: Path) -> str:
    """Put the best evaluation's weights into the model; returns where they came from."""
    from safetensors.torch import load_file

    from tuneloop.checkpoint import checkpoints_dir, read_checkpoint

    state = run.state
    if state.best_step is None:
        raise TuneloopError("--load-best-model: no evaluation produced a finite main metric, so there is no best model")
    if state.best_step == state.step:
        return "final weights (the last evaluation was the best)"
    model = run.accelerator.unwrap_model(run.model)
    path = checkpoints_dir(out) / f"step-{state.best_step:06d}"
    if path.exists() and read_checkpoint(path) is not None and (path / "model.safetensors").exists():
        model.load_state_dict(load_file(path / "model.safetensors", device="cpu"))
        return f"checkpoint {path.name}"
    if run.best_weights is not None:
        model.load_state_dict(run.best_weights)
        return "in-memory copy"
    log.warning("the best evaluation's weights (step %s) were lost when the run was resumed; saving the last "
                "weights", state.best_step)
    return "final weights (best weights lost on resume)"
