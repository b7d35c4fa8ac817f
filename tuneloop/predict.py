"""Batch prediction with a saved model: JSONL/CSV in (`text`, optional `text_pair`), JSON lines out.

Labels and scores match `transformers.pipeline("text-classification")`: softmax probability of the
top label for classification, the raw value for regression.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import Iterator, TextIO

import pandas as pd
import torch
from tqdm.auto import tqdm

from tuneloop.cells import text_column
from tuneloop.data import check_room_for_text, read_table
from tuneloop.errors import ConfigError, DataError
from tuneloop.model import build_tokenizer, position_limit, resolve_model_path

PROGRESS_MIN_ROWS = 1000  # below this a run takes seconds and a bar is noise
log = logging.getLogger(__name__)


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


RUNTIMES = ("torch", "onnx")
PRECISIONS = ("fp32", "bf16")


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime: {runtime!r} is not a runtime; choose torch or onnx")
    return runtime


def check_precision(precision: str, runtime: str = "torch", quantize: str | None = None) -> str:
    """bf16 is torch's: its weights in bf16, for CPUs with AVX512-BF16/AMX (and GPUs); int8 is its own choice."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision: {precision!r} is not a precision; choose fp32 or bf16")
    if precision == "bf16" and runtime != "torch":
        raise ConfigError("--precision bf16 runs with --runtime torch; ONNX Runtime's fast CPU path is --quantize int8")
    if precision == "bf16" and quantize:
        raise ConfigError(f"--precision bf16 and --quantize {quantize}: choose one")
    return precision


def to_bf16(model):
    """The model's weights in bf16. On a CPU with AMX, side by side over 320 random MRPC dev pairs: 1.5x fp32's
    pairs/s one pair at a time, 2.2x in the server's calls of 8, no label changed (docs/serving.md); autocast,
    which casts every weight again on every call, was slower than fp32 one pair at a time."""
    from tuneloop.precision import cpu_has_fast_bf16

    if not cpu_has_fast_bf16():
        log.warning("this CPU has no fast bf16 (AVX512-BF16 or AMX): --precision bf16 predicts slower than fp32 here")
    return model.to(torch.bfloat16)


def load_for_prediction(model_dir: str, quantize: str | None = None, runtime: str = "torch",
                        threads: int | None = None, spin: bool = True, precision: str = "fp32"):
    """(model in eval mode, tokenizer) from any saved folder; `quantize="int8"`: int8 weights and activations;
    `precision="bf16"`: torch with bf16 weights.

    `runtime="onnx"` reads the folder's ONNX model (`tuneloop export --format onnx`) into ONNX Runtime; the
    object it returns is called like a transformers model, so everything below runs unchanged on it.
    `threads`: CPU threads per forward pass (default: the runtime's choice); `spin=False`: ONNX Runtime's
    threads sleep between forward passes instead of spinning (see `serve.load_model`)."""
    from tuneloop.export import check_quantize, load_saved_model, quantize_dynamic_int8

    check_quantize(quantize)
    check_runtime(runtime)
    check_precision(precision, runtime, quantize)
    path = resolve_model_path(model_dir)
    tokenizer = build_tokenizer(path)
    if runtime == "onnx":
        from tuneloop.onnx_export import load_onnx_model

        return load_onnx_model(path, quantize, threads, spin), tokenizer
    if threads:
        torch.set_num_threads(threads)
    model = load_saved_model(path).eval()
    if precision == "bf16":
        model = to_bf16(model)
    return (quantize_dynamic_int8(model) if quantize == "int8" else model), tokenizer


def predict_rows(model_dir: str, df: pd.DataFrame, batch_size: int = 32, max_length: int = 512,
                 quantize: str | None = None, runtime: str = "torch", precision: str = "fp32") -> Iterator[dict]:
    """Predictions in input order; batches are formed from length-sorted rows, so padding stays small."""
    model, tokenizer = load_for_prediction(model_dir, quantize, runtime, precision=precision)
    yield from predict_with(model, tokenizer, df, batch_size, max_length)


def max_input_length(tokenizer, max_length: int = 512, model_config=None) -> int:
    """Tokens an input is truncated to: `max_length`, or less where the tokenizer or the model's position
    embeddings (`model_config`) allow less."""
    return min(max_length, tokenizer.model_max_length, position_limit(model_config) or max_length)


