"""Where a training step's time goes: torch.profiler over N real tuneloop steps, top operators by self CPU time.

    python benchmarks/profile_step.py --steps 20                      # the defaults, as resolved on this device
    python benchmarks/profile_step.py --steps 20 --set model.attn_implementation=sdpa --set model.dropout_masks=torch
    python benchmarks/profile_step.py --versus before:model.attn_implementation=sdpa,model.dropout_masks=torch \
        --versus defaults: --rounds 6 --steps 5        # A/B: variants' steps interleaved in one process, no profiler

The step is tuneloop's own: the run is set up by `tuneloop.recipe.setup` (data, model, optimizer, the resolved
`auto` settings), then forward, backward, clipping, AdamW and zero-grad run N times under the profiler (after
2 warm-up steps). Defaults: the bundled MiniLM, MRPC, batch 8, fp32 (`--mixed-precision no`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def profile(flags: dict[str, str], steps: int, warmup: int = 2, rows: int = 12) -> tuple[str, float, dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from tuneloop.config import load_config
    from tuneloop.devices import resolve_for_device
    from tuneloop.loop import TrainingState
    from tuneloop.recipe import make_accelerator, setup

    config = load_config(None, flags)
    accelerator = make_accelerator(config)
    config = resolve_for_device(config, accelerator.device.type)
    run = setup(config, accelerator, TrainingState(), lambda record: None)
    run.train_sampler.select_epoch(0)
    batches = iter(run.train_dataloader)
    model, optimizer = run.model, run.optimizer
    model.train()

    def step():
        loss = model(**next(batches)).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - started
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=42)
    resolved = {"mixed_precision": config.train.mixed_precision, "attn_implementation": config.model.attn_implementation,
                "dropout_masks": config.model.dropout_masks, "embeddings": config.optim.embeddings,
                "pad_to_multiple_of": config.data.pad_to_multiple_of, "threads": torch.get_num_threads()}
    return table, seconds / steps, resolved


def versus(base: dict[str, str], variants: list[str], rounds: int, steps: int) -> list[str]:
    """Median seconds per step of each variant, its steps interleaved round by round with the others', so
    that a machine shared with other work slows every variant alike."""
    import statistics

    import torch

    from tuneloop.config import load_config
    from tuneloop.devices import resolve_for_device
    from tuneloop.loop import TrainingState
    from tuneloop.recipe import make_accelerator, setup

    steppers, times = {}, {}
    for spec in variants:
        name, _, sets = spec.partition(":")
        flags = {**base, **dict(kv.split("=", 1) for kv in sets.split(",") if kv)}
        config = load_config(None, flags)
        accelerator = make_accelerator(config)
        config = resolve_for_device(config, accelerator.device.type)
        run = setup(config, accelerator, TrainingState(), lambda record: None)
        run.train_sampler.select_epoch(0)
        batches = list(run.train_dataloader)  # the same batches in every round
        run.model.train()

        def step(run=run, accelerator=accelerator, batches=batches, i=[0]):
            loss = run.model(**batches[i[0] % len(batches)]).loss
            i[0] += 1
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(run.model.parameters(), 1.0)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)

        step()
        steppers[name], times[name] = step, []
        print(f"{name}: attn {config.model.attn_implementation}, masks {config.model.dropout_masks}, "
              f"embeddings {config.optim.embeddings}, precision {config.train.mixed_precision}", flush=True)
    for _ in range(rounds):
        for name, step in steppers.items():
            torch.manual_seed(0)
            started = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - started) / steps)
    first = next(iter(times))
    return [f"{name}: {1000 * statistics.median(t):.0f} ms per step (median of {rounds} rounds of {steps}; "
            f"{statistics.median(times[first]) / statistics.median(t):.2f}x {first})" for name, t in times.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--data-dir", default=str((ROOT / "../shared/data/glue/MRPC").resolve()))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any tuneloop setting")
    parser.add_argument("--versus", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="A/B timing instead of a profile: one variant per flag (settings on top of --set)")
    parser.add_argument("--rounds", type=int, default=6, help="--versus: rounds of --steps steps per variant")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        flags = {"task": "mrpc", "data_dir": args.data_dir, "batch_size": args.batch_size,
                 "mixed_precision": args.mixed_precision, "output_dir": out, "report_to": "none",
                 **dict(item.split("=", 1) for item in args.set)}
        if args.versus:
            print("\n".join(versus(flags, args.versus, args.rounds, args.steps)))
            return 0
        table, per_step, resolved = profile(flags, args.steps)
    print(f"settings: {' '.join(f'{k}={v}' for k, v in resolved.items())}")
    print(f"{args.steps} steps, batch {args.batch_size}: {1000 * per_step:.0f} ms per step (under the profiler)")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
