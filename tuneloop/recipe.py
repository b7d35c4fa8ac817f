"""The run as a chain of plain functions: setup -> data -> model -> optimizer -> train_loop -> save.

`train(config)` is the Python API behind `tuneloop train`; `evaluate_model` is behind `tuneloop eval`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tuneloop import atomic
from tuneloop.adapters import (describe_parameters, is_adapter_dir, keep_trainable_in_checkpoints, load_adapter_model,
                               prepare_model, rank_budget, save_adapter, save_merged)
from tuneloop.batching import EpochBatchSampler
from tuneloop.checkpoint import checkpoints_dir, resume
from tuneloop.config import Config
from tuneloop.compiling import compile_padding, dynamo_kwargs, mark_cudagraph_steps
from tuneloop.devices import resolve_for_device
from tuneloop.data import Collator, RawData, load_raw, tokenize_splits
from tuneloop.evaluate import evaluate
from tuneloop.errors import ConfigError, DataError, TuneloopError
from tuneloop.launch import accelerator_kwargs, check_processes, is_main_process
from tuneloop.loop import Run, TrainingState, run_evaluation, train_loop
from tuneloop.model import (apply_layer_options, build_model, build_tokenizer, capped_max_length, resolve_attention,
                            resolve_model_path, saved_label_names, saved_multi_label,
                            enable_gradient_checkpointing, use_fast_dropout)
from tuneloop.optim import build_optimizer, build_scheduler, num_training_steps
from tuneloop.problems import build_loss
from tuneloop.precision import accelerate_precision, apply_tf32, check_device_precision, reconcile_mixed_precision
from tuneloop.signals import StopRequest
from tuneloop.calibration import calibrate, summary as calibration_summary
from tuneloop.thresholds import summary as thresholds_summary, tune_thresholds
from tuneloop.chunking import remember_long_text
from tuneloop.card import push_to_hub, write_model_card
from tuneloop.early_stopping import load_best_weights
from tuneloop.report import dev_predictions, run_summary, write_predictions
from tuneloop.runlock import RunLock
from tuneloop.tracking import MetricsLog, finish_trackers, plot_learning_curves, start_trackers, tracker_kwargs

log = logging.getLogger(__name__)

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "eval_results.json", "model")


def make_accelerator(config: Config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # A notebook may call train() again with other settings: Accelerate keeps process-wide singletons,
    # which are safe to reset between runs in a single process (never inside a distributed job).
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    precision = reconcile_mixed_precision(config, warn=is_main_process())
    accelerator = Accelerator(mixed_precision=accelerate_precision(precision),
                              gradient_accumulation_steps=config.train.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False,
                              **dynamo_kwargs(config.train.compile), **accelerator_kwargs(config),
                              **tracker_kwargs(config))
    check_device_precision(accelerator.mixed_precision, accelerator.device.type, warn=accelerator.is_main_process)
    apply_tf32(precision, accelerator.device.type)
    check_processes(config, accelerator)
    return accelerator


def check_output_dir(config: Config) -> Path:
    """Refuse to write over a finished run unless asked; fail early if the folder is unwritable."""
    out = Path(config.output.output_dir)
    if out.exists() and not out.is_dir():
        raise TuneloopError(f"output path {out} exists and is not a folder")
    existing = [m for m in RUN_MARKERS if (out / m).exists()]
    foreign = foreign_checkpoint(out, config.checkpoint.resume)
    if existing and foreign is not None and not config.output.overwrite:
        owner = foreign.parent.parent if foreign.parent.name == "checkpoints" else None
        raise TuneloopError(f"cannot resume {foreign} into {out}: that folder holds another run ({', '.join(existing)}); "
                            + (f"to continue the checkpoint's own run, pass --output-dir {owner} (or --resume alone "
                               f"there); " if owner is not None else "")
                            + "to start a new run from it, choose an empty --output-dir")
    if existing and not config.output.overwrite and not config.checkpoint.resume:
        raise TuneloopError(f"output folder {out} already holds a run ({', '.join(existing)}); "
                            f"pass --overwrite or choose another --output-dir")
    return out


def foreign_checkpoint(out: Path, requested: str | None) -> Path | None:
    """The checkpoint `--resume PATH` names when it is not one of `out`'s own checkpoints, else None."""
    if requested in (None, "latest", "true", "True"):
        return None
    path = Path(requested)
    if path.resolve().parent == checkpoints_dir(out).resolve():
        return None
    return path