def predict_with(model, tokenizer, df: pd.DataFrame, batch_size: int = 32, max_length: int = 512) -> list[dict]:
    texts = text_column(df, "text", "input").tolist()
    pairs = text_column(df, "text_pair", "input").tolist() if "text_pair" in df.columns else None
    return predict_texts(model, tokenizer, texts, pairs, batch_size, max_length)


def multi_label_scores(logits: torch.Tensor, id2label: dict, thresholds: list[float] | None) -> list[dict]:
    """Multi-label rows: the labels whose sigmoid score reaches their threshold, and every label's score."""
    from tuneloop.problems import multi_label_predictions

    probs = logits.sigmoid()
    on = multi_label_predictions(probs, thresholds)
    return [{"labels": [id2label[i] for i, v in enumerate(hot) if v], "scores": {id2label[i]: s for i, s in enumerate(p)}}
            for hot, p in zip(on.tolist(), probs.tolist())]


def label_scores(logits: torch.Tensor, id2label: dict, regression: bool, all_scores: bool = False,
                 multi_label: bool = False, thresholds: list[float] | None = None) -> list[dict]:
    """One {label, score} per row, as `pipeline("text-classification")`; `all_scores`: also every label's score.
    Multi-label: {labels, scores} (every label's sigmoid score; a label is on from its threshold)."""
    if regression:
        return [{"label": id2label[0], "score": v} for v in logits[:, 0].tolist()]
    if multi_label:
        return multi_label_scores(logits, id2label, thresholds)
    probs = logits.softmax(-1)
    scores, ids = probs.max(-1)
    out = [{"label": id2label[i], "score": s} for i, s in zip(ids.tolist(), scores.tolist())]
    if all_scores:
        for row, p in zip(out, probs.tolist()):
            row["scores"] = {id2label[i]: v for i, v in enumerate(p)}
    return out


def predict_texts(model, tokenizer, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32,
                  max_length: int = 512, all_scores: bool = False) -> list[dict]:
    """The one prediction path of `predict` and `serve`: truncate, sort by length, pad per batch, label.

    A model trained with --long-text head-tail or chunk reads its inputs the same way (the settings are in its
    config.json); a chunked document's label comes from its windows' aggregated logits."""
    import numpy as np

    from tuneloop.chunking import aggregate, encode
    from tuneloop.problems import is_multi_label, saved_thresholds

    id2label = model.config.id2label
    regression = model.config.problem_type == "regression"
    long_text = getattr(model.config, "tuneloop_long_text", None) or {}
    limit = max_input_length(tokenizer, long_text.get("max_length", max_length), model.config)
    check_room_for_text(tokenizer, limit, pairs is not None)
    encoded, docs = encode(tokenizer, texts, pairs, long_text.get("long_text", "truncate"), limit,
                           long_text.get("stride", 0))
    order = sorted(range(len(encoded["input_ids"])), key=lambda i: -len(encoded["input_ids"][i]))
    logits = torch.zeros(len(order), model.config.num_labels)
    progress = tqdm(total=len(order), desc="predict", unit="row", disable=len(texts) < PROGRESS_MIN_ROWS,
                    file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            # A multiple of 8, as in training: fewer distinct shapes, so fewer kernels and buffers cached per shape.
            batch = tokenizer.pad([{k: encoded[k][i] for k in encoded} for i in rows], pad_to_multiple_of=8,
                                  return_tensors="pt")
            logits[rows] = model(**batch).logits.float()
            progress.update(len(rows))
    progress.close()
    if docs is not None:
        how = long_text.get("chunk_aggregation", "mean")
        logits = torch.from_numpy(aggregate(logits.numpy(), np.asarray(docs), how)[1])
    multi_label = is_multi_label(model)
    return label_scores(logits, id2label, regression, all_scores, multi_label,
                        saved_thresholds(model.config) if multi_label else None)


def write_predictions(rows: Iterator[dict], out: TextIO) -> int:
    count = 0
    for row in rows:
        out.write(json.dumps(row) + "\n")
        count += 1
    return count


def predict(model_dir: str, source: str, output: str | None = None, batch_size: int = 32,
            quantize: str | None = None, runtime: str = "torch", precision: str = "fp32") -> int:
    df = read_inputs(source)
    rows = predict_rows(model_dir, df, batch_size, quantize=quantize, runtime=runtime, precision=precision)
    if output:
        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        from tuneloop import atomic

        with atomic.replacing(target) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            count = write_predictions(rows, fh)  # a failed run never leaves half a predictions file under the real name
        return count
    return write_predictions(rows, sys.stdout)
