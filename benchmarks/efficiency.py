"""Parameter- and memory-efficient fine-tuning and int8 inference, side by side in one run on MRPC.

    python benchmarks/efficiency.py                       # full: the rows below on all of MRPC (about 45 min here)
    python benchmarks/efficiency.py --seeds 0 --rows full,lora   # fewer runs
    python benchmarks/efficiency.py --quick               # smoke check: 256 training examples, 1 epoch
    python benchmarks/efficiency.py --predict-only runs/mrpc/model   # only fp32 vs int8 prediction, on a saved model
    python benchmarks/efficiency.py --rows lora --seeds 0 --no-predict --row "lora_r16=--config lora --lora-rank 16"
                                                          # a recipe probe: extra rows from flags (first seed)

Training rows (each a fresh `python -m tuneloop train` process, one after another, default model):
  full       the default command (`tuneloop train --task mrpc`): every weight trains, 32-bit AdamW   (all seeds)
  lora       `--config lora` (tuneloop/recipes/lora.yaml)                                          (all seeds)
  lora_plus  `--config lora --optim.loraplus_lr_ratio 16` (LoRA+)                                 (first seed)
  adalora    `--config adalora` (tuneloop/recipes/adalora.yaml)                                   (first seed)
  full_8bit  the default command with `--optimizer adamw_8bit` (bitsandbytes)                     (first seed)
Prediction rows, on the model of the `full` row's first seed (the default command's model), all 408 dev pairs:
  fp32       `tuneloop predict`
  int8       `tuneloop predict --quantize int8` (dynamic int8 Linear layers; oneDNN's kernels where the CPU has AMX)
  int8_x86   the same layers packed for PyTorch's default quantized engine (x86), where `int8` uses oneDNN
  int8_export  the folder `tuneloop export --quantize int8` writes (torchao weights), loaded by transformers
Numbers: benchmarks/README.md ("Efficiency benchmark").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench import child_env, machine_info, run_child, tuneloop_measurements  # noqa: E402

DEFAULT_DATA_DIR = "../shared/data/glue/MRPC"
TRAIN_ROWS = {
    "full": ([], "all"),
    "lora": (["--config", "lora"], "all"),
    "lora_plus": (["--config", "lora", "--optim.loraplus_lr_ratio", "16"], "first"),  # LoRA+: B matrices at 16x
    "adalora": (["--config", "adalora"], "first"),
    "full_8bit": (["--optimizer", "adamw_8bit"], "first"),
}
PREDICT_REPEATS = 3  # passes over dev per variant; the median pass is reported


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkpoint_numbers(out_dir: Path) -> dict[str, Any]:
    """Size of the newest checkpoint and of the optimizer state in it."""
    from tuneloop.checkpoint import list_checkpoints

    found = [p for step, p in list_checkpoints(out_dir / "checkpoints") if step >= 0]
    if not found:
        return {}
    newest = found[0]
    optimizer = sum(p.stat().st_size for p in newest.glob("optimizer*"))
    return {"checkpoint_mb": folder_bytes(newest) / 2**20, "optimizer_state_mb": optimizer / 2**20}


def trainable_parameters(log_text: str) -> dict[str, int]:
    m = re.search(r"trainable ([\d,]+) of ([\d,]+) parameters", log_text)
    return {"trainable_params": int(m[1].replace(",", "")), "total_params": int(m[2].replace(",", ""))} if m else {}


def train_row(row: str, seed: int, args) -> dict[str, Any]:
    flags, _ = args.train_rows[row]
    run_dir = args.work_dir / f"{row}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = run_dir / "out"
    cmd = [sys.executable, "-m", "tuneloop", "train", "--task", "mrpc", "--data-dir", args.data_dir,
           "--output-dir", str(out_dir), "--seed", str(seed), *flags]
    if args.model:
        cmd += ["--model", args.model]
    if args.max_train_samples:
        cmd += ["--max-train-samples", str(args.max_train_samples)]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    print(f"[{row} seed {seed}] running (log: {run_dir}/log.txt)", flush=True)
    load_before = os.getloadavg()[0]
    run = {"row": row, "seed": seed, "command": cmd, "load_average_before": load_before,
           **run_child(cmd, child_env(run_dir / "cache"), run_dir / "log.txt")}
    if run["returncode"] != 0:
        run["error"] = (run_dir / "log.txt").read_text(errors="replace").splitlines()[-10:]
        print(f"[{row} seed {seed}] FAILED (exit {run['returncode']}): {run['error'][-1]}", flush=True)
        return run
    measured = tuneloop_measurements(out_dir, run_dir / "cache")
    run.update(dev=measured["dev"], train_seconds=measured["train_seconds"],
               samples_per_second=measured["counts"]["samples"] / measured["train_seconds"],
               model_dir=str(out_dir / "model"), **checkpoint_numbers(out_dir),
               **trainable_parameters((run_dir / "log.txt").read_text(errors="replace")))
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # measured; full runs' would fill the disk
    print(f"[{row} seed {seed}] done: wall {run['wall_seconds']:.0f} s, dev accuracy {run['dev']['accuracy']:.4f}, "
          f"peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
    return run


PREDICT_CHILD = r"""
import json, sys, time, statistics
from pathlib import Path
import pandas as pd
from tuneloop.predict import load_for_prediction, predict_with
model_dir, variant, data_dir, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dev = pd.read_csv(Path(data_dir) / "dev.tsv", sep="\t", quoting=3, encoding="utf-8-sig")
df = pd.DataFrame({"text": dev["#1 String"], "text_pair": dev["#2 String"]})
model, tokenizer = load_for_prediction(model_dir, "int8" if variant == "int8" else None)
if variant == "int8_x86":  # the same int8 layers packed for PyTorch's default engine, not int8_engine()'s choice
    from tuneloop.export import quantize_dynamic_int8
    model = quantize_dynamic_int8(model, "x86")