def fit_to_model(config: Config) -> Config:
    """A copy whose max_length fits the model's positions (with one warning when it had to be capped)."""
    length = capped_max_length(config.data.max_length, config.model.name_or_path)
    if length == config.data.max_length:
        return config
    capped = dataclasses.replace(config, data=dataclasses.replace(config.data, max_length=length))
    capped.given = config.given
    return capped


def ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TuneloopError(f"cannot write to output folder {out}: {e.strerror or e}") from None


def start_run_files(out: Path, config: Config) -> None:
    """Called once setup has succeeded: only then is an overwritten run's record replaced."""
    for name in ("eval_results.json", "metrics.jsonl", "predictions.jsonl", "run_summary.json"):
        (out / name).unlink(missing_ok=True)  # the completion record first: the rest is no longer "finished"
    if checkpoints_dir(out).exists():  # an overwritten run's checkpoints must never be resumed into this one
        shutil.rmtree(checkpoints_dir(out))
    atomic.write_text(out / "config.yaml", config.to_yaml())


def eval_dataloader(dataset, collator, batch_size: int, sort_by_length: bool = True):
    """Evaluation batches, longest first: padding shrinks and metrics do not depend on order."""
    lengths = dataset["length"]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort_by_length else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collator,
                                       generator=torch.Generator())  # see `setup`: keep the global RNG untouched


def load_data(config: Config, tokenizer, accelerator, label_names=None, need_train=True) -> tuple[RawData, dict]:
    raw = load_raw(config.data, label_names=label_names, need_train=need_train)
    with accelerator.main_process_first():  # one process tokenises and fills the cache, the rest read it
        tokenized = tokenize_splits(raw, tokenizer, config.data)
    return raw, tokenized


def train_dataloader(config: Config, dataset, collator, accelerator):
    """The epoch batch sampler (sharded across processes by us) and the DataLoader over it."""
    from accelerate.data_loader import prepare_data_loader

    sampler = EpochBatchSampler(dataset["length"], config.train.batch_size, config.train.seed,
                                group_by_length=config.data.group_by_length,
                                num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                                accumulation_steps=config.train.gradient_accumulation_steps)
    # Each DataLoader iterator draws a seed from its generator; with the default (global) one, every
    # epoch start and every evaluation would shift the dropout RNG, so a resumed run would diverge.
    # On a GPU, batches are copied from pinned memory without blocking: a blocking copy waits for the GPU.
    on_gpu = accelerator.device.type == "cuda"
    train_dl = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                           generator=torch.Generator(), pin_memory=on_gpu)
    # Our sampler already shards across processes: Accelerate only places batches on the device
    # and tracks the end of the epoch for gradient accumulation.
    return sampler, prepare_data_loader(train_dl, device=accelerator.device, num_processes=1, process_index=0,
                                        put_on_device=True, rng_types=[], non_blocking=on_gpu)


def check_calibration(config: Config, raw: RawData) -> None:
    if config.eval.calibrate and raw.is_regression:
        raise ConfigError("eval.calibrate: temperature scaling calibrates class probabilities; this is a regression "
                          "task (drop --calibrate)")
    if config.eval.calibrate and raw.multi_label:
        raise ConfigError("eval.calibrate: temperature scaling calibrates a softmax over classes; this is a multi-label "
                          "task (drop --calibrate)")
    if raw.multi_label and config.data.long_text == "chunk":
        raise ConfigError("data.long_text chunk: not supported for multi-label tasks yet (use truncate or head-tail)")
    if config.eval.tune_thresholds and not raw.multi_label:
        raise ConfigError("eval.tune_thresholds: per-label thresholds are for multi-label tasks (lists of labels); "
                          "drop --tune-thresholds")
    if config.eval.tune_thresholds and not raw.eval_splits:
        raise ConfigError("eval.tune_thresholds: needs a validation split to tune on (--validation-file)")
    if config.eval.calibrate and not raw.eval_splits:
        raise ConfigError("eval.calibrate: needs a validation split to fit the temperature on (--validation-file)")


