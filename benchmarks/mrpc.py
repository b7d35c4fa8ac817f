"""GLUE MRPC from the local glue_data TSVs, shaped like the Hub's `load_dataset("glue", "mrpc")`.

The Hub is unreachable on the benchmark machine, so rows (a) and (b) read the same TSV files tuneloop
reads with `--data-dir`. The files carry a UTF-8 BOM and bare quote characters inside sentences: they
are read with quoting off. Columns match the Hub's: sentence1, sentence2, label (0/1), idx.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pandas as pd


def read_split(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    return pd.DataFrame({"sentence1": df["#1 String"], "sentence2": df["#2 String"],
                         "label": df["Quality"].astype(int), "idx": range(len(df))})


def load_mrpc(data_dir: str | Path, max_train_samples: int | None = None):
    """`DatasetDict` with train and validation; `max_train_samples` keeps the first N training rows
    (the same rows tuneloop's `--max-train-samples` keeps)."""
    from datasets import Dataset, DatasetDict

    data_dir = Path(data_dir)
    train = read_split(data_dir / "train.tsv")
    if max_train_samples:
        train = train.iloc[:max_train_samples]
    validation = read_split(data_dir / "dev.tsv")
    return DatasetDict({"train": Dataset.from_pandas(train, preserve_index=False),
                        "validation": Dataset.from_pandas(validation, preserve_index=False)})


def reference_parser(description: str) -> argparse.ArgumentParser:
    """The options the two reference scripts (course loop, HF Trainer) share with bench.py's rows."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / ".." / "shared/data/glue/MRPC"))
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train-samples", type=int, default=None, help="keep the first N training rows")
    parser.add_argument("--results", required=True, help="JSON file for this run's measurements")
    return parser
