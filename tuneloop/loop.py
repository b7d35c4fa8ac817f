"""The training loop, top to bottom: forward, loss, backward, clip, step, schedule, zero-grad, log, eval.

Everything the loop touches arrives in a `Run` (built by `tuneloop.train`); everything it changes
that must survive a restart lives in `TrainingState`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from tuneloop.checkpoint import save_checkpoint
from tuneloop.early_stopping import after_evaluation
from tuneloop.evaluate import evaluate
from tuneloop.guard import NonFiniteLoss, StepGuard  # noqa: F401  (NonFiniteLoss: re-exported)
from tuneloop.problems import model_loss
from tuneloop.signals import Interrupted, StopRequest


@dataclass
class TrainingState:
    """The one record of training progress; counters are stored here, never parsed from folder names."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # this process's micro-batches already consumed in the current epoch
    samples_seen: int = 0  # training examples seen, all processes together
    best_metric: float | None = None
    best_step: int | None = None
    skipped_steps: int = 0  # updates skipped for a non-finite loss (nan_policy: skip)
    pending_loss: tuple[float, float] = (0.0, 0.0)  # loss sum and count since the last log line
    evals_without_improvement: int = 0  # for early stopping
    stopped_early: bool = False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


@dataclass
class Run:
    """What one training run is made of, after `accelerator.prepare`."""

    config: Any
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    train_dataloader: Any
    train_sampler: Any  # tuneloop.batching.EpochBatchSampler
    eval_dataloaders: dict[str, Any]
    metrics: tuple[str, ...]
    main_metric: str
    is_regression: bool
    num_training_steps: int
    log: Callable[[dict[str, Any]], None]
    state: TrainingState
    tokenizer: Any = None
    raw: Any = None  # tuneloop.data.RawData
    stop: StopRequest = field(default_factory=lambda: StopRequest(announce=False))
    rank_budget: Any = None  # tuneloop.adapters.AdaLoraBudget for AdaLoRA runs
    best_weights: dict[str, torch.Tensor] | None = None  # CPU copy for load_best_model when no checkpoint has them
    loss: Callable[[torch.nn.Module, dict], torch.Tensor] = model_loss
    class_weights: list[float] | None = None
    last_dev_rows: tuple[int, list] | None = None  # (step, batches) of the last evaluation's first split


def run_evaluation(run: Run) -> dict[str, float]:
    """Metrics of every evaluation split; the first split's names are unprefixed."""
    results = {}
    for i, (split, dataloader) in enumerate(run.eval_dataloaders.items()):
        rows = [] if i == 0 else None  # kept for predictions.jsonl (tuneloop.report.dev_predictions)
        metrics = evaluate(run.model, dataloader, run.accelerator, run.metrics, run.is_regression,
                           run.raw.label_names if run.raw is not None else None, run.config.data.chunk_aggregation,
                           rows=rows)
        if rows is not None:
            run.last_dev_rows = (run.state.step, rows)
        prefix = "" if i == 0 else f"{split}_"
        results.update({f"{prefix}{k}": v for k, v in metrics.items()})
    return results


def record_evaluation(run: Run, results: dict[str, float]) -> float | None:
    """Log an evaluation and track the best score; a NaN score is never the best."""
    state = run.state
    score = results.get(run.main_metric)
    if score is not None and math.isfinite(score) and (state.best_metric is None or score > state.best_metric):
        state.best_metric, state.best_step = score, state.step
    run.log({"type": "eval", "step": state.step, "epoch": state.epoch, **results})
    return score if score is not None and math.isfinite(score) else None


