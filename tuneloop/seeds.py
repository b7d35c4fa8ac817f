"""Several seeds in one command, and whether two multi-seed runs differ beyond their spread.

`tuneloop train --seeds 0,1,2` trains `OUT/seed-0/`, `OUT/seed-1/`, ... one after another with the same
settings, then writes `OUT/seeds_summary.json` and prints every metric's per-seed values, mean,
sample standard deviation and a percentile-bootstrap 95% confidence interval of the mean (scipy).
A seed whose folder already holds a finished run with the same config is reused, and one whose run of
the same config died part-way resumes from its newest good checkpoint (or starts again), so a crashed
or killed multi-seed run continues with the same command. `OUT` is locked for the whole command, and
each seed folder by its own run.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.naming import dotted_keys

SUMMARY = "seeds_summary.json"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
NOT_METRICS = {"step", "epoch", "num_examples", "best_metric", "best_step"}


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; a repeated or non-integer seed is a ConfigError."""
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            seed = int(part)
        except ValueError:
            raise ConfigError(f"--seeds: '{part}' is not an integer seed (give e.g. --seeds 0,1,2)") from None
        if seed in seeds:
            raise ConfigError(f"--seeds: seed {seed} is given twice in '{text}'; every seed must differ")
        seeds.append(seed)
    return seeds


def seed_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (ddof=1) and the percentile-bootstrap 95% CI of the mean."""
    from scipy.stats import bootstrap

    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    if len(arr) > 1 and std > 0:
        ci = bootstrap((arr,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                       rng=np.random.default_rng(BOOTSTRAP_SEED)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    else:  # one seed, or identical results: no spread to resample
        low = high = float(arr.mean())
    return {"values": [float(v) for v in arr], "mean": float(arr.mean()), "std": std, "ci95": [low, high]}


def summarize(out: str | Path, seeds: list[int]) -> dict[str, Any]:
    """Per-metric spread from each seed's eval_results.json."""
    results = {}
    for seed in seeds:
        path = seed_dir(out, seed) / "eval_results.json"
        if not path.is_file():
            raise TuneloopError(f"seed {seed} has no results ({path} is missing)")
        results[seed] = json.loads(path.read_text(encoding="utf-8"))
    return {"seeds": seeds, **summarize_results(results, "seeds")}


def summarize_results(results: dict[int, dict[str, Any]], runs_key: str) -> dict[str, Any]:
    """Per-metric spread over runs (seeds, folds): every numeric metric that all runs have."""
    runs = list(results)
    first = results[runs[0]]
    names = [k for k, v in first.items() if k not in NOT_METRICS and isinstance(v, (int, float))
             and not isinstance(v, bool) and all(isinstance(r.get(k), (int, float)) for r in results.values())]
    main = first.get("main_metric")
    names.sort(key=lambda k: (k != main, k == "loss"))  # the main metric first, the loss last
    return {"main_metric": main, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
            "bootstrap_method": "percentile", "std_ddof": 1,
            "metrics": {k: {**spread([results[r][k] for r in runs]), runs_key: runs} for k in names}}


def format_table(summary: dict[str, Any], runs_key: str = "seeds", run_name: str = "seed") -> str:
    seeds = summary[runs_key]
    head = ["metric", *[f"{run_name} {s}" for s in seeds], "mean", "std", "95% CI of the mean"]
    rows = [[name, *[f"{v:.4f}" for v in m["values"]], f"{m['mean']:.4f}", f"{m['std']:.4f}",
             f"[{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]"] for name, m in summary["metrics"].items()]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    return "\n".join(lines)


