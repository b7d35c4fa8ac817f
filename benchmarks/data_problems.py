"""The data people really have, measured: long documents, an imbalanced task, calibrated confidence.

    python benchmarks/data_problems.py            # full (hours on the 2-core box; minutes on a GPU)
    python benchmarks/data_problems.py --quick    # smoke check: tiny subsets, 1 epoch, seed 0 (a few minutes)
    python benchmarks/data_problems.py --parts imbalanced --seeds 0,1,2   # one part

Parts (each row a fresh `python -m tuneloop train` process, the bundled all-MiniLM-L6-v2 unless --model):
  long        documents built from GLUE: 8-20 neutral MRPC news sentences, and one SST-2 sentence (its label is
              the document's) placed after the first 128 tokens, so `truncate` at max_length 128 never sees it.
              Rows: --long-text truncate | head-tail | chunk (stride 32, mean aggregation) | chunk-max (max
              aggregation): document accuracy and training seconds (chunk trains on every window).
  imbalanced  MRPC with the training positives subsampled to 10% (seeded): rows --class-weights none |
              balanced, on every seed; the dev set is MRPC's own. Minority-class (equivalent) recall, macro-F1.
  calibrate   MRPC with --calibrate: ECE (15 bins) and Brier score before/after, cross-fitted on dev.
Results: benchmarks/results-data-problems.json (--quick: results-data-problems-quick.json), with a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
PARTS = ("long", "imbalanced", "calibrate")
LONG_ROWS = {"truncate": ["--long-text", "truncate"], "head-tail": ["--long-text", "head-tail"],
             "chunk": ["--long-text", "chunk", "--stride", "32"],
             "chunk-max": ["--long-text", "chunk", "--stride", "32", "--chunk-aggregation", "max"]}
WEIGHT_ROWS = {"none": ["--class-weights", "none"], "balanced": ["--class-weights", "balanced"]}


def read_tsv(path: Path) -> pd.DataFrame:
    import csv

    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig", dtype=str, keep_default_na=False,
                       on_bad_lines="skip")


def long_documents(n: int, split: str, seed: int, tokenizer) -> pd.DataFrame:
    """n documents: neutral MRPC sentences, the SST-2 sentence after the first 128 tokens."""
    rng = np.random.default_rng(seed)
    mrpc = read_tsv(GLUE / "MRPC" / ("train.tsv" if split == "train" else "dev.tsv"))
    filler = mrpc["#1 String"].tolist()
    sst = read_tsv(GLUE / "SST-2" / ("train.tsv" if split == "train" else "dev.tsv")).sample(n, random_state=seed)
    rows = []
    for sentence, label in zip(sst["sentence"], sst["label"]):
        parts = list(rng.choice(filler, size=int(rng.integers(8, 21)), replace=False))
        tokens = np.cumsum([len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in parts])
        first_allowed = int(np.searchsorted(tokens, 128)) + 1  # every filler before it: > 128 tokens
        at = int(rng.integers(min(first_allowed, len(parts)), len(parts) + 1))
        parts.insert(at, sentence.strip())
        rows.append({"text": " ".join(parts), "label": "positive" if label == "1" else "negative"})
    return pd.DataFrame(rows)


def mrpc_frame(split: str) -> pd.DataFrame:
    df = read_tsv(GLUE / "MRPC" / ("train.tsv" if split == "train" else "dev.tsv"))
    names = {"0": "not_equivalent", "1": "equivalent"}
    return pd.DataFrame({"text": df["#1 String"], "text_pair": df["#2 String"], "label": df["Quality"].map(names)})


def imbalanced_train(seed: int) -> pd.DataFrame:
    df = mrpc_frame("train")
    pos = df[df["label"] == "equivalent"].sample(frac=0.1, random_state=seed)
    return pd.concat([df[df["label"] == "not_equivalent"], pos]).sort_index().reset_index(drop=True)


def write(df: pd.DataFrame, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_json(path, orient="records", lines=True, force_ascii=False)
    return str(path)


def train_row(part: str, row: str, seed: int, flags: list[str], args) -> dict[str, Any]:
    out = args.work_dir / part / f"{row}-seed{seed}"
    cmd = [sys.executable, "-m", "tuneloop", "train", "--output-dir", str(out), "--overwrite", "--seed", str(seed),
           "--report-to", "none", "--checkpoint-every-epoch", "false", *flags, *args.common]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    log = out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    record = {"part": part, "row": row, "seed": seed, "returncode": proc.returncode, "command": cmd,
              "wall_seconds": round(time.perf_counter() - started, 1), "log": str(log)}
    if proc.returncode == 0:
        record["results"] = json.loads((out / "eval_results.json").read_text())
        record["train_seconds"] = json.loads((out / "run_summary.json").read_text())["train_seconds"]
    print(f"{part} {row} seed {seed}: rc {proc.returncode}, {record['wall_seconds']} s", flush=True)
    return record


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def table(runs: list[dict[str, Any]]) -> str:
    lines = []
    ok = [r for r in runs if r["returncode"] == 0]
    by = lambda part, row: [r for r in ok if r["part"] == part and r["row"] == row]
    if any(r["part"] == "long" for r in ok):
        lines += ["| --long-text | document accuracy | training seconds | training windows |", "|---|---|---|---|"]
        for row in LONG_ROWS:
            rs = by("long", row)
            lines.append(f"| {row} | {mean_std([r['results']['accuracy'] for r in rs])} | "
                         f"{mean_std([r['train_seconds'] for r in rs])} | {rs[0].get('windows', '-') if rs else '-'} |")
        lines.append("")
    if any(r["part"] == "imbalanced" for r in ok):
        lines += ["| --class-weights | seeds | recall equivalent (minority) | macro-F1 | accuracy |", "|---|---|---|---|---|"]
        for row in WEIGHT_ROWS:
            rs = by("imbalanced", row)
            lines.append(f"| {row} | {len(rs)} | {mean_std([r['results']['recall_equivalent'] for r in rs])} | "
                         f"{mean_std([r['results']['f1_macro'] for r in rs])} | "
                         f"{mean_std([r['results']['accuracy'] for r in rs])} |")
        lines.append("")
    if any(r["part"] == "calibrate" for r in ok):
        lines += ["| seed | T | ECE before | ECE after | Brier before | Brier after | accuracy |", "|---|---|---|---|---|---|---|"]
        for r in by("calibrate", "calibrate"):
            x = r["results"]
            lines.append(f"| {r['seed']} | {x['temperature']:.3f} | {x['ece_before']:.4f} | {x['ece_after']:.4f} | "
                         f"{x['brier_before']:.4f} | {x['brier_after']:.4f} | {x['accuracy']:.4f} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Long documents, class weights and calibration, measured.")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which parts (default: {','.join(PARTS)})")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the imbalanced rows (long, calibrate: the first)")
    p.add_argument("--quick", action="store_true", help="smoke check: tiny subsets, 1 epoch, seed 0")
    p.add_argument("--model", default=None, help="model of every row (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--long-docs", type=int, nargs=2, default=(2000, 400), metavar=("TRAIN", "DEV"))
    p.add_argument("--work-dir", default=None, help="outputs and logs (default: benchmarks/runs/data-problems-<time>)")
    p.add_argument("--out", default=None, help="JSON results (default: benchmarks/results-data-problems[-quick].json)")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    args.seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    args.common = (["--model", args.model] if args.model else []) + (["--epochs", "1"] if args.quick else [])
    if args.quick:
        args.long_docs = (48, 24)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.work_dir = Path(args.work_dir or ROOT / "benchmarks" / "runs" / f"data-problems-{stamp}").resolve()
    args.out = Path(args.out or ROOT / "benchmarks" / f"results-data-problems{'-quick' if args.quick else ''}.json")
    return args


def plan(args) -> list[tuple[str, str, int, list[str]]]:
    from tuneloop.model import build_tokenizer

    data, steps = args.work_dir / "data", []
    quick = ["--max-train-samples", "128", "--max-eval-samples", "64"] if args.quick else []
    if "long" in args.parts:
        tok = build_tokenizer(args.model)
        files = ["--task", "null", "--train-file", write(long_documents(args.long_docs[0], "train", 0, tok), data / "long-train.jsonl"),
                 "--validation-file", write(long_documents(args.long_docs[1], "dev", 1, tok), data / "long-dev.jsonl"),
                 "--max-length", "128"]
        steps += [("long", row, args.seeds[0], files + flags) for row, flags in LONG_ROWS.items()]
    dev = ["--validation-file", write(mrpc_frame("dev"), data / "mrpc-dev.jsonl"), "--text-columns", "text,text_pair"]
    if "imbalanced" in args.parts:
        for seed in args.seeds:
            train = write(imbalanced_train(seed), data / f"mrpc-train-pos10-seed{seed}.jsonl")
            steps += [("imbalanced", row, seed, ["--task", "mrpc", "--train-file", train, *dev, *quick, *flags])
                      for row, flags in WEIGHT_ROWS.items()]
    if "calibrate" in args.parts:
        steps.append(("calibrate", "calibrate", args.seeds[0], ["--task", "mrpc", "--data-dir", str(GLUE / "MRPC"),
                                                               "--calibrate", *quick]))
    return steps


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started, runs = time.perf_counter(), []
    for part, row, seed, flags in plan(args):
        runs.append(train_row(part, row, seed, flags, args))
        out = args.work_dir / part / f"{row}-seed{seed}" / "run_summary.json"
        if out.is_file() and part == "long":
            runs[-1]["windows"] = json.loads(out.read_text())["data"]["train"].get("windows", "-")
        text = table(runs)
        args.out.write_text(json.dumps({"created": dt.datetime.now().isoformat(timespec="seconds"),
                                        "command": [sys.executable, *sys.argv], "quick": args.quick,
                                        "seconds": round(time.perf_counter() - started, 1), "table_markdown": text,
                                        "runs": runs}, indent=2) + "\n", encoding="utf-8")
    print("\n" + table(runs) + f"\n\nwrote {args.out} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
