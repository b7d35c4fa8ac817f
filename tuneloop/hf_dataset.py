"""Any Hugging Face dataset (`--dataset NAME`): a Hub name, a local dataset folder or a `datasets` cache entry.

`datasets.load_dataset` does the loading; this module picks the splits and columns and hands `data.load_raw`
the same normalised frames as every other source (`text`, optional `text_pair`, `label`). A `ClassLabel`
column's names become the label names (id2label). Offline, only what the local cache holds is used.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pandas as pd

from tuneloop.config import DataConfig
from tuneloop.cells import text_column
from tuneloop.errors import DataError
from tuneloop.labels import is_list_cell
from tuneloop.tasks import Task

# Split names datasets use for evaluation, and column names for text, tried in order when not given.
VALIDATION_NAMES = ("validation", "valid", "dev", "val")
TEXT_GUESSES = (("text", "text_pair"), ("sentence1", "sentence2"), ("premise", "hypothesis"),
                ("question1", "question2"), ("text",), ("sentence",), ("content",), ("review",))


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = constants.ENDPOINT.split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_dataset_dict(path: str, name: str | None, offline_hint: str):
    """`datasets.load_dataset(path, name)`; without a connection, straight from the local cache."""
    import datasets

    reachable = hub_reachable()
    old = datasets.config.HF_HUB_OFFLINE
    if not reachable:
        datasets.config.HF_HUB_OFFLINE = True  # go straight to the cache instead of retrying for minutes
    try:
        return datasets.load_dataset(path, name)
    except Exception as e:
        if not reachable and not Path(path).exists():
            raise DataError(offline_hint) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load dataset '{path}'{f' ({name})' if name else ''}: {first}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = old


def pick_splits(cfg: DataConfig, available: list[str], need_train: bool = True) -> dict[str, str]:
    """Our split name -> the dataset's; a split asked for by name (or needed for training) must exist."""
    shown = ", ".join(available)
    chosen = {}
    for ours, theirs in (("train", cfg.train_split), ("validation", cfg.validation_split), ("test", cfg.test_split)):
        if theirs is not None and theirs not in available:
            raise DataError(f"dataset '{cfg.dataset}' has no split '{theirs}' (data.{ours}_split); its splits: {shown}")
        chosen[ours] = theirs
    if chosen["train"] is None and ("train" in available or need_train):
        if "train" not in available:
            raise DataError(f"dataset '{cfg.dataset}' has no split 'train'; its splits: {shown} "
                            f"(choose one with --train-split)")
        chosen["train"] = "train"
    if chosen["validation"] is None:
        chosen["validation"] = next((s for s in VALIDATION_NAMES if s in available and s != chosen["train"]), None)
    if chosen["test"] is None and "test" in available and "test" not in chosen.values():
        chosen["test"] = "test"
    return {ours: theirs for ours, theirs in chosen.items() if theirs is not None}


def load_hf_dataset(cfg: DataConfig, task: Task | None, need_train: bool = True
                    ) -> tuple[dict[str, pd.DataFrame], dict[str, str], list[str] | None]:
    """Normalised splits, where each came from, and the label names of a `ClassLabel` column (else None)."""
    from datasets import ClassLabel

    where = cfg.dataset + (f" ({cfg.dataset_config})" if cfg.dataset_config else "")
    ds = load_dataset_dict(cfg.dataset, cfg.dataset_config,
                           f"cannot load dataset '{where}': no connection to the Hugging Face Hub and not in the "
                           f"local datasets cache; give a local dataset folder or --train-file FILE instead")
    splits = pick_splits(cfg, list(ds), need_train)
    if "validation" not in splits:
        import logging

        logging.getLogger(__name__).warning(
            "dataset '%s' has no validation split (splits: %s): training without evaluation; pass "
            "--validation-split NAME to evaluate on one", cfg.dataset, ", ".join(ds))
    train_columns = ds[splits.get("train", next(iter(splits.values()), next(iter(ds))))].column_names
    text_columns = cfg.text_columns or (list(task.hub_text_columns) if task else None) or next(
        (list(g) for g in TEXT_GUESSES if all(c in train_columns for c in g)), None)
    if text_columns is None:
        raise DataError(f"dataset '{where}': cannot tell which column holds the text (columns: "
                        f"{', '.join(train_columns)}); pass --text-columns COL or --text-columns COL1,COL2")
    label_column = cfg.label_column or "label"
    if label_column in text_columns:
        raise DataError(f"dataset '{where}': column {label_column!r} is both a text column and the label column, so "
                        f"the model would read the answer; choose other --text-columns or --label-column")
    out, sources, class_names = {}, {}, None
    for ours, theirs in splits.items():
        split = ds[theirs]
        missing = [c for c in text_columns if c not in split.column_names]
        if missing:
            own = task and not cfg.text_columns
            hint = f" (data.task is '{task.name}': null it for a dataset of your own)" if own else ""
            raise DataError(f"dataset '{where}' split '{theirs}' has no column {', '.join(map(repr, missing))} "
                            f"(data.text_columns); its columns: {', '.join(split.column_names)}{hint}")
        frame = split.select_columns([*text_columns, *([label_column] if label_column in split.column_names else [])]
                                     ).to_pandas()
        df = pd.DataFrame({"text": text_column(frame, text_columns[0], f"dataset {where!r}")})
        if len(text_columns) == 2:
            df["text_pair"] = text_column(frame, text_columns[1], f"dataset {where!r}")
        labelled = label_column in frame and not frame[label_column].map(  # the Hub marks unlabeled -1
            lambda v: not is_list_cell(v) and v == -1).all()
        if labelled:
            feature: Any = split.features[label_column]
            labels = frame[label_column]
            if isinstance(feature, ClassLabel) and task is None:
                class_names = list(feature.names)
                labels = labels.map(lambda i: feature.names[i] if 0 <= i < len(feature.names) else i)
            elif isinstance(getattr(feature, "feature", None), ClassLabel) and task is None:  # Sequence(ClassLabel)
                class_names = list(feature.feature.names)  # multi-label: each row a list of class ids
                labels = labels.map(lambda ids: [class_names[int(i)] for i in ids])
            df["label"] = labels
        elif ours != "test":
            what = "only unlabeled rows (-1) in" if label_column in frame else "no"
            raise DataError(f"dataset '{where}' split '{theirs}' has {what} label column {label_column!r} "
                            f"(data.label_column); its columns: {', '.join(split.column_names)}")
        out[ours] = df
        sources[ours] = f"dataset {where}, split {theirs}"
    return out, sources, class_names
