"""The benchmark: the course loop, the HF Trainer and tuneloop, side by side on the same data and machine.

    python benchmarks/bench.py                 # full: rows a-f, seed 0, 3 epochs of MRPC (e, f: 1 epoch; about 40 minutes here)
    python benchmarks/bench.py --quick         # smoke check: the first 512 training examples, 2 epochs
    python benchmarks/bench.py --seeds 0,1,2 --rows a,d --out benchmarks/results-seeds.json

Rows (each one runs as its own fresh process, one after another):
  a  REFERENCE: the Hugging Face course's chapter 3 loop, as the course writes it (benchmarks/course_loop.py)
  b  the HF Trainer with the course's hyperparameters (benchmarks/hf_trainer.py)
  c  tuneloop (`python -m tuneloop train`) with the course's hyperparameters (SAME_AS_COURSE)
  d  tuneloop's default recipe (DEFAULT_RECIPE)
  e  the course loop on a tiny model (2 layers, hidden 32, random weights): a step is nearly all framework overhead
  f  tuneloop, course hyperparameters, fp32, on the same tiny model (seconds per optimizer step vs e's)
  g  tuneloop, course hyperparameters, torch.compile with CUDA graphs (`--train.compile reduce-overhead`; GPUs)
  h  row c in fp32 (`--mixed-precision no`): what a CPU without fast bf16 trains in
  i  row d in fp32 (`--mixed-precision no`)
Prints a Markdown table, the ratios the issue's targets are stated in, and writes JSON. How each number
is measured: benchmarks/README.md (and the `how_measured` block of the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.* and this checkout's tuneloop, not an installed one

from benchmarks.flops import matmul_peak, mfu, model_shape, training_flops  # noqa: E402
from benchmarks.tokens import TokenCounts, plan_counts  # noqa: E402
from tuneloop.model import default_model_path  # noqa: E402

DEFAULT_DATA_DIR = "../shared/data/glue/MRPC"  # relative to the repository root

# (c) tuneloop with the course's hyperparameters: batch 8, lr 5e-5, linear schedule without warmup,
# weight decay 0.01 as the course's torch AdamW default (tuneloop leaves biases and LayerNorm out).
# tuneloop's own defaults stay for the rest: gradient clipping at 1.0, max_length 128 (no MRPC pair is
# longer than 103 tokens, so this truncates nothing), eval batch 32, evaluation at every epoch end.
SAME_AS_COURSE = ["--epochs", "3", "--batch-size", "8", "--learning-rate", "5e-5", "--weight-decay", "0.01",
                  "--warmup-ratio", "0", "--optim.lr_scheduler", "linear"]

# (d) tuneloop's default recipe. The ONE place to change it.
DEFAULT_RECIPE = ["--config", "fast"]  # tuneloop/recipes/fast.yaml

ROWS = {
    "a": "course loop (reference)",
    "b": "HF Trainer, course hparams",
    "c": "tuneloop, course hparams",
    "d": "tuneloop, default recipe",
    "e": "course loop, tiny model",
    "f": "tuneloop, tiny model, fp32",
    "g": "tuneloop, course hparams, compiled",
    "h": "tuneloop, course hparams, fp32",
    "i": "tuneloop, default recipe, fp32",
}
TINY_ROWS = ("e", "f")
TINY_EPOCHS = 1  # per-step overhead does not need three epochs
# (g) row c with torch.compile and CUDA graphs over a bounded set of padded shapes.
COMPILED = ["--train.compile", "reduce-overhead"]
FP32 = ["--mixed-precision", "no"]
# The flags of every tuneloop row (before --epochs / --max-train-samples, which apply to every row alike).
TUNELOOP_ROWS = {"c": SAME_AS_COURSE, "d": DEFAULT_RECIPE, "f": [*SAME_AS_COURSE, *FP32],
                 "g": [*SAME_AS_COURSE, *COMPILED], "h": [*SAME_AS_COURSE, *FP32], "i": [*DEFAULT_RECIPE, *FP32]}

QUICK = {"max_train_samples": 512, "epochs": 2}  # 128 steps per row at batch 8; the same for every row

TARGETS = [  # (ratio key, comparison, threshold, text)
    ("c_over_a_samples_per_second", ">=", 1.8, "tuneloop (same hparams) samples/s >= 1.8x course loop"),
    ("c_over_b_samples_per_second", ">=", 1.5, "tuneloop (same hparams) samples/s >= 1.5x HF Trainer"),
    ("d_over_a_wall_seconds", "<=", 0.40, "default recipe wall time <= 40% of course loop"),
    ("d_minus_a_accuracy", ">=", 0.0, "default recipe dev accuracy (mean over seeds) >= course loop"),
    ("c_over_a_peak_rss", "<=", 1.0, "tuneloop (same hparams) peak RSS <= course loop"),
    ("d_over_a_peak_rss", "<=", 1.0, "default recipe peak RSS <= course loop"),
    ("f_over_e_seconds_per_step", "<=", 1.0, "tiny model: tuneloop seconds per optimizer step <= course loop's"),
]

HOW_MEASURED = {
    "samples_per_second": "training examples trained / training seconds",
    "train_seconds": ("rows a, b: time.perf_counter around the training loop only (after tokenisation and model "
                      "load, before evaluation). tuneloop rows: reconstructed from metrics.jsonl: every train line's "
                      "samples_per_second covers the optimizer steps since the previous line (their samples are "
                      "known from tuneloop's batch plan), so samples / rate gives each interval's seconds; the "
                      "interval after an epoch-end evaluation also contains that evaluation, so its seconds are "
                      "replaced by its samples / the median rate of the other intervals"),
    "real_tokens_per_second": "non-padding tokens trained (attention-mask ones, every epoch) / training seconds",
    "padding_share": "1 - real tokens / (batch size x padded length, summed over training batches)",
    "token_counts": ("rows a, b: counted in-process by a wrapper around the collator that builds each training "
                     "batch. tuneloop rows: replayed from tuneloop.batching.plan_epoch on the lengths of "
                     "tuneloop's own cached tokenisation of the run (read back from the run's cache)"),
    "wall_seconds": ("the whole command: from starting the child process to its exit, including interpreter "
                     "start, imports, reading data, tokenisation (tuneloop rows get an empty tokenisation cache), "
                     "model load, training, evaluation and whatever the row writes"),
    "peak_rss_mb": "ru_maxrss of that child process alone, from os.wait4 (MiB)",
    "dev_metrics": "accuracy and F1 (scikit-learn) on the full MRPC dev set (408) after the last epoch",
    "mfu": ("training FLOPs / training seconds / matmul peak of the row's precision (fp32, tf32 or bf16) on the "
            "device the rows ran on (the GPU when there is one, else the CPU), the peak being the best of 10 timed "
            "matmuls (2048^3 on a CPU, 8192^3 on a GPU), measured before and after the rows (the higher is used). "
            "Training FLOPs = 6 x non-embedding params x real tokens + 12 x layers x hidden x sum over trained "
            "examples of real_length^2 (attention over an example's own real tokens only: padding is not "
            "useful work)"),
    "seconds_per_step": "train seconds / optimizer steps (rows e, f: the per-step cost of the loop around a tiny model)",
    "seeds": "with several seeds, each number is the mean over seeds; accuracy and F1 also get the sample std",
}


def child_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               TUNELOOP_CACHE=str(cache_dir), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


def run_child(cmd: list[str], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run one row as a fresh process; its exit status, whole-command wall time and its own peak RSS."""
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone (RUSAGE_CHILDREN would mix rows)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def tiny_model(work_dir: Path) -> Path:
    """A 2-layer, hidden-32 BERT with random weights and the default model's tokenizer (as tests/conftest.py)."""
    path = work_dir / "tiny-bert"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(1234)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def row_model(row: str, args) -> str:
    return str(tiny_model(args.work_dir)) if row in TINY_ROWS else args.model