def training_padding(config: Config) -> int | None:
    """A compiled model recompiles per new input shape (and records a CUDA graph per shape): padding bounds that."""
    padding = compile_padding(config.train.compile, config.data.pad_to_multiple_of)
    if padding != config.data.pad_to_multiple_of and "data.pad_to_multiple_of" in config.given:
        log.warning("data.pad_to_multiple_of %s: train.compile %s pads to a multiple of %s (fewer shapes to compile)",
                    config.data.pad_to_multiple_of, config.train.compile, padding)
    return padding


def setup(config: Config, accelerator, state: TrainingState, log_fn) -> Run:
    """Data, model, optimizer and schedule, prepared by Accelerate: everything `train_loop` needs."""
    from accelerate.utils import set_seed

    set_seed(config.train.seed)
    tokenizer = build_tokenizer(config.model.name_or_path)
    raw, tokenized = load_data(config, tokenizer, accelerator)
    for split in ["train", *raw.eval_splits]:
        if "labels" not in tokenized[split].column_names:
            raise DataError(f"{split} split has no labels")
    check_calibration(config, raw)
    collator = Collator(tokenizer, dataclasses.replace(config.data, pad_to_multiple_of=training_padding(config)))
    # The classifier head is initialised from the seed set above, so runs are reproducible.
    model = build_model(config.model.name_or_path, raw.label_names,
                        resolve_attention(config.model.attn_implementation, accelerator.device.type),
                        attention_dropout=config.model.attention_dropout, multi_label=raw.multi_label)
    apply_layer_options(model, config.model.reinit_layers, config.optim.embeddings, config.optim.freeze_layers)
    remember_long_text(model.config, config.data)  # `tuneloop predict` reads long inputs the same way
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    train_windows = tokenized["train"].remove_columns([c for c in ["doc"] if c in tokenized["train"].column_names])
    sampler, train_dl = train_dataloader(config, train_windows, collator, accelerator)
    loss, class_weights = build_loss(config.train.class_weights, raw.splits["train"]["label"], raw.label_names,
                                     accelerator.device, raw.multi_label)
    eval_dls = {s: eval_dataloader(tokenized[s], collator, config.eval.eval_batch_size) for s in raw.eval_splits}

    total_steps = num_training_steps(len(sampler), config.train.epochs, config.train.gradient_accumulation_steps)
    model = prepare_model(model, config.peft, total_steps)  # LoRA / AdaLoRA: frozen base, adapters and head train
    if config.model.dropout_masks == "fast" and accelerator.device.type == "cpu":
        use_fast_dropout(model)  # after PEFT, so that the adapters' dropout draws its masks the same way
    budget = rank_budget(model)
    optimizer = build_optimizer(model, config.optim, accelerator.device)
    # The scheduler is stepped by the loop once per optimizer step and never handed to Accelerate,
    # which would step it once per process (the "N times too fast" schedule).
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *eval_dls.values())
    mark_cudagraph_steps(model, config.train.compile)
    eval_dls = dict(zip(eval_dls, prepared))
    # The scheduler and AdaLoRA's budget are checkpointed by tuneloop as JSON/safetensors, not registered with
    # Accelerate, which would pickle them and unpickle them on resume with weights_only=False.
    if config.peft.method != "none":
        keep_trainable_in_checkpoints(accelerator)
    run = Run(config=config, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
              train_dataloader=train_dl, train_sampler=sampler, eval_dataloaders=eval_dls, metrics=raw.metrics,
              main_metric=raw.main_metric, is_regression=raw.is_regression, num_training_steps=total_steps,
              log=log_fn, state=state, tokenizer=tokenizer, raw=raw, rank_budget=budget, loss=loss,
              class_weights=class_weights)
    return run


