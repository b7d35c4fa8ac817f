"""The training loop, top to bottom: forward, loss, backward, clip, step, schedule, zero-grad, log, eval.

Everything the loop touches arrives in a `Run` (built by `tuneloop.train`); everything it changes
that must survive a restart lives in `TrainingState`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from tuneloop.evaluate import evaluate


@dataclass
class TrainingState:
    """The one record of training progress; counters are stored here, never parsed from folder names."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # this process's micro-batches already consumed in the current epoch
    samples_seen: int = 0  # training examples seen, all processes together
    best_metric: float | None = None
    best_step: int | None = None

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


def run_evaluation(run: Run) -> dict[str, float]:
    """Metrics of every evaluation split; the first split's names are unprefixed."""
    results = {}
    for i, (split, dataloader) in enumerate(run.eval_dataloaders.items()):
        metrics = evaluate(run.model, dataloader, run.accelerator, run.metrics, run.is_regression)
        prefix = "" if i == 0 else f"{split}_"
        results.update({f"{prefix}{k}": v for k, v in metrics.items()})
    return results


def record_evaluation(run: Run, results: dict[str, float]) -> None:
    state = run.state
    score = results.get(run.main_metric)
    if score is not None and math.isfinite(score) and (state.best_metric is None or score > state.best_metric):
        state.best_metric, state.best_step = score, state.step
    run.log({"type": "eval", "step": state.step, "epoch": state.epoch, **results})


def train_loop(run: Run) -> dict[str, float]:
    cfg, accelerator, model, state = run.config, run.accelerator, run.model, run.state
    optimizer, scheduler, sampler = run.optimizer, run.scheduler, run.train_sampler
    accumulation = cfg.train.gradient_accumulation_steps
    processes = accelerator.num_processes
    progress = tqdm(total=run.num_training_steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    loss_count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    last_log_time, last_log_samples = time.perf_counter(), state.samples_seen
    results: dict[str, float] = {}
    model.train()
    while state.epoch < cfg.train.epochs:
        sampler.set_epoch(state.epoch, start=state.batch_in_epoch)
        window_sizes = sampler.window_sizes(accumulation)
        for batch in run.train_dataloader:
            n = batch["labels"].shape[0]
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                # accelerator.backward divides by the accumulation steps and DDP averages over processes;
                # undo both and weight this micro-batch by its share of the window's examples, so K
                # micro-batches (or a short last window) give the same update as one big batch.
                weight = n * accumulation * processes / window_sizes[state.batch_in_epoch // accumulation]
                accelerator.backward(loss * weight)
                loss_sum += loss.detach().double() * n
                loss_count += n
                if accelerator.sync_gradients:
                    if cfg.optim.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule aligned
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            progress.update(1)
            state.samples_seen += int(window_sizes[(state.batch_in_epoch - 1) // accumulation])
            if state.step % cfg.train.log_every == 0 or state.step == run.num_training_steps:
                # The only host sync of the step, and only on logging steps.
                total = accelerator.reduce(torch.stack([loss_sum, loss_count]), reduction="sum")
                train_loss = (total[0] / total[1]).item()
                loss_sum.zero_(), loss_count.zero_()
                now = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                run.log({"type": "train", "step": state.step, "epoch": state.epoch + state.batch_in_epoch / len(sampler),
                         "loss": train_loss, "lr": lr,
                         "samples_per_second": (state.samples_seen - last_log_samples) / max(now - last_log_time, 1e-9)})
                last_log_time, last_log_samples = now, state.samples_seen
                progress.set_postfix(epoch=state.epoch + 1, loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")
            if cfg.eval.eval_every and state.step % cfg.eval.eval_every == 0 and run.eval_dataloaders:
                results = run_evaluation(run)
                record_evaluation(run, results)

        state.epoch += 1
        state.batch_in_epoch = 0
        if run.eval_dataloaders and not (cfg.eval.eval_every and state.step % cfg.eval.eval_every == 0):
            results = run_evaluation(run)
            record_evaluation(run, results)
    progress.close()
    return results
