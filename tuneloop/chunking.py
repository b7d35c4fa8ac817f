"""--long-text: documents longer than max_length tokens.

- `truncate` (default): the first max_length tokens, as before.
- `head-tail`: the first quarter and the last three quarters of the token budget (Sun et al., 2019, "How to
  Fine-Tune BERT for Text Classification?": head 128 + tail 382 was their best split at 512).
- `chunk`: overlapping windows of max_length tokens, `--stride` tokens shared by neighbours (the tokenizer's
  own `return_overflowing_tokens`; for pairs the second text is windowed, the first repeated in each). Training
  sees every window with its document's label; evaluation and prediction aggregate the windows' logits per
  document (`--chunk-aggregation mean|max`), so a document counts once in every metric. Windows carry their
  document's index in a `doc` column; evaluation gathers (logits, doc) from every process and aggregates after
  the gather, so the metrics of N processes equal those of one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tuneloop.errors import ConfigError, DataError

HEAD_SHARE = 0.25


def encode(tokenizer, texts: list[str], pairs: list[str] | None, long_text: str, max_length: int,
           stride: int) -> tuple[dict[str, list], list[int] | None]:
    """Tokenised inputs and, for `chunk`, the document index of every window (None otherwise)."""
    if long_text == "truncate":
        return dict(tokenizer(texts, pairs, truncation=True, max_length=max_length)), None
    if long_text == "head-tail":
        if pairs is not None:
            raise ConfigError("data.long_text head-tail: keeps the head and tail of one text; for pairs use chunk "
                              "or truncate")
        return head_tail(tokenizer, texts, max_length), None
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=pairs is not None)
    if stride >= budget:
        raise ConfigError(f"data.stride: must be below max_length minus the {max_length - budget} special tokens "
                          f"({budget}), got {stride}")
    try:
        enc = tokenizer(texts, pairs, truncation="only_second" if pairs is not None else True, max_length=max_length,
                        stride=stride, return_overflowing_tokens=True)
    except Exception as e:  # e.g. a first text of a pair that alone fills max_length
        raise DataError(f"data.long_text chunk: {str(e).splitlines()[0]}") from None
    docs = list(enc.pop("overflow_to_sample_mapping"))
    return dict(enc), docs


def head_tail(tokenizer, texts: list[str], max_length: int) -> dict[str, list]:
    """Special tokens at both ends kept; the middle of a long text dropped."""
    enc = tokenizer(texts, truncation=False)
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    budget = max_length - specials
    head = int(budget * HEAD_SHARE)
    tail = budget - head
    prefix = 1 if specials else 0  # [CLS]-like tokens before the text, [SEP]-like after
    out: dict[str, list] = {k: [] for k in enc}
    for i in range(len(texts)):
        n = len(enc["input_ids"][i])
        for k in enc:
            seq = enc[k][i]
            if n > max_length:
                seq = seq[: prefix + head] + seq[n - (tail + specials - prefix):]
            out[k].append(seq)
    return out


def windows_per_document(docs: list[int]) -> np.ndarray:
    return np.bincount(np.asarray(docs))


def aggregate(logits: np.ndarray, docs: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """(document ids in order, one row of logits per document): the mean or max over its windows."""
    order = np.argsort(docs, kind="stable")
    docs, logits = docs[order], logits[order]
    ids, starts = np.unique(docs, return_index=True)
    reduce = np.maximum if how == "max" else np.add
    pooled = reduce.reduceat(logits, starts, axis=0)
    if how == "mean":
        pooled = pooled / np.diff(np.append(starts, len(docs)))[:, None]
    return ids, pooled


@torch.no_grad()
def document_logits(model, dataloader, accelerator, how: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Every document once: (document ids, aggregated logits, labels or None), the same on every process."""
    model.eval()
    logits, docs, labels = [], [], []
    for batch in dataloader:
        doc = batch.pop("doc")
        out = model(**batch).logits.float()
        y = batch.get("labels")
        gathered = accelerator.gather_for_metrics((out, doc) if y is None else (out, doc, y))
        logits.append(gathered[0].cpu().double().numpy())
        docs.append(gathered[1].cpu().numpy())
        if y is not None:
            labels.append(gathered[2].cpu().numpy())
    docs_all = np.concatenate(docs)
    ids, pooled = aggregate(np.concatenate(logits), docs_all, how)
    if not labels:
        return ids, pooled, None
    per_window = np.concatenate(labels)
    first = np.unique(docs_all[np.argsort(docs_all, kind="stable")], return_index=True)[1]
    return ids, pooled, per_window[np.argsort(docs_all, kind="stable")][first]


def document_predictions(logits: np.ndarray, is_regression: bool) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, confidence-or-value) from aggregated logits."""
    if is_regression:
        return logits[:, 0], logits[:, 0]
    probs = torch.from_numpy(logits).softmax(-1).numpy()
    return probs.argmax(-1), probs.max(-1)


def document_loss(logits: np.ndarray, labels: np.ndarray, is_regression: bool) -> float:
    """Mean per-document loss of the aggregated logits (cross-entropy, or MSE for regression)."""
    t = torch.from_numpy(logits)
    if is_regression:
        return float(torch.nn.functional.mse_loss(t[:, 0], torch.from_numpy(labels).double()))
    return float(torch.nn.functional.cross_entropy(t, torch.from_numpy(labels).long()))


def chunk_summary(docs: list[int]) -> dict[str, Any]:
    counts = windows_per_document(docs)
    return {"windows": int(counts.sum()), "windows_per_document": {"mean": round(float(counts.mean()), 2),
                                                                   "max": int(counts.max())}}


def remember_long_text(model_config, data_cfg) -> None:
    """Store head-tail / chunk settings in the model's config.json, where `tuneloop predict` finds them."""
    if data_cfg.long_text != "truncate":
        model_config.tuneloop_long_text = {"long_text": data_cfg.long_text, "max_length": data_cfg.max_length,
                                           "stride": data_cfg.stride, "chunk_aggregation": data_cfg.chunk_aggregation}