def save_model(run: Run, out: Path) -> Path:
    """save_pretrained + tokenizer (adapter runs: adapter + head; model-merged/ on request)."""
    model = run.accelerator.unwrap_model(run.model)
    if run.config.peft.method == "none":
        return save_atomically(out / "model", lambda tmp: (model.save_pretrained(tmp, safe_serialization=True),
                                                           run.tokenizer.save_pretrained(tmp)))
    target = save_atomically(out / "model", lambda tmp: save_adapter(model, run.tokenizer, tmp))
    if run.config.peft.merge_adapter:
        save_atomically(out / "model-merged", lambda tmp: save_merged(model, run.tokenizer, tmp))
    return target


def save_atomically(target: Path, write) -> Path:
    """Written beside and renamed into place, so a crash leaves no half model."""
    out = target.parent
    tmp = out / f"{target.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    old = out / f"{target.name}.old"
    if old.exists():  # left by a save that died while removing it; `target` (or `tmp`) is the model now
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    atomic.fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)
    return target


def write_json(path: Path, data: Any) -> None:
    atomic.write_json(path, data)


def describe_run(run: Run) -> str:
    cfg, acc = run.config, run.accelerator
    global_batch = cfg.train.batch_size * acc.num_processes * cfg.train.gradient_accumulation_steps
    sizes = ", ".join(f"{s}={len(df)}" + (f" ({run.raw.dropped[s]} unlabeled rows dropped)" if run.raw.dropped.get(s)
                                          else "") for s, df in run.raw.splits.items())
    return (f"tuneloop: {sizes} | {acc.num_processes} process(es) on {acc.device}, precision {acc.mixed_precision} | "
            f"global batch {global_batch} = {cfg.train.batch_size} per device x {acc.num_processes} x "
            f"{cfg.train.gradient_accumulation_steps} accumulation | {run.num_training_steps} optimizer steps | "
            + (f"peft {cfg.peft.method}: " if cfg.peft.method != "none" else "") + describe_parameters(run.model)
            + (f" | class weights {describe_weights(run)}" if run.class_weights else ""))


def describe_weights(run: Run) -> str:
    return ", ".join(f"{name} {w:.3f}" for name, w in zip(run.raw.label_names, run.class_weights))


def train(config: Config, hooks: list | None = None) -> dict[str, float]:
    """Fine-tune and evaluate as configured; returns the final evaluation metrics.

    `hooks` are called with every record of metrics.jsonl (e.g. the search's pruning, which may raise).
    Process 0 holds the output folder's run lock from before the existing-run check to the last file written.
    """
    with RunLock(config.output.output_dir) if is_main_process() else contextlib.nullcontext():
        return _train(config, hooks)


def _train(config: Config, hooks: list | None) -> dict[str, float]:
    out = check_output_dir(config)
    accelerator = make_accelerator(config)
    config = resolve_for_device(config, accelerator.device.type)  # what config.yaml and checkpoints record
    config = fit_to_model(config)
    if accelerator.is_main_process:
        ensure_writable(out)
    metrics_log = MetricsLog(out / "metrics.jsonl", enabled=accelerator.is_main_process, sinks=hooks)
    state = TrainingState()
    run = setup(config, accelerator, state, metrics_log)
    start_trackers(accelerator, config, metrics_log)
    if config.checkpoint.resume:
        if accelerator.is_main_process and foreign_checkpoint(out, config.checkpoint.resume) is not None:
            start_run_files(out, config)  # --overwrite: the folder's earlier run must not mix into this one
        path = resume(run, config.checkpoint.resume, config.checkpoint.resume_force)
        if accelerator.is_main_process:
            atomic.write_text(out / "config.yaml", config.to_yaml())
            print(f"tuneloop: resuming from {path} at optimizer step {state.step} "
                  f"(epoch {state.epoch + 1}, batch {state.batch_in_epoch})", flush=True)
    elif accelerator.is_main_process:
        start_run_files(out, config)
    if accelerator.is_main_process:
        print(describe_run(run), flush=True)
    run.stop = StopRequest(announce=accelerator.is_main_process).install()
    started = time.perf_counter()
    try:
        results = train_loop(run)
    except BaseException:
        finish_trackers(accelerator)  # a stopped, pruned or failed run still closes its event files
        raise
    finally:
        run.stop.restore()
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    best = {"main_metric": run.main_metric, "best_metric": state.best_metric, "best_step": state.best_step,
            "stopped_early": state.stopped_early}
    if config.eval.load_best_model:
        best["best_model"] = load_best_weights(run, out)
        best_eval = next((r for r in reversed(metrics_log.records()) if r.get("type") == "eval"
                          and r["step"] == state.best_step), None)  # the log is on process 0's machine
        if best_eval is not None:
            results = {k: v for k, v in best_eval.items() if k not in ("type", "step", "epoch")}
    calibration = calibrate(run) if config.eval.calibrate else None  # every process folds the same T
    if calibration is not None:
        results = {**results, **calibration_summary(calibration)}
    thresholds = tune_thresholds(run) if config.eval.tune_thresholds else None  # stored in the model's config
    if thresholds is not None:
        results = {**results, **thresholds_summary(thresholds)}
    if calibration or thresholds or (config.eval.load_best_model and state.best_step != state.step):
        run.last_dev_rows = None  # the model changed after its last evaluation: predictions.jsonl needs a new pass
    write_outputs(run, out, {**results, "step": state.step, "epoch": state.epoch, **best}, seconds,
                  {"calibration.json": calibration, "thresholds.json": thresholds})
    end_training(run)
    if accelerator.is_main_process and config.output.push_to_hub:
        push_to_hub(out / "model", config.output.push_to_hub)
    return results


