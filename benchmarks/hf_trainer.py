"""(b) The Hugging Face `Trainer` with the course's hyperparameters, on the same data and model.

Batch 8 (train and eval), lr 5e-5, 3 epochs, linear schedule without warmup, weight decay 0 (the
TrainingArguments default), no evaluation during training (one `evaluate()` at the end), `report_to="none"`,
the seed. Everything else stays at the Trainer's defaults (gradient clipping at 1.0, fused AdamW),
except `save_strategy="no"`: no other row writes intermediate checkpoints.
Benchmark bookkeeping is marked `# bench:`.

    python benchmarks/hf_trainer.py --data-dir ../shared/data/glue/MRPC --output-dir /tmp/trainer --results trainer.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench: import benchmarks.* when run as a script

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)

from benchmarks.mrpc import load_mrpc, reference_parser
from tuneloop.model import default_model_path
from benchmarks.tokens import TokenCounter


def compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    return {"accuracy": accuracy_score(labels, predictions), "f1": f1_score(labels, predictions)}


def main() -> None:
    parser = reference_parser(__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, help="the Trainer's output_dir")
    args = parser.parse_args()
    set_seed(args.seed)

    raw_datasets = load_mrpc(args.data_dir, args.max_train_samples)
    checkpoint = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def tokenize_function(example):
        return tokenizer(example["sentence1"], example["sentence2"], truncation=True)

    tokenized_datasets = raw_datasets.map(tokenize_function, batched=True)
    data_collator = TokenCounter(DataCollatorWithPadding(tokenizer=tokenizer))  # bench: counts training tokens
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=5e-5,
        num_train_epochs=args.epochs,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    trainer = Trainer(model, training_args, train_dataset=tokenized_datasets["train"],
                      eval_dataset=tokenized_datasets["validation"], data_collator=data_collator,
                      processing_class=tokenizer, compute_metrics=compute_metrics)

    train_start = time.perf_counter()  # bench: the training loop only
    train_output = trainer.train()
    train_seconds = time.perf_counter() - train_start  # bench
    data_collator.counting = False  # bench: evaluation batches are not training tokens
    eval_metrics = trainer.evaluate()

    metrics = {"accuracy": eval_metrics["eval_accuracy"], "f1": eval_metrics["eval_f1"]}
    print(json.dumps(metrics))
    result = {  # bench
        "train_seconds": train_seconds,
        "train_seconds_how": "time.perf_counter around trainer.train() (eval_strategy='no': no evaluation inside it)",
        "trainer_train_runtime": train_output.metrics.get("train_runtime"),
        "counts": data_collator.counts.as_dict(),
        "counts_how": "counted in-process by a wrapper around the Trainer's data collator, switched off before evaluate()",
        "optimizer_steps": train_output.global_step,
        "precision": "fp32",
        "dev": {**metrics, "num_examples": len(tokenized_datasets["validation"])},
        "hyperparameters": {"epochs": args.epochs, "batch_size": 8, "learning_rate": 5e-5, "weight_decay": 0.0,
                            "scheduler": "linear", "warmup_steps": 0, "max_grad_norm": training_args.max_grad_norm,
                            "optim": str(training_args.optim), "max_length": tokenizer.model_max_length,
                            "seed": args.seed, "train_examples": len(tokenized_datasets["train"])},
    }
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
