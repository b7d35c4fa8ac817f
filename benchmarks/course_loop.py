"""(a) REFERENCE, not tuneloop: the Hugging Face course's "A full training" loop (LLM course, chapter 3,
section 4), written as the course writes it, so tuneloop is compared with what people copy.

Kept from the course: tokenise with `truncation=True` and no padding, `DataCollatorWithPadding`,
`DataLoader(shuffle=True, batch_size=8)`, `AutoModelForSequenceClassification(num_labels=2)`,
`torch.optim.AdamW(model.parameters(), lr=5e-5)` (torch's default weight decay 0.01 on every parameter),
`get_scheduler("linear", num_warmup_steps=0)`, 3 epochs, tqdm, then an eval loop with batch 8.

Changed, because this machine cannot reach the Hub (none of it touches the training loop):
- MRPC is read from the local glue_data TSVs into a `datasets.DatasetDict` shaped like
  `load_dataset("glue", "mrpc")` (benchmarks/mrpc.py);
- accuracy/F1 come from scikit-learn instead of `evaluate.load("glue", "mrpc")` (same definitions);
- the checkpoint is the bundled all-MiniLM-L6-v2 instead of bert-base-uncased, and the seed is set
  with `transformers.set_seed`.
Benchmark bookkeeping is marked `# bench:` (a token-counting wrapper around the collator, a timer
around the training loop, a JSON file of measurements).

    python benchmarks/course_loop.py --data-dir ../shared/data/glue/MRPC --results course.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench: import benchmarks.* when run as a script

import torch
from sklearn.metrics import accuracy_score, f1_score
from torch.optim import AdamW
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, get_scheduler,
                          set_seed)

from benchmarks.mrpc import load_mrpc, reference_parser
from tuneloop.model import default_model_path
from benchmarks.tokens import TokenCounter


def main() -> None:
    parser = reference_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    set_seed(args.seed)

    # --- The course, from here on. ---
    raw_datasets = load_mrpc(args.data_dir, args.max_train_samples)  # course: load_dataset("glue", "mrpc")
    checkpoint = args.model or default_model_path()  # course: "bert-base-uncased"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def tokenize_function(example):
        return tokenizer(example["sentence1"], example["sentence2"], truncation=True)

    tokenized_datasets = raw_datasets.map(tokenize_function, batched=True)
    data_collator = DataCollatorWithPadding(tokenizer=tokenizer)
    data_collator = TokenCounter(data_collator)  # bench: counts real/padded tokens of each training batch

    tokenized_datasets = tokenized_datasets.remove_columns(["sentence1", "sentence2", "idx"])
    tokenized_datasets = tokenized_datasets.rename_column("label", "labels")
    tokenized_datasets.set_format("torch")

    train_dataloader = DataLoader(tokenized_datasets["train"], shuffle=True, batch_size=8, collate_fn=data_collator)
    eval_dataloader = DataLoader(tokenized_datasets["validation"], batch_size=8, collate_fn=data_collator)

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)
    optimizer = AdamW(model.parameters(), lr=5e-5)

    num_epochs = args.epochs  # course: 3
    num_training_steps = num_epochs * len(train_dataloader)
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=num_training_steps)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)

    train_start = time.perf_counter()  # bench: the training loop only
    progress_bar = tqdm(range(num_training_steps))
    model.train()
    for epoch in range(num_epochs):
        for batch in train_dataloader:
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = model(**batch)
            loss = outputs.loss
            loss.backward()

            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            progress_bar.update(1)
    train_seconds = time.perf_counter() - train_start  # bench
    data_collator.counting = False  # bench: evaluation batches are not training tokens

    predictions_all, labels_all = [], []  # course: metric = evaluate.load("glue", "mrpc")
    model.eval()
    for batch in eval_dataloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            outputs = model(**batch)

        logits = outputs.logits
        predictions = torch.argmax(logits, dim=-1)
        predictions_all += predictions.tolist()  # course: metric.add_batch(predictions=..., references=...)
        labels_all += batch["labels"].tolist()
    metrics = {"accuracy": accuracy_score(labels_all, predictions_all), "f1": f1_score(labels_all, predictions_all)}
    # --- End of the course. ---

    print(json.dumps(metrics))
    result = {  # bench
        "train_seconds": train_seconds,
        "train_seconds_how": "time.perf_counter around the course's epoch loop (no evaluation inside it)",
        "counts": data_collator.counts.as_dict(),
        "counts_how": "counted in-process by a wrapper around the training DataLoader's collator",
        "optimizer_steps": num_training_steps,
        "precision": "fp32",
        "dev": {**metrics, "num_examples": len(labels_all)},
        "hyperparameters": {"epochs": num_epochs, "batch_size": 8, "learning_rate": 5e-5, "weight_decay": 0.01,
                            "weight_decay_on": "all parameters (torch AdamW default)", "scheduler": "linear",
                            "warmup_steps": 0, "max_grad_norm": None, "max_length": tokenizer.model_max_length,
                            "seed": args.seed, "train_examples": len(tokenized_datasets["train"])},
    }
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