def train_loop(run: Run) -> dict[str, float]:
    cfg, accelerator, model, state = run.config, run.accelerator, run.model, run.state
    optimizer, scheduler, sampler = run.optimizer, run.scheduler, run.train_sampler
    accumulation = cfg.train.gradient_accumulation_steps
    processes = accelerator.num_processes
    progress = progress_bar(run)
    # Loss since the last log line, NaN checks and stop signals stay on the device: no host read except on
    # logging steps, before checkpoints and at epoch ends (tuneloop.guard).
    loss_sum, loss_count = unlogged_loss(run)
    guard = StepGuard(accelerator, optimizer, cfg.train.nan_policy, run.num_training_steps // max(cfg.train.epochs, 1))
    window_loss, window_count = torch.zeros((), device=accelerator.device, dtype=torch.float64), 0
    last_log_time, last_log_samples = time.perf_counter(), state.samples_seen
    results: dict[str, float] = {}
    model.train()
    while state.epoch < cfg.train.epochs and not state.stopped_early:
        sampler.select_epoch(state.epoch, start=state.batch_in_epoch)
        window_sizes = sampler.window_sizes()
        local_sizes = sampler.local_sizes()  # real examples per batch: a filler batch counts 0
        for batch in run.train_dataloader:
            n = local_sizes[state.batch_in_epoch]
            window = state.batch_in_epoch // accumulation
            with accelerator.accumulate(model):
                loss = run.loss(model, batch)  # the model's own, or class-weighted (tuneloop.problems)
                # accelerator.backward divides by the accumulation steps and DDP averages over processes;
                # undo both and weight this micro-batch by its share of the window's examples, so K
                # micro-batches (or a short last window) give the same update as one big batch.
                accelerator.backward(loss * (n * accumulation * processes / window_sizes[window]))
                window_loss += loss.detach().double() * n
                window_count += n
                if accelerator.sync_gradients:
                    # A non-finite loss makes the optimizer skip this update on the device; read on logging steps.
                    keep = guard.check(window_loss, state.step + 1)
                    if cfg.optim.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                    if guard.apply_update:
                        optimizer.step()
                        if run.rank_budget is not None:  # AdaLoRA scores this step's gradients, then masks ranks
                            run.rank_budget.step(state.step)
                    guard.after_step()
                    scheduler.step()  # also on a skipped step: the LR follows the step counter (tuneloop.guard)
                    loss_sum += window_loss.nan_to_num(0.0, 0.0, 0.0) * keep
                    loss_count += keep * window_count
                    optimizer.zero_grad(set_to_none=True)
                    window_loss.zero_()
                    window_count = 0
            state.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            progress.update(1)
            state.samples_seen += int(window_sizes[window])
            log_step = state.step % cfg.train.log_every == 0 or state.step == run.num_training_steps
            # Signals are agreed on logging steps; one process alone needs no agreement and stops at once.
            stop = guard.read(run) if log_step or (run.stop.requested and processes == 1) else False
            if log_step:
                train_loss = take_mean_loss(accelerator, loss_sum, loss_count)
                now, lr = time.perf_counter(), scheduler.get_last_lr()[0]
                run.log({"type": "train", "step": state.step, "epoch": state.epoch + state.batch_in_epoch / len(sampler),
                         "loss": train_loss, "lr": lr, "skipped_steps": state.skipped_steps,
                         "samples_per_second": (state.samples_seen - last_log_samples) / max(now - last_log_time, 1e-9)})
                last_log_time, last_log_samples = now, state.samples_seen
                progress.set_postfix(epoch=state.epoch + 1, loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            metric = None
            if cfg.eval.eval_every and state.step % cfg.eval.eval_every == 0 and run.eval_dataloaders:
                results = run_evaluation(run)
                metric = record_evaluation(run, results)
                if after_evaluation(run):
                    break
            epoch_done = state.batch_in_epoch == len(sampler)
            if cfg.checkpoint.checkpoint_every and state.step % cfg.checkpoint.checkpoint_every == 0 \
                    and not (epoch_done and cfg.checkpoint.checkpoint_every_epoch):  # the epoch end saves it
                stop = guard.read(run) or stop  # a checkpoint never holds an unread bad step
                state.pending_loss = pending_loss(accelerator, loss_sum, loss_count)
                save_checkpoint(run, metric)
            if stop:
                stop_for_signal(run, loss_sum, loss_count)

        if state.stopped_early:
            break
        state.epoch += 1
        state.batch_in_epoch = 0
        metric = None
        stop = guard.read(run)
        if run.eval_dataloaders and not (cfg.eval.eval_every and state.step % cfg.eval.eval_every == 0):
            results = run_evaluation(run)
            metric = record_evaluation(run, results)
            after_evaluation(run)
        if cfg.checkpoint.checkpoint_every_epoch:
            state.pending_loss = pending_loss(accelerator, loss_sum, loss_count)
            save_checkpoint(run, metric)
        if stop and state.epoch < cfg.train.epochs:
            stop_for_signal(run, loss_sum, loss_count)
    progress.close()
    if not results and run.eval_dataloaders:  # resumed from the final checkpoint: nothing left to train
        results = run_evaluation(run)
    return results


def progress_bar(run: Run) -> tqdm:
    """The optimizer-step bar, drawn by the main process only."""
    # Redirected to a file (nohup, a cluster job), redrawing every 0.1 s would flood the log: every 30 s there.
    return tqdm(total=run.num_training_steps, initial=run.state.step, desc="train", unit="step",
                disable=not run.accelerator.is_main_process, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30)


def unlogged_loss(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss sum and count not yet logged, as device tensors the loop adds to.

    A resumed run starts from the sums saved with its checkpoint (all processes together, so the main process
    holds them), and its log lines match an uninterrupted run's.
    """
    pending = run.state.pending_loss if run.accelerator.is_main_process else (0.0, 0.0)
    device = run.accelerator.device
    return (torch.tensor(pending[0], device=device, dtype=torch.float64),
            torch.tensor(pending[1], device=device, dtype=torch.float64))


def take_mean_loss(accelerator, loss_sum: torch.Tensor, loss_count: torch.Tensor) -> float:
    """Mean training loss since the last log line, over all processes; the sums start again from zero."""
    total_loss, total_count = pending_loss(accelerator, loss_sum, loss_count)
    loss_sum.zero_()
    loss_count.zero_()
    return total_loss / total_count if total_count > 0 else math.nan


def pending_loss(accelerator, loss_sum: torch.Tensor, loss_count: torch.Tensor) -> tuple[float, float]:
    """Loss not yet logged, summed over processes, to be stored with a checkpoint."""
    total = accelerator.reduce(torch.stack([loss_sum, loss_count]), "sum").tolist()
    return float(total[0]), float(total[1])


def stop_for_signal(run: Run, loss_sum: torch.Tensor, loss_count: torch.Tensor) -> None:
    from tuneloop.checkpoint import checkpoints_dir

    state = run.state
    path = checkpoints_dir(run.config.output.output_dir) / f"step-{state.step:06d}"
    if not path.exists():
        state.pending_loss = pending_loss(run.accelerator, loss_sum, loss_count)
        path = save_checkpoint(run, None)
    raise Interrupted(f"stopped by {run.stop.signal_name} after optimizer step {state.step}; checkpoint saved in "
                      f"{path}. Resume with the same command plus --resume")
