"""Issue 20's check, in one run: the course loop, tuneloop at the course's hyperparameters and `--config fast`,
in fp32 and in the machine's best precision, on seeds that did not choose the recipe, with a seed table.

    python benchmarks/fast_recipe.py                     # checking: seeds 3,4,5,6,7, full MRPC, 3 epochs (hours)
    python benchmarks/fast_recipe.py --seeds 0,1,2       # choosing: the seeds a recipe may be picked on
    python benchmarks/fast_recipe.py --tiny              # proves the command: 256 examples, 1 epoch, seed 3

Rows (bench.py's, each a fresh process, one after another, every seed):
  a  the course loop (fp32, as the course writes it)
  h  tuneloop, course hyperparameters, fp32 (`--mixed-precision no`)       i  `--config fast`, fp32
  c  tuneloop, course hyperparameters, best precision (`auto`)             d  `--config fast`, best precision
Where `auto` resolves to fp32 (a CPU without fast bf16), c and d would repeat h and i and are left out.
Prints bench.py's table, the seed table (dev accuracy per seed, mean and sample std) and issue 20's targets;
writes bench.py's JSON plus a `fast_recipe` block (default benchmarks/results-fast-recipe.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench  # noqa: E402

CHOOSING_SEEDS = (0, 1, 2)  # a recipe is picked on these ...
CHECKING_SEEDS = (3, 4, 5, 6, 7)  # ... and reported on these
TINY = {"max_train_samples": 256, "epochs": 1, "seeds": "3"}

# (ratio, comparison, threshold, text); fp32 targets hold for CPUs without fast bf16, best for those with it.
FP32_TARGETS = [("h_over_a_samples_per_second", ">=", 2.0, "fp32: course hparams samples/s >= 2.0x course loop"),
                ("i_over_a_wall_seconds", "<=", 0.35, "fp32: --config fast wall <= 35% of course loop")]
BEST_TARGETS = [("c_over_a_samples_per_second", ">=", 2.5, "best precision: course hparams samples/s >= 2.5x course loop"),
                ("d_over_a_wall_seconds", "<=", 0.25, "best precision: --config fast wall <= 25% of course loop")]


def best_precision() -> str:
    """What `auto` trains in here (the default model's size decides on a GPU)."""
    from tuneloop.model import default_model_path

    return bench.precision_label("auto", default_model_path())


def rows_for(precision: str) -> list[str]:
    return ["a", "h", "i"] if precision == "fp32" else ["a", "h", "i", "c", "d"]


def seed_table(runs: list[dict], rows: list[str], seeds: list[int]) -> tuple[str, dict[str, dict]]:
    """Dev accuracy per row and seed, with mean and sample std over the seeds that finished."""
    stats, lines = {}, ["| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |",
                        "|---|" + "---:|" * (len(seeds) + 2)]
    for row in rows:
        acc = {r["seed"]: r["dev"]["accuracy"] for r in runs if r["row"] == row and r.get("returncode") == 0}
        values = [acc[s] for s in seeds if s in acc]
        mean = statistics.mean(values) if values else None
        sd = statistics.stdev(values) if len(values) > 1 else None
        stats[row] = {"accuracy": acc, "mean": mean, "sd": sd}
        cells = [f"{acc[s]:.3f}" if s in acc else "failed" for s in seeds]
        lines.append(f"| {row}: {bench.ROWS[row]} | " + " | ".join(cells) + " | "
                     + (f"{mean:.3f}" if mean is not None else "") + " | " + (f"{sd:.3f}" if sd is not None else "") + " |")
    return "\n".join(lines), stats


def speed_ratios(summary: dict[str, dict]) -> dict[str, float]:
    ok = lambda row: summary.get(row, {}).get("runs_ok")  # noqa: E731
    out = {}
    for row in ("h", "c"):
        if ok("a") and ok(row):
            out[f"{row}_over_a_samples_per_second"] = summary[row]["samples_per_second"] / summary["a"]["samples_per_second"]
    for row in ("i", "d"):
        if ok("a") and ok(row):
            out[f"{row}_over_a_wall_seconds"] = summary[row]["wall_seconds"] / summary["a"]["wall_seconds"]
    return out


def accuracy_targets(stats: dict[str, dict], fast_row: str) -> list[str]:
    """--config fast: mean >= the course loop's + 1 point, sd no larger, over the same seeds."""
    a, f = stats.get("a", {}), stats.get(fast_row, {})
    if a.get("mean") is None or f.get("mean") is None:
        return []
    lines = [f"- {'PASS' if f['mean'] >= a['mean'] + 0.01 else 'FAIL'}  --config fast ({fast_row}) mean accuracy "
             f"{f['mean']:.3f} >= course loop {a['mean']:.3f} + 0.010"]
    if a.get("sd") is not None and f.get("sd") is not None:
        lines.append(f"- {'PASS' if f['sd'] <= a['sd'] else 'FAIL'}  --config fast ({fast_row}) sd {f['sd']:.3f} "
                     f"<= course loop sd {a['sd']:.3f}")
    return lines


def ratio_lines(ratios: dict[str, float], targets: list[tuple]) -> list[str]:
    out = []
    for key, op, threshold, text in targets:
        if key in ratios:
            ok = ratios[key] >= threshold if op == ">=" else ratios[key] <= threshold
            out.append(f"- {'PASS' if ok else 'FAIL'}  {text}: {ratios[key]:.3f} (target {op} {threshold})")
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(map(str, CHECKING_SEEDS)),
                        help="seeds (default 3,4,5,6,7: checking; 0,1,2 are for choosing a recipe)")
    parser.add_argument("--tiny", action="store_true", help=f"prove the command: {TINY['max_train_samples']} "
                        f"examples, {TINY['epochs']} epoch, seed {TINY['seeds']} unless given (not a measurement)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-fast-recipe.json"))
    args, given = parser.parse_args(argv), set(argv if argv is not None else sys.argv[1:])
    if args.tiny:
        args.epochs = args.epochs or TINY["epochs"]
        args.max_train_samples = args.max_train_samples or TINY["max_train_samples"]
        if "--seeds" not in given and not any(a.startswith("--seeds=") for a in given):
            args.seeds = TINY["seeds"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    precision = best_precision()
    rows = rows_for(precision)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    bench_argv = ["--rows", ",".join(rows), "--seeds", args.seeds, "--out", args.out]
    for flag, value in (("--epochs", args.epochs), ("--max-train-samples", args.max_train_samples),
                        ("--data-dir", args.data_dir), ("--work-dir", args.work_dir)):
        if value is not None:
            bench_argv += [flag, str(value)]
    print(f"fast_recipe: best precision here: {precision}; rows {','.join(rows)}; seeds {seeds} "
          f"({'checking' if not set(seeds) & set(CHOOSING_SEEDS) else 'includes choosing seeds 0-2'})", flush=True)
    status = bench.main(bench_argv)
    result = json.loads(Path(args.out).read_text())
    table, stats = seed_table(result["runs"], rows, seeds)
    ratios = speed_ratios(result["summary"])
    targets = ratio_lines(ratios, FP32_TARGETS) + (ratio_lines(ratios, BEST_TARGETS) if precision != "fp32" else [])
    targets += accuracy_targets(stats, "i") + (accuracy_targets(stats, "d") if precision != "fp32" else [])
    print(f"\nDev accuracy per seed (MRPC dev, {len(seeds)} seed(s)):\n\n{table}\n\nIssue 20's targets:\n"
          + "\n".join(targets))
    if args.tiny:
        print("\n(--tiny: the command proved end to end; these numbers are not a measurement)")
    result["fast_recipe"] = {"best_precision": precision, "rows": rows, "seeds": seeds, "seed_table": table,
                             "seed_stats": stats, "ratios": ratios, "targets": targets, "tiny": args.tiny}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main())