def _same_config(folder: Path, config) -> bool:
    """Whether the run in `folder` has `config`'s settings, except those that do not change results."""
    import yaml

    from tuneloop.checkpoint import RESUME_SAFE

    try:
        saved = dotted_keys(yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return False
    wanted = dotted_keys(config.to_dict())
    return all(saved.get(k) == v for k, v in wanted.items() if k not in RESUME_SAFE)


def _complete(folder: Path) -> bool:
    """Every file a finished run leaves is there and whole (eval_results.json is written last)."""
    from tuneloop.tracking import read_jsonl

    try:
        results = json.loads((folder / "eval_results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    predictions = folder / "predictions.jsonl"
    if predictions.exists() and not (read_jsonl(predictions)[:1] and "split" in read_jsonl(predictions)[0]):
        return False
    return isinstance(results, dict) and (folder / "model" / "config.json").is_file()


def seed_status(folder: Path, config) -> str:
    """'done' (a complete run of `config`), 'unfinished' (a run of `config` that died), 'other' or 'empty'."""
    if not (folder / "config.yaml").is_file():
        return "other" if folder.is_dir() and any(p.name in ("model", "eval_results.json") for p in folder.iterdir()) \
            else "empty"
    if not _same_config(folder, config):
        return "other"
    return "done" if _complete(folder) else "unfinished"


def finished_with_same_config(folder: Path, config) -> bool:
    """A complete run of `config` in `folder`, to reuse (seeds, folds)."""
    return seed_status(folder, config) == "done"


def _continue_unfinished(cfg, folder: Path) -> str:
    """Resume a dead run of the same settings from its newest good checkpoint, or start it again."""
    from tuneloop.checkpoint import find_resume_checkpoint

    try:
        find_resume_checkpoint(folder, "latest")
    except TuneloopError:
        cfg.checkpoint.resume, cfg.output.overwrite = None, True  # no checkpoint: it starts again (same seed)
        return "starting it again"
    cfg.checkpoint.resume = "latest"
    return "resuming it"


def train_seeds(config, seeds: list[int]) -> dict[str, Any]:
    """Train one run per seed into OUT/seed-N, then summarise; returns the summary."""
    from tuneloop.card import push_to_hub, write_model_card
    from tuneloop.recipe import train, write_json

    from tuneloop.runlock import RunLock

    out = Path(config.output.output_dir)
    if "train.seed" in config.given:
        raise ConfigError(f"train.seed: --seeds sets each run's seed, so --seed {config.train.seed} would apply to "
                          f"none; drop one of them")
    with RunLock(out):
        return _train_seeds(config, seeds, out, train, write_json, write_model_card, push_to_hub)


def _seed_configs(config, seeds: list[int], out: Path) -> dict[int, Any]:
    configs = {}
    for seed in seeds:
        cfg = copy.deepcopy(config)
        cfg.train.seed = seed
        cfg.output.output_dir = str(seed_dir(out, seed))
        cfg.output.push_to_hub = None  # one push at the end, of the best seed, with the spread in its card
        configs[seed] = cfg
    return configs


def _train_seeds(config, seeds, out, train, write_json, write_model_card, push_to_hub) -> dict[str, Any]:
    configs = _seed_configs(config, seeds, out)
    status = {s: seed_status(seed_dir(out, s), configs[s]) for s in seeds}
    if (out / SUMMARY).exists() and not config.output.overwrite and "other" in status.values():
        raise TuneloopError(f"output folder {out} already holds a multi-seed run ({SUMMARY}); "
                            f"pass --overwrite or choose another --output-dir")
    for i, seed in enumerate(seeds):
        cfg, folder, where = configs[seed], seed_dir(out, seed), f"seed {seed} ({i + 1}/{len(seeds)})"
        if not config.output.overwrite and status[seed] == "done":
            print(f"tuneloop: {where} already finished in {folder}; reusing it", flush=True)
            continue
        if not config.output.overwrite and status[seed] == "unfinished":
            print(f"tuneloop: {where} did not finish in {folder}; {_continue_unfinished(cfg, folder)}", flush=True)
        elif cfg.checkpoint.resume and not (folder / "checkpoints").is_dir():
            cfg.checkpoint.resume = None  # --resume continues the seeds that have checkpoints, starts the others
        print(f"tuneloop: {where} -> {folder}", flush=True)
        train(cfg)
    summary = summarize(out, seeds)
    write_json(out / SUMMARY, summary)
    print(f"tuneloop: {len(seeds)} seeds, spread over seeds (std: ddof=1; CI: percentile bootstrap of the mean, "
          f"{BOOTSTRAP_RESAMPLES} resamples)\n" + format_table(summary), flush=True)
    metric_spread = {k: {"mean": m["mean"], "std": m["std"], "ci95": m["ci95"], "seeds": seeds}
                     for k, m in summary["metrics"].items() if k != "loss"}
    results = {s: json.loads((seed_dir(out, s) / "eval_results.json").read_text(encoding="utf-8")) for s in seeds}
    for seed in seeds:
        write_model_card(seed_dir(out, seed) / "model", configs[seed], results[seed], config.data.task,
                         list(metric_spread), seed_spread=metric_spread)
    if config.output.push_to_hub:
        main = summary["main_metric"] or next(iter(summary["metrics"]))
        best = max(seeds, key=lambda s: results[s].get(main, -math.inf))
        print(f"tuneloop: pushing seed {best} (best {main} {results[best][main]:.4f})", flush=True)
        push_to_hub(seed_dir(out, best) / "model", config.output.push_to_hub)
    return summary


def load_summary(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / SUMMARY
    if not path.is_file():
        hint = " (a single run: train it with --seeds 0,1,2 to measure its spread)" if \
            (Path(folder) / "eval_results.json").is_file() else ""
        raise TuneloopError(f"compare: {folder} holds no multi-seed run ({SUMMARY} missing){hint}")
    return json.loads(path.read_text(encoding="utf-8"))


def compare_metric(a: list[float], b: list[float], alpha: float = 0.05) -> dict[str, Any]:
    """Welch's t-test (unequal variances) and a bootstrap CI of the difference of means (B - A)."""
    from scipy.stats import bootstrap, ttest_ind

    va, vb = np.asarray(a, float), np.asarray(b, float)
    diff = float(vb.mean() - va.mean())
    if len(va) < 2 or len(vb) < 2:
        raise TuneloopError("compare: each run needs at least 2 seeds to have a spread")
    if va.std() == 0 and vb.std() == 0:  # no spread at all: equal means are the same, others differ
        return {"difference": diff, "t": math.inf if diff else 0.0, "p_value": 0.0 if diff else 1.0,
                "ci95": [diff, diff], "differ": diff != 0}
    test = ttest_ind(vb, va, equal_var=False)
    ci = bootstrap((vb, va), lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis), method="percentile",
                   n_resamples=BOOTSTRAP_RESAMPLES, rng=np.random.default_rng(BOOTSTRAP_SEED)).confidence_interval
    p = float(test.pvalue)
    return {"difference": diff, "t": float(test.statistic), "p_value": p, "ci95": [float(ci.low), float(ci.high)],
            "differ": p < alpha}


def compare(run_a: str | Path, run_b: str | Path, alpha: float = 0.05) -> str:
    """Text saying, per common metric, whether B differs from A beyond the seed-to-seed spread."""
    sa, sb = load_summary(run_a), load_summary(run_b)
    common = [k for k in sa["metrics"] if k in sb["metrics"]]
    if not common:
        raise TuneloopError(f"compare: {run_a} and {run_b} share no metric")
    lines = [f"A = {run_a} (seeds {', '.join(map(str, sa['seeds']))}), B = {run_b} (seeds {', '.join(map(str, sb['seeds']))})",
             f"Welch's t-test (two-sided, unequal variances) on the per-seed values, alpha {alpha}; "
             f"95% percentile-bootstrap CI of mean(B) - mean(A)"]
    for name in common:
        ma, mb = sa["metrics"][name], sb["metrics"][name]
        r = compare_metric(ma["values"], mb["values"], alpha)
        verdict = "B and A DIFFER beyond their seed spread" if r["differ"] else \
            "no difference beyond the seed spread"
        lines.append(f"{name}: A {ma['mean']:.4f} ± {ma['std']:.4f}, B {mb['mean']:.4f} ± {mb['std']:.4f}; "
                     f"B - A = {r['difference']:+.4f}, CI [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}], "
                     f"t = {r['t']:.2f}, p = {r['p_value']:.3g}: {verdict}")
    return "\n".join(lines)