def write_outputs(run: Run, out: Path, final: dict[str, Any], seconds: float, records: dict[str, dict | None]) -> None:
    """The finished run's files: model, eval_results, curves, predictions, summary, card (and the records of
    calibration and threshold tuning, where they ran)."""
    if run.eval_dataloaders:
        predictions = dev_predictions(run)  # every process takes part in any gathers
    if not run.accelerator.is_main_process:
        return
    save_model(run, out)
    plot_learning_curves(run.log.records(), out / "learning_curves.png", run.main_metric)
    if run.eval_dataloaders:
        write_predictions(predictions, out / "predictions.jsonl")
    for name, record in records.items():
        if record is not None:
            write_json(out / name, record)
    write_json(out / "run_summary.json", run_summary(run, seconds))
    write_model_card(out / "model", run.config, final, run.raw.task_name, run.raw.metrics)
    # Last: its presence says every other file of the run is complete (each is written whole or not at all).
    write_json(out / "eval_results.json", final)


def end_training(run: Run) -> None:
    """Close trackers and the process group, dropping DDP's reducer first.

    Otherwise the reducer outlives the group and, as its last owner, destroys it while holding the GIL; the
    destructor joins gloo's worker threads, and one of them may still need the GIL to free the last gathered
    tensor: a deadlock that hung process 1 at exit in about one two-process run in five (pytorch#56297)."""
    run.model = run.accelerator.unwrap_model(run.model)
    run.accelerator.free_memory()
    run.accelerator.end_training()


def evaluate_model(config: Config) -> dict[str, dict[str, float]]:
    """Re-evaluate a saved model on the configured data's labelled evaluation splits."""
    accelerator = make_accelerator(config)
    config = fit_to_model(config)
    model_dir = resolve_model_path(config.model.name_or_path)
    tokenizer = build_tokenizer(model_dir)
    label_names = saved_label_names(model_dir)
    raw, tokenized = load_data(config, tokenizer, accelerator, label_names=label_names, need_train=False)
    splits = [s for s in raw.eval_splits if "labels" in tokenized[s].column_names]
    if not splits:
        raise DataError("no labelled validation split to evaluate (give --validation-file or a --data-dir with dev files)")
    model = (load_adapter_model(model_dir, label_names) if is_adapter_dir(model_dir)
             else build_model(model_dir, label_names, multi_label=saved_multi_label(model_dir)))
    collator = Collator(tokenizer, config.data)
    dls = [eval_dataloader(tokenized[s], collator, config.eval.eval_batch_size) for s in splits]
    model, *dls = accelerator.prepare(model, *dls)
    return {s: evaluate(model, dl, accelerator, raw.metrics, raw.is_regression, raw.label_names,
                        config.data.chunk_aggregation) for s, dl in zip(splits, dls)}