def row_epochs(row: str, args) -> int:
    return args.epochs or (TINY_EPOCHS if row in TINY_ROWS else 3)


def reference_command(row: str, args, seed: int, run_dir: Path, results: Path) -> list[str]:
    script = {"a": "course_loop.py", "b": "hf_trainer.py", "e": "course_loop.py"}[row]
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--data-dir", args.data_dir,
           "--model", row_model(row, args), "--seed", str(seed), "--epochs", str(row_epochs(row, args)),
           "--results", str(results)]
    if row == "b":
        cmd += ["--output-dir", str(run_dir / "trainer")]
    if args.max_train_samples:
        cmd += ["--max-train-samples", str(args.max_train_samples)]
    return cmd


def tuneloop_command(row: str, args, seed: int, out_dir: Path) -> list[str]:
    flags = TUNELOOP_ROWS[row]
    cmd = [sys.executable, "-m", "tuneloop", "train", "--task", "mrpc", "--data-dir", args.data_dir,
           "--model", row_model(row, args), "--output-dir", str(out_dir), "--seed", str(seed), *flags]
    if args.epochs or row in TINY_ROWS:  # later flags win: --quick / --epochs apply to every row alike
        cmd += ["--epochs", str(row_epochs(row, args))]
    if args.max_train_samples:
        cmd += ["--max-train-samples", str(args.max_train_samples)]
    return cmd


