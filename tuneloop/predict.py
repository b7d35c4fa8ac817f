"""Batch prediction with a saved model: JSONL/CSV in (`text`, optional `text_pair`), JSON lines out.

Labels and scores match `transformers.pipeline("text-classification")`: softmax probability of the
top label for classification, the raw value for regression.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Iterator, TextIO

import pandas as pd
import torch

from tuneloop.data import read_table
from tuneloop.errors import DataError
from tuneloop.model import build_tokenizer, resolve_model_path


def read_inputs(source: str) -> pd.DataFrame:
    if source == "-":
        text = sys.stdin.read()
        if not text.strip():
            raise DataError("no input on stdin")
        try:
            if text.lstrip().startswith("{"):
                df = pd.read_json(io.StringIO(text), lines=True)
            else:
                df = pd.read_csv(io.StringIO(text), keep_default_na=False, dtype=str)
        except ValueError as e:
            raise DataError(f"cannot parse stdin as JSON Lines or CSV: {str(e).splitlines()[0]}") from None
    else:
        df = read_table(source, "input file")
    if "text" not in df.columns:
        raise DataError(f"input needs a 'text' field (and 'text_pair' for pairs); found {list(df.columns)}")
    if len(df) == 0:
        raise DataError("input holds no rows")
    return df


def predict_rows(model_dir: str, df: pd.DataFrame, batch_size: int = 32, max_length: int = 512) -> Iterator[dict]:
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(model_dir)
    tokenizer = build_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    id2label = model.config.id2label
    regression = model.config.problem_type == "regression"
    texts = df["text"].astype(str).tolist()
    pairs = df["text_pair"].astype(str).tolist() if "text_pair" in df.columns else None
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i: i + batch_size], pairs[i: i + batch_size] if pairs else None,
                            truncation=True, max_length=min(max_length, tokenizer.model_max_length),
                            padding=True, return_tensors="pt")
            logits = model(**enc).logits.float()
            if regression:
                for value in logits[:, 0].tolist():
                    yield {"label": id2label[0], "score": value}
            else:
                scores, ids = logits.softmax(-1).max(-1)
                for label_id, score in zip(ids.tolist(), scores.tolist()):
                    yield {"label": id2label[label_id], "score": score}


def write_predictions(rows: Iterator[dict], out: TextIO) -> int:
    count = 0
    for row in rows:
        out.write(json.dumps(row) + "\n")
        count += 1
    return count


def predict(model_dir: str, source: str, output: str | None = None, batch_size: int = 32) -> int:
    df = read_inputs(source)
    rows = predict_rows(model_dir, df, batch_size)
    if output:
        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            count = write_predictions(rows, fh)
        os.replace(tmp, target)  # a failed run never leaves half a predictions file under the real name
        return count
    return write_predictions(rows, sys.stdout)