predict_with(model, tokenizer, df.head(64))  # warm-up: kernel selection, allocator
seconds = []
for _ in range(repeats):
    start = time.perf_counter()
    rows = predict_with(model, tokenizer, df)
    seconds.append(time.perf_counter() - start)
label2id = model.config.label2id
pred = [label2id[r["label"]] for r in rows]
gold = dev["Quality"].tolist()
tp = sum(p == g == 1 for p, g in zip(pred, gold)); fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
print(json.dumps({"seconds": seconds, "accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold),
                  "f1": 2 * tp / (2 * tp + fp + fn), "rows": len(gold)}))
"""


def predict_rows_bench(model_dir: Path, args) -> list[dict[str, Any]]:
    """fp32 vs int8 prediction of the dev set, each in its own process; model size on disk."""
    from tuneloop.export import export, int8_engine

    export_dir = args.work_dir / "export-int8"
    export(str(model_dir), str(export_dir), "int8", overwrite=True)
    variants = [("fp32", model_dir, model_dir / "model.safetensors"),
                ("int8", model_dir, None),
                ("int8_export", export_dir, export_dir / "model.safetensors")]
    if int8_engine() == "onednn":  # what int8 gains from oneDNN's AMX kernels over the default engine
        variants.insert(2, ("int8_x86", model_dir, None))
    results = []
    for name, folder, weights in variants:
        cmd = [sys.executable, "-c", PREDICT_CHILD, str(folder), name, args.data_dir, str(PREDICT_REPEATS)]
        log = args.work_dir / f"predict-{name}.txt"
        print(f"[predict {name}] running", flush=True)
        run = {"row": name, **run_child(cmd, child_env(args.work_dir / "cache"), log)}
        if run["returncode"] == 0:
            out = json.loads(log.read_text().strip().splitlines()[-1])
            median = statistics.median(out["seconds"])
            run.update(predictions_per_second=out["rows"] / median, seconds=out["seconds"], accuracy=out["accuracy"],
                       f1=out["f1"])
            if weights is not None:
                run["weights_mb"] = weights.stat().st_size / 2**20
            else:  # the in-memory int8 model: its state dict as torch.save writes it
                run["weights_mb"] = int8_state_mb(model_dir)
        else:
            run["error"] = log.read_text(errors="replace").splitlines()[-5:]
        results.append(run)
    return results


def int8_state_mb(model_dir: Path) -> float:
    import io

    import torch

    from tuneloop.predict import load_for_prediction

    model, _ = load_for_prediction(str(model_dir), "int8")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("returncode") == 0]
    if not ok:
        return {"runs_ok": 0, "runs": len(runs)}
    out: dict[str, Any] = {"runs_ok": len(ok), "runs": len(runs), "seeds": [r["seed"] for r in ok]}
    for key in ("samples_per_second", "peak_rss_mb", "checkpoint_mb", "optimizer_state_mb", "wall_seconds"):
        if all(key in r for r in ok):
            out[key] = statistics.mean(r[key] for r in ok)
    for metric in ("accuracy", "f1"):
        values = [r["dev"][metric] for r in ok]
        out[metric], out[f"{metric}_std"] = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        out[f"{metric}_per_seed"] = values
    out.update({k: ok[0][k] for k in ("trainable_params", "total_params") if k in ok[0]})
    return out


def tables(summary: dict[str, Any], predictions: list[dict[str, Any]]) -> str:
    lines = ["| row | seeds | dev accuracy | dev F1 | trainable params | train samples/s | peak RSS MB | "
             "checkpoint MB | optimizer state MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, s in summary.items():
        if not s.get("runs_ok"):
            lines.append(f"| {row} | {'failed' if s.get('runs') else 'not run'} | | | | | | | |")
            continue
        share = f"{s['trainable_params']:,} ({100 * s['trainable_params'] / s['total_params']:.2f}%)" \
            if "trainable_params" in s else "?"
        lines.append(f"| {row} | {','.join(map(str, s['seeds']))} | {s['accuracy']:.4f} ± {s['accuracy_std']:.4f} | "
                     f"{s['f1']:.4f} ± {s['f1_std']:.4f} | {share} | {s['samples_per_second']:.1f} | "
                     f"{s.get('peak_rss_mb', float('nan')):.0f} | {s.get('checkpoint_mb', float('nan')):.1f} | "
                     f"{s.get('optimizer_state_mb', float('nan')):.1f} |")
    if not summary:  # --predict-only
        lines = []
    if predictions:
        lines += ["", "| prediction (dev, 408 pairs, batch 32) | dev accuracy | dev F1 | predictions/s | weights on disk MB |",
                  "|---|---:|---:|---:|---:|"]
        for p in predictions:
            if p["returncode"] != 0:
                lines.append(f"| {p['row']} | failed | | | |")
                continue
            lines.append(f"| {p['row']} | {p['accuracy']:.4f} | {p['f1']:.4f} | {p['predictions_per_second']:.1f} | "
                         f"{p['weights_mb']:.1f} |")
    return "\n".join(lines)


def targets(summary: dict[str, Any], predictions: list[dict[str, Any]]) -> list[str]:
    out = []

    def check(ok, text):
        out.append(f"- {'PASS' if ok else 'FAIL'}  {text}")

    full, lora = summary.get("full", {}), summary.get("lora", {})
    if full.get("runs_ok") and lora.get("runs_ok"):
        gap = 100 * (full["accuracy"] - lora["accuracy"])
        check(gap <= 1.5, f"LoRA dev accuracy within 1.5 points of full fine-tuning: {gap:+.2f} points behind "
                          f"(means over seeds {lora['seeds']} / {full['seeds']})")
        share = 100 * lora["trainable_params"] / lora["total_params"]
        check(share < 2, f"LoRA trains < 2% of the parameters: {share:.2f}%")
        if "peak_rss_mb" in lora and "peak_rss_mb" in full:
            check(lora["peak_rss_mb"] < full["peak_rss_mb"],
                  f"LoRA peak RSS below full fine-tuning's: {lora['peak_rss_mb']:.0f} vs {full['peak_rss_mb']:.0f} MB")
        check(lora["checkpoint_mb"] < full["checkpoint_mb"],
              f"LoRA checkpoint below full fine-tuning's: {lora['checkpoint_mb']:.1f} vs {full['checkpoint_mb']:.1f} MB")
    by = {p["row"]: p for p in predictions if p.get("returncode") == 0}
    if "fp32" in by and "int8" in by:
        speed = by["int8"]["predictions_per_second"] / by["fp32"]["predictions_per_second"]
        check(speed >= 1.5, f"int8 prediction >= 1.5x fp32 predictions/s: {speed:.2f}x")
        drop = 100 * (by["fp32"]["accuracy"] - by["int8"]["accuracy"])
        check(drop <= 1.0, f"int8 dev accuracy within 1 point of fp32: {drop:+.2f} points behind")
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Full vs LoRA vs AdaLoRA, 8- vs 32-bit AdamW, fp32 vs int8 prediction.")
    parser.add_argument("--rows", default=",".join(TRAIN_ROWS), help=f"training rows (default: {','.join(TRAIN_ROWS)})")
    parser.add_argument("--row", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra training row (first seed only), e.g. --row \"lora_r16=--config lora --lora-rank 16 "
                             "--lora-alpha 32\"; the probes that chose the lora recipe were run this way")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the full and lora rows (others: the first)")
    parser.add_argument("--no-predict", action="store_true", help="skip the fp32/int8 prediction rows")
    parser.add_argument("--predict-only", metavar="MODEL_DIR", default=None,
                        help="only the prediction rows, on this saved model (e.g. a full row's out/model); no training")
    parser.add_argument("--quick", action="store_true", help="smoke check: 256 training examples, 1 epoch, seed 0")
    parser.add_argument("--max-train-samples", type=int, default=None, help="train every row on the first N examples")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every row (with --max-train-samples)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default=None, help="model of every row (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--work-dir", default=None, help="outputs and logs (default: benchmarks/runs/efficiency-<time>)")
    parser.add_argument("--out", default=None, help="JSON results (default: benchmarks/results-efficiency.json)")
    args = parser.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    args.train_rows = dict(TRAIN_ROWS)
    for spec in args.row:
        name, sep, flags = spec.partition("=")
        if not sep or not name or name in args.train_rows:
            parser.error(f"--row {spec!r}: expected NAME=FLAGS with a new NAME")
        args.train_rows[name] = (shlex.split(flags), "first")
        args.rows.append(name)
    args.rows = [] if args.predict_only else list(dict.fromkeys(args.rows))
    if unknown := [r for r in args.rows if r not in args.train_rows]:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(args.train_rows)} or add one with --row")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.max_train_samples, args.epochs = 256, 1
    if args.quick:
        args.seeds = args.seeds[:1]
    args.data_dir = str(Path(args.data_dir).resolve() if args.data_dir else (ROOT / DEFAULT_DATA_DIR).resolve())
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.work_dir = Path(args.work_dir or ROOT / "benchmarks" / "runs" / f"efficiency-{stamp}").resolve()
    suffix = "-quick" if args.quick else "-predict" if args.predict_only else ""
    args.out = Path(args.out or ROOT / "benchmarks" / f"results-efficiency{suffix}.json")
    return args


def plan(args) -> list[tuple[str, int]]:
    """Seed by seed: every row's first seed (and the prediction rows) before any row's second, so a run cut
    short still has one of everything."""
    steps = []
    for i, seed in enumerate(args.seeds):
        steps += [(row, seed) for row in args.rows if i == 0 or args.train_rows[row][1] == "all"]
        if i == 0 and "full" in args.rows and not args.no_predict:
            steps.insert(steps.index(("full", seed)) + 1, ("predict", seed))
    return steps


def report(args, runs, predictions, started, final: bool) -> str:
    summary = {row: summarise([r for r in runs if r["row"] == row]) for row in args.rows}
    table, verdicts = tables(summary, predictions), targets(summary, predictions)
    result = {"created": dt.datetime.now().isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
              "complete": final, "quick": args.quick, "seeds": args.seeds, "machine": machine_info(),
              "summary": summary, "predictions": predictions, "targets": verdicts, "table_markdown": table,
              "seconds": time.perf_counter() - started, "runs": runs}
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")  # after every run: a cut-short run keeps its rows
    return table + "\n\n" + "\n".join(verdicts)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs, predictions = [], []
    if args.predict_only:  # parse_args left no training rows
        predictions = predict_rows_bench(Path(args.predict_only).resolve(), args)
    for row, seed in plan(args):
        if row == "predict":
            first_full = next((r for r in runs if r["row"] == "full" and r["returncode"] == 0), None)
            predictions = predict_rows_bench(Path(first_full["model_dir"]), args) if first_full else []
        else:
            runs.append(train_row(row, seed, args))
        text = report(args, runs, predictions, started, final=False)
    text = report(args, runs, predictions, started, final=True)
    print("\n" + text)
    loads = [r["load_average_before"] for r in runs]
    if loads and max(loads) > (os.cpu_count() or 1):
        print(f"\nWarning: 1-minute load average up to {max(loads):.1f} on {os.cpu_count()} CPUs before a row: "
              f"other work shared the machine; absolute throughput is disturbed (ratios less so).")
    print(f"\nwrote {args.out} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0 if all(r["returncode"] == 0 for r in runs + predictions) else 1


if __name__ == "__main__":
    sys.exit(main())