def tuneloop_train_seconds(records: list[dict[str, Any]], step_samples: list[int]) -> dict[str, Any]:
    """Training seconds from metrics.jsonl, evaluation excluded (see HOW_MEASURED['train_seconds'])."""
    intervals = []  # (samples, seconds, contains an evaluation)
    previous_step, eval_pending = 0, False
    for record in records:
        if record.get("type") == "eval":
            eval_pending = True
        elif record.get("type") == "train":
            samples = sum(step_samples[previous_step: record["step"]])
            intervals.append((samples, samples / record["samples_per_second"], eval_pending))
            previous_step, eval_pending = record["step"], False
    if previous_step != len(step_samples):
        raise ValueError(f"metrics.jsonl ends at step {previous_step}, the batch plan has {len(step_samples)} steps")
    clean_rates = [s / t for s, t, with_eval in intervals if not with_eval]
    raw = sum(t for _, t, _ in intervals)
    if not clean_rates:
        return {"train_seconds": raw, "train_seconds_raw": raw, "eval_seconds_removed": 0.0, "intervals": len(intervals)}
    rate = statistics.median(clean_rates)
    corrected = sum(t if not with_eval else s / rate for s, t, with_eval in intervals)
    return {"train_seconds": corrected, "train_seconds_raw": raw, "eval_seconds_removed": raw - corrected,
            "intervals": len(intervals), "intervals_with_eval": sum(e for _, _, e in intervals)}


def tuneloop_measurements(out_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """What rows a and b measure in-process, rebuilt for a finished tuneloop run from its output folder."""
    from tuneloop.compiling import compile_padding
    from tuneloop.config import load_config
    from tuneloop.data import load_raw, tokenize_splits
    from tuneloop.model import build_tokenizer

    config = load_config(str(out_dir / "config.yaml"), {})
    config.data.cache_dir = str(cache_dir)  # the run's own cache: the lengths it trained on
    tokenizer = build_tokenizer(config.model.name_or_path)
    lengths = tokenize_splits(load_raw(config.data), tokenizer, config.data)["train"]["length"]
    counts, step_samples = plan_counts(lengths, config.train.batch_size, config.train.seed, config.train.epochs,
                                       config.data.group_by_length, config.data.padding, config.data.max_length,
                                       compile_padding(config.train.compile, config.data.pad_to_multiple_of),
                                       config.train.gradient_accumulation_steps)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timing = tuneloop_train_seconds(records, step_samples)
    final = json.loads((out_dir / "eval_results.json").read_text())
    return {
        **timing,
        "train_seconds_how": "reconstructed from metrics.jsonl, epoch-end evaluations removed",
        "counts": counts.as_dict(),
        "counts_how": "replayed from tuneloop.batching.plan_epoch on the run's cached tokenisation",
        "optimizer_steps": len(step_samples),
        # config.yaml holds the resolved precision (no, tf32, bf16 or fp16); older runs may still say auto
        "precision": precision_label(config.train.mixed_precision, config.model.name_or_path),
        "dev": {"accuracy": final["accuracy"], "f1": final["f1"], "num_examples": final.get("num_examples")},
        "hyperparameters": {"epochs": config.train.epochs, "batch_size": config.train.batch_size,
                            "learning_rate": config.optim.learning_rate, "weight_decay": config.optim.weight_decay,
                            "weight_decay_on": "matrices only", "scheduler": config.optim.lr_scheduler,
                            "warmup_ratio": config.optim.warmup_ratio, "max_grad_norm": config.optim.max_grad_norm,
                            "max_length": config.data.max_length, "group_by_length": config.data.group_by_length,
                            "mixed_precision": config.train.mixed_precision, "seed": config.train.seed,
                            "train_examples": len(lengths)},
    }


def run_row(row: str, seed: int, args, work_dir: Path) -> dict[str, Any]:
    run_dir = work_dir / f"{row}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = run_dir / "cache"
    results = run_dir / "measurements.json"
    out_dir = run_dir / "out"
    cmd = (reference_command(row, args, seed, run_dir, results) if row in ("a", "b", "e")
           else tuneloop_command(row, args, seed, out_dir))
    load_before = os.getloadavg()[0]
    print(f"[{row} seed {seed}] {ROWS[row]}: running (log: {run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir}/log.txt)", flush=True)
    process = run_child(cmd, child_env(cache_dir), run_dir / "log.txt")
    run = {"row": row, "label": ROWS[row], "seed": seed, "command": cmd, "load_average_before": load_before, **process}
    if process["returncode"] != 0:
        tail = (run_dir / "log.txt").read_text(errors="replace").splitlines()[-15:]
        print(f"[{row} seed {seed}] FAILED (exit {process['returncode']}):\n  " + "\n  ".join(tail), flush=True)
        run["error"] = tail
        return run
    run.update(json.loads(results.read_text()) if row in ("a", "b", "e") else tuneloop_measurements(out_dir, cache_dir))
    run["model"] = row_model(row, args)
    if row not in ("a", "b", "e") and not args.keep_models:
        shutil.rmtree(out_dir / "model", ignore_errors=True)
    print(f"[{row} seed {seed}] done: wall {run['wall_seconds']:.1f} s, train {run['train_seconds']:.1f} s, "
          f"dev accuracy {run['dev']['accuracy']:.4f}", flush=True)
    return run


def precision_label(mixed_precision: str, model: str | None) -> str:
    """The matmul peak a row is held against: fp32, tf32 (fp32 on TF32 tensor cores), bf16 or fp16."""
    from tuneloop.precision import resolve_mixed_precision

    resolved = resolve_mixed_precision(mixed_precision, model=model) if mixed_precision == "auto" else mixed_precision
    return {"no": "fp32"}.get(resolved, resolved)


def device_peaks() -> tuple[str, dict[str, float], dict[str, Any]]:
    """Matmul peaks of the device the rows run on (the first GPU, else the CPU), in every precision a row uses."""
    import torch

    if torch.cuda.is_available():
        device, n = "cuda", 8192
        dtypes = ("fp32", "tf32", "bf16", "fp16")
    else:
        device, n = "cpu", 2048
        dtypes = ("fp32", "bf16")
    measured = {d: matmul_peak(d, n=n, device=device) for d in dtypes}
    return device, {d: m["peak_flops_per_second"] for d, m in measured.items()}, measured


def derive(run: dict[str, Any], shape: dict[str, Any], peaks: dict[str, float]) -> None:
    """Throughput, padding and MFU of one finished run (in place)."""
    counts, seconds = TokenCounts(**{k: v for k, v in run["counts"].items() if k != "padding_share"}), run["train_seconds"]
    run["seconds_per_step"] = seconds / run["optimizer_steps"]
    flops = training_flops(shape["non_embedding_params"], shape["layers"], shape["hidden"], counts.real_tokens,
                           counts.sum_sq_len)
    run.update(samples_per_second=counts.samples / seconds, real_tokens_per_second=counts.real_tokens / seconds,
               padding_share=counts.padding_share, training_flops=flops, achieved_flops_per_second=flops / seconds,
               mfu=mfu(flops, seconds, peaks.get(run["precision"], peaks["fp32"])), mfu_peak=run["precision"])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every number; sample std of accuracy and F1."""
    ok = [r for r in runs if r["returncode"] == 0]
    if not ok:
        return {"runs_ok": 0, "runs": len(runs)}
    keys = ["samples_per_second", "real_tokens_per_second", "padding_share", "train_seconds", "wall_seconds",
            "peak_rss_mb", "mfu", "seconds_per_step"]
    out = {k: statistics.mean(r[k] for r in ok) for k in keys}
    for metric in ("accuracy", "f1"):
        values = [r["dev"][metric] for r in ok]
        out[metric] = statistics.mean(values)
        out[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out.update(runs_ok=len(ok), runs=len(runs), seeds=[r["seed"] for r in ok], precision=ok[0]["precision"])
    return out


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    def have(*rows):
        return all(summary.get(r, {}).get("runs_ok") for r in rows)

    out = {}
    if have("a", "c"):
        out["c_over_a_samples_per_second"] = summary["c"]["samples_per_second"] / summary["a"]["samples_per_second"]
        out["c_over_a_peak_rss"] = summary["c"]["peak_rss_mb"] / summary["a"]["peak_rss_mb"]
    if have("b", "c"):
        out["c_over_b_samples_per_second"] = summary["c"]["samples_per_second"] / summary["b"]["samples_per_second"]
    if have("a", "d"):
        out["d_over_a_wall_seconds"] = summary["d"]["wall_seconds"] / summary["a"]["wall_seconds"]
        out["d_minus_a_accuracy"] = summary["d"]["accuracy"] - summary["a"]["accuracy"]
        out["d_over_a_peak_rss"] = summary["d"]["peak_rss_mb"] / summary["a"]["peak_rss_mb"]
    if have("e", "f"):
        out["f_over_e_seconds_per_step"] = summary["f"]["seconds_per_step"] / summary["e"]["seconds_per_step"]
    if have("c", "g"):
        out["g_over_c_samples_per_second"] = summary["g"]["samples_per_second"] / summary["c"]["samples_per_second"]
    return out


def markdown_table(summary: dict[str, dict[str, Any]], several_seeds: bool, device: str = "") -> str:
    lines = ([f"Device: {device}", ""] if device else []) + [
        "| row | samples/s | real tokens/s | padding | train s | ms/step | wall s | peak RSS MB | dev accuracy | dev F1 | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, s in summary.items():
        name = f"{row}: {ROWS[row]}"
        if not s.get("runs_ok"):
            lines.append(f"| {name} | failed |  |  |  |  |  |  |  |  |  |")
            continue
        acc = f"{s['accuracy']:.3f} ± {s['accuracy_std']:.3f}" if several_seeds else f"{s['accuracy']:.3f}"
        f1 = f"{s['f1']:.3f} ± {s['f1_std']:.3f}" if several_seeds else f"{s['f1']:.3f}"
        lines.append(f"| {name} | {s['samples_per_second']:.1f} | {s['real_tokens_per_second']:.0f} | "
                     f"{100 * s['padding_share']:.1f}% | {s['train_seconds']:.1f} | {1000 * s['seconds_per_step']:.1f} | "
                     f"{s['wall_seconds']:.1f} | "
                     f"{s['peak_rss_mb']:.0f} | {acc} | {f1} | {100 * s['mfu']:.1f}% ({s['precision']}) |")
    return "\n".join(lines)


def targets_text(r: dict[str, float]) -> list[str]:
    lines = []
    for key, op, threshold, text in TARGETS:
        if key not in r:
            continue
        ok = r[key] >= threshold if op == ">=" else r[key] <= threshold
        lines.append(f"- {'PASS' if ok else 'FAIL'}  {text}: {r[key]:.3f} (target {op} {threshold})")
    return lines


def machine_info() -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"device": gpu or cpu, "gpu": gpu, "cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "git_commit": commit, "git_dirty": dirty}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Course loop vs HF Trainer vs tuneloop on MRPC (see benchmarks/README.md).")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke check: the first {QUICK['max_train_samples']} training examples, {QUICK['epochs']} epochs, every row")
    parser.add_argument("--rows", default="a,b,c,d,e,f", help="rows to run, in order (default: a,b,c,d,e,f; g: compiled, "
                                                              "for GPUs; h, i: c and d in fp32)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every row runs once per seed (default: 0)")
    parser.add_argument("--out", default=None, help="JSON results (default: benchmarks/results.json, with --quick results-quick.json)")
    parser.add_argument("--data-dir", default=None, help=f"GLUE MRPC folder (default: {DEFAULT_DATA_DIR} from the repository root)")
    parser.add_argument("--model", default=None, help="checkpoint for every row (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs of every row")
    parser.add_argument("--max-train-samples", type=int, default=None, help="train every row on the first N examples only")
    parser.add_argument("--work-dir", default=None, help="per-run logs and outputs (default: benchmarks/runs/<time>)")
    parser.add_argument("--keep-models", action="store_true", help="keep tuneloop's saved model folders")
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.quick:
        args.epochs = args.epochs or QUICK["epochs"]
        args.max_train_samples = args.max_train_samples or QUICK["max_train_samples"]
    args.data_dir = str(Path(args.data_dir).resolve() if args.data_dir else (ROOT / DEFAULT_DATA_DIR).resolve())
    args.model = args.model or default_model_path()
    args.out = Path(args.out or ROOT / "benchmarks" / ("results-quick.json" if args.quick else "results.json"))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.work_dir = Path(args.work_dir or ROOT / "benchmarks" / "runs" / (stamp + ("-quick" if args.quick else "")))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not (Path(args.data_dir) / "train.tsv").is_file():
        print(f"bench: no MRPC train.tsv in {args.data_dir} (pass --data-dir)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench: rows {','.join(args.rows)}, seeds {args.seeds}, "
          f"{'quick ' if args.quick else ''}epochs {args.epochs or 'per row (3)'}, "
          f"train examples {args.max_train_samples or 'all'}; work dir {args.work_dir}", flush=True)

    machine = machine_info()
    peak_device, peaks_before, measured_before = device_peaks()
    shapes = {args.model: model_shape(args.model)}
    runs = [run_row(row, seed, args, args.work_dir) for seed in args.seeds for row in args.rows]
    _, peaks_after, measured_after = device_peaks()
    peaks = {d: max(peaks_before[d], peaks_after[d]) for d in peaks_before}
    peaks.setdefault("fp16", peaks["fp32"])  # no fp16 matmul fast path on a CPU; only used if a row trains in fp16
    for run in runs:
        if run["returncode"] == 0:
            shapes.setdefault(run["model"], model_shape(run["model"]))
            derive(run, shapes[run["model"]], peaks)
    shape = shapes[args.model]

    summary = {row: summarise([r for r in runs if r["row"] == row]) for row in args.rows}
    r = ratios(summary)
    table = markdown_table(summary, len(args.seeds) > 1, machine["device"])
    print()
    if args.quick:
        print(f"**Smoke check** (`--quick`: first {args.max_train_samples} examples, {args.epochs} epochs): "
              f"the numbers are not a measurement.\n")
    print(table)
    print(f"\nMatmul peaks on {machine['device']} ({peak_device}, best of 10): "
          + ", ".join(f"{d} {v / 1e9:.0f} GFLOP/s" for d, v in peaks.items())
          + f"; non-embedding parameters {shape['non_embedding_params'] / 1e6:.2f} M of {shape['params'] / 1e6:.2f} M")
    if r:
        print("\nRatios and the issue's targets:")
        print("\n".join(targets_text(r)))
    loads = [run["load_average_before"] for run in runs]
    if max(loads) > (os.cpu_count() or 1):
        print(f"\nWarning: 1-minute load average up to {max(loads):.1f} on {os.cpu_count()} CPUs before a row: "
              f"other work shared the machine; throughput numbers are disturbed.")

    result = {
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "quick": args.quick, "rows": args.rows, "seeds": args.seeds, "epochs_override": args.epochs,
        "max_train_samples": args.max_train_samples, "data_dir": args.data_dir, "model": args.model,
        "work_dir": str(args.work_dir), "bench_seconds": time.perf_counter() - started,
        "device": machine["device"], "machine": machine, "model_shape": shape, "model_shapes": shapes,
        "matmul_peak": {"device": peak_device, "used_flops_per_second": peaks, "before": measured_before,
                        "after": measured_after},
        "recipes": TUNELOOP_ROWS,
        "summary": summary, "ratios": r, "targets": targets_text(r), "table_markdown": table,
        "how_measured": HOW_MEASURED, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out} ({result['bench_seconds'] / 60:.1f} min)")
    return 0 if all(run["returncode"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
