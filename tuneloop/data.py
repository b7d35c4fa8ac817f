"""Data: read GLUE (Hub or glue_data TSVs) or the user's files, map labels, tokenise once (cached), batch.

Everything downstream sees the same normalised table per split: a `text` column, an optional
`text_pair` column and, for labelled splits, a `label` column (int ids or floats for regression).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tuneloop.chunking import encode
from tuneloop.config import DataConfig
from tuneloop.cells import text_column
from tuneloop.errors import DataError
from tuneloop.hf_dataset import load_dataset_dict, load_hf_dataset
from tuneloop.labels import (describe_rows, encode_labels, encode_multi_labels, infer_label_names, is_multi_label,
                             label_columns_as_lists, multi_label_names, split_label_cells, unlabeled_rows)
from tuneloop.tasks import TASKS, Task, TsvLayout

log = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class RawData:
    """Normalised splits plus what the model and metrics need to know about the labels."""

    splits: dict[str, pd.DataFrame]
    label_names: list[str] | None  # None: regression
    metrics: tuple[str, ...]
    main_metric: str
    task_name: str | None
    sources: dict[str, str] = field(default_factory=dict)  # split -> where it came from
    dropped: dict[str, int] = field(default_factory=dict)  # split -> rows dropped without a label (--drop-unlabeled)
    multi_label: bool = False  # each label is a multi-hot tuple over label_names

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return any("text_pair" in df.columns for df in self.splits.values())

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in self.splits if s.startswith("validation")]

    def fingerprint(self) -> str:
        """Content hash of every split (text and labels), for caches and resume checks."""
        h = hashlib.sha256()
        for name in sorted(self.splits):
            df = self.splits[name]
            h.update(name.encode())
            h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
        h.update(json.dumps(self.label_names).encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading


def read_table(path: str | Path, what: str = "data file") -> pd.DataFrame:
    """Read a CSV, TSV, JSON Lines, JSON or Parquet file into strings/numbers, with one-line errors."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    if not p.is_file():
        raise DataError(f"{what} is not a file: {p}")
    suffix = p.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{what} {p}: unsupported format '{suffix}' (use {', '.join(TABLE_SUFFIXES)})")
    encoding = text_encoding(p) if suffix != ".parquet" else None
    try:
        if suffix == ".csv":
            df = pd.read_csv(p, encoding=encoding, keep_default_na=False, dtype=str)
        elif suffix == ".tsv":
            # GLUE-style TSVs carry bare quote characters inside sentences: never treat them as quoting.
            df = pd.read_csv(p, sep="\t", quoting=csv.QUOTE_NONE, encoding=encoding,
                             keep_default_na=False, dtype=str)
        elif suffix in (".jsonl", ".json"):
            with open(p, encoding=encoding) as fh:
                head = fh.read(256).lstrip()[:1]
            df = pd.read_json(p, lines=head != "[", encoding=encoding)
        else:
            df = pd.read_parquet(p)
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"cannot read {what} {p}: it is not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"save it as UTF-8 (or UTF-16 with a byte order mark)") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"cannot read {what} {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except Exception as e:  # pyarrow and friends raise their own types
        raise DataError(f"cannot read {what} {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return df


def text_encoding(path: Path) -> str:
    """UTF-16 when the file starts with its byte order mark (Excel's "Unicode text"), else UTF-8, BOM or not."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def read_glue_tsv(path: Path, layout: TsvLayout) -> pd.DataFrame:
    """Read one original glue_data TSV: UTF-8 BOM, literal quotes, header or not, as the layout says."""
    try:
        df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig", dtype=str,
                         keep_default_na=False, header=0 if layout.header else None, on_bad_lines="skip")
    except (UnicodeDecodeError, ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    cols = list(layout.text) + ([layout.label] if layout.label is not None else [])
    missing = [c for c in cols if (c not in df.columns if layout.header else not 0 <= int(c) < df.shape[1])]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    out = pd.DataFrame({"text": text_column(df, layout.text[0], str(path))})
    if len(layout.text) == 2:
        out["text_pair"] = text_column(df, layout.text[1], str(path))
    if layout.label is not None:
        out["label"] = df[layout.label]
        before = len(out)
        # Some GLUE files (QQP, MNLI) contain a few truncated lines: drop those without a label.
        out = out[out["label"].notna() & (out["label"].astype(str).str.strip() != "")]
        if len(out) < before:
            log.warning("%s: skipped %d line(s) without a label", path, before - len(out))
    return out.reset_index(drop=True)


def load_hub_glue(task: Task) -> dict[str, pd.DataFrame]:
    """GLUE from the Hugging Face Hub (`nyu-mll/glue`); offline, only what the local HF cache holds."""
    offline_hint = (f"cannot load GLUE '{task.name}' from the Hugging Face Hub (no connection and not in the local "
                    f"cache); give local data instead: --data-dir path/to/glue_data/{task.name.upper()} "
                    f"or --train-file FILE --validation-file FILE")
    ds = load_dataset_dict(HUB_DATASET, task.name, offline_hint)
    out = {}
    for ours, theirs in task.hub_splits.items():
        if theirs not in ds:
            continue
        frame = ds[theirs].to_pandas()
        df = pd.DataFrame({"text": text_column(frame, task.hub_text_columns[0], HUB_DATASET)})
        if len(task.hub_text_columns) == 2:
            df["text_pair"] = text_column(frame, task.hub_text_columns[1], HUB_DATASET)
        # The Hub marks unlabeled test rows with label -1.
        if "label" in frame and not (frame["label"] == -1).all():
            df["label"] = frame["label"]
        out[ours] = df
    return out


def load_glue_dir(task: Task, data_dir: str | Path) -> dict[str, pd.DataFrame]:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    out = {}
    for split, layout in task.tsv.items():
        path = root / layout.file
        if path.is_file():
            out[split] = read_glue_tsv(path, layout)
    if not out:
        expected = ", ".join(layout.file for layout in task.tsv.values())
        raise DataError(f"{root} holds none of the GLUE {task.name} files ({expected})")
    return out


def load_user_files(cfg: DataConfig, task: Task | None) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    text_columns = cfg.text_columns or (list(task.hub_text_columns) if task else None)
    out, sources = {}, {}
    for split, path in files.items():
        if not path:
            continue
        df = read_table(path, f"{split} file")
        cols = text_columns
        if cols is None:
            # Without --text-columns, accept the pipeline convention or the common GLUE names.
            for guess in (["text", "text_pair"], ["sentence1", "sentence2"], ["text"], ["sentence"]):
                if all(c in df.columns for c in guess):
                    cols = guess
                    break
        if cols is None:
            raise DataError(f"{split} file {path}: cannot tell which column holds the text (columns: "
                            f"{list(df.columns)}); pass --text-columns COL or --text-columns COL1,COL2")
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise DataError(f"{split} file {path}: missing text column(s) {missing}; found {list(df.columns)}")
        label_column = cfg.label_column or ("label" if "label" in df.columns else None)
        if cfg.label_columns:
            label_column = None
        elif label_column in cols:
            raise DataError(f"{split} file {path}: column {label_column!r} is both a text column and the label "
                            f"column, so the model would read the answer; choose other --text-columns or --label-column")
        norm = pd.DataFrame({"text": text_column(df, cols[0], f"{split} file {path}")})
        if len(cols) == 2:
            norm["text_pair"] = text_column(df, cols[1], f"{split} file {path}")
        if cfg.label_columns and (split != "test" or any(c in df.columns for c in cfg.label_columns)):
            norm["label"] = label_columns_as_lists(df, cfg.label_columns, f"{split} file {path}")
        elif label_column and label_column in df.columns:
            norm["label"] = (split_label_cells(df[label_column], cfg.label_separator) if cfg.label_separator
                             else df[label_column])
        elif split != "test":
            raise DataError(f"{split} file {path}: missing label column {(label_column or 'label')!r}; "
                            f"found {list(df.columns)} (pass --label-column)")
        out[split] = norm
        sources[split] = str(path)
    return out, sources


def load_raw(cfg: DataConfig, label_names: list[str] | None = None, need_train: bool = True) -> RawData:
    """Read the configured data source into normalised, label-encoded splits.

    `label_names` forces a label set (re-evaluating a saved model); otherwise the task's or the
    training file's labels define it.
    """
    task = TASKS[cfg.task] if cfg.task else None
    user_files = cfg.train_file or cfg.validation_file or cfg.test_file
    class_names = None  # a dataset's ClassLabel names
    if cfg.dataset:
        splits, sources, class_names = load_hf_dataset(cfg, task, need_train)
    elif user_files:
        splits, sources = load_user_files(cfg, task)
        class_names = list(cfg.label_columns) if cfg.label_columns else None  # in the order given
    elif cfg.data_dir:
        splits = load_glue_dir(task, cfg.data_dir)
        sources = {s: str(Path(cfg.data_dir) / task.tsv[s].file) for s in splits}
    else:
        splits = load_hub_glue(task)
        sources = {s: f"hub:{HUB_DATASET}/{task.name}" for s in splits}

    splits, dropped = handle_unlabeled(splits, sources, cfg)
    if need_train and "train" not in splits:
        raise DataError("no training split: give --train-file, or a --data-dir that holds train.tsv")
    for name, df in splits.items():
        if len(df) == 0:
            raise DataError(f"{name} split is empty ({sources.get(name, name)})")

    multi_label = multi_label_problem(splits)
    if label_names is None:
        label_names = find_label_names(splits, task, class_names, multi_label)
    if label_names is not None and len(label_names) < 2 and not (task and task.is_regression):
        if label_names:
            raise DataError(f"the training labels hold a single class {label_names}: nothing to learn")
    encode_split = encode_multi_labels if multi_label else encode_labels
    splits = {name: encode_split(df, label_names, name) if "label" in df.columns else df for name, df in splits.items()}

    if cfg.max_train_samples and "train" in splits:
        splits["train"] = splits["train"].iloc[: cfg.max_train_samples].reset_index(drop=True)
    if cfg.max_eval_samples:
        for name in splits:
            if name != "train":
                splits[name] = splits[name].iloc[: cfg.max_eval_samples].reset_index(drop=True)

    if multi_label:
        metrics, main = ("f1_micro", "f1_macro", "subset_accuracy"), "f1_micro"
    elif task is not None:
        metrics, main = task.metrics, task.main_metric
    elif label_names is None:
        metrics, main = ("pearson", "spearman"), "pearson"
    elif len(label_names) == 2:
        metrics, main = ("accuracy", "f1"), "accuracy"
    else:
        metrics, main = ("accuracy", "f1_macro"), "accuracy"
    return RawData(splits, label_names, metrics, main, task.name if task else None, sources, dropped, multi_label)


def find_label_names(splits: dict[str, pd.DataFrame], task: Task | None, class_names: list[str] | None,
                     multi_label: bool) -> list[str] | None:
    """The label set: the task's, the dataset's ClassLabel names, or inferred from the training labels."""
    first = splits["train"] if "train" in splits else next((df for df in splits.values() if "label" in df.columns), None)
    if multi_label:  # a dataset's Sequence(ClassLabel) names, else every label seen in training
        return class_names or multi_label_names(first["label"])
    if task is not None:
        return None if task.is_regression else list(task.label_names)
    if class_names is not None:
        return class_names
    return infer_label_names(first["label"]) if first is not None else []


def multi_label_problem(splits: dict[str, pd.DataFrame]) -> bool:
    """True when the label cells are lists (multi-label); every labelled split must agree."""
    kinds = {name: is_multi_label(df["label"], name) for name, df in splits.items() if "label" in df.columns}
    if len(set(kinds.values())) > 1:
        lists = [n for n, k in kinds.items() if k]
        single = [n for n, k in kinds.items() if not k]
        raise DataError(f"split(s) {lists} hold lists of labels (multi-label) but {single} hold single labels; "
                        f"give every split the same kind of label")
    return any(kinds.values())


def handle_unlabeled(splits: dict[str, pd.DataFrame], sources: dict[str, str], cfg: DataConfig
                     ) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Rows without a label: an error naming them, or dropped and counted (`--drop-unlabeled`).

    Left in, an empty cell would become a class "" and a NaN would turn a classification file into
    regression. A test split whose label cells are all empty is simply unlabeled."""
    out, dropped = {}, {}
    for name, df in splits.items():
        rows = unlabeled_rows(df["label"]) if "label" in df.columns else []
        if rows and name.startswith("test") and len(rows) == len(df):
            df = df.drop(columns="label")
        elif rows and cfg.drop_unlabeled:
            df = df.drop(index=df.index[rows]).reset_index(drop=True)
            dropped[name] = len(rows)
        elif rows:
            column = cfg.label_column or "label"
            raise DataError(f"{name} split ({sources.get(name, name)}): {len(rows)} of {len(df)} row(s) have no label "
                            f"in column {column!r} ({describe_rows(rows)}, counting data rows from 1); fill them "
                            f"in, or pass --drop-unlabeled to leave them out")
        out[name] = df
    return out, dropped


# ---------------------------------------------------------------------------------------------
# Tokenisation (cached) and batching


def default_cache_dir() -> Path:
    return Path(os.environ.get("TUNELOOP_CACHE") or Path.home() / ".cache" / "tuneloop")


# Serialising a tokenizer takes ~0.5 s (a 30k vocabulary): once per tokenizer object and vocabulary size.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    size = len(tokenizer)
    try:
        known = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # an object that cannot be weakly referenced
        known = None
    if known is not None and known[0] == size:
        return known[1]
    fingerprint = compute_tokenizer_fingerprint(tokenizer)
    try:
        _FINGERPRINTS[tokenizer] = (size, fingerprint)
    except TypeError:
        pass
    return fingerprint


def compute_tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Truncation/padding settings are runtime state of the backend (set by every call): not identity.
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def check_room_for_text(tokenizer, max_length: int, pair: bool) -> None:
    """A max_length that holds only the special tokens cannot be truncated to: the tokenizer returns longer inputs."""
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    if max_length <= special:
        raise DataError(f"data.max_length {max_length} leaves no room for text: the tokenizer adds {special} special "
                        f"tokens to each {'pair' if pair else 'input'}; give at least {special + 1}")


def tokenize_splits(raw: RawData, tokenizer, cfg: DataConfig) -> dict[str, Any]:
    """Tokenise every split with truncation (no padding: batches pad dynamically), cached on disk."""
    import datasets

    check_room_for_text(tokenizer, cfg.max_length, raw.is_pair)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    out = {}
    for name, df in raw.splits.items():
        # Row hashes in order (a sum would let a reordered file reuse the old order), every column, the tokenizer.
        rows = hashlib.sha256(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes()).hexdigest()
        key = hashlib.sha256(json.dumps([
            rows, len(df), list(df.columns), [str(t) for t in df.dtypes],
            tokenizer_fingerprint(tokenizer), cfg.max_length, cfg.long_text, cfg.stride,
            3,  # bump the last number when the layout changes
        ]).encode()).hexdigest()[:20]
        path = cache_root / "tokenized" / key
        if (path / "dataset_info.json").exists():
            try:
                out[name] = datasets.load_from_disk(str(path))
                continue
            except Exception as e:  # a damaged cache entry is rebuilt, never trusted
                log.warning("ignoring unreadable tokenisation cache %s: %s", path, e)
        texts = df["text"].tolist()
        pairs = df["text_pair"].tolist() if "text_pair" in df.columns else None
        enc, docs = encode(tokenizer, texts, pairs, cfg.long_text, cfg.max_length, cfg.stride)
        columns = {k: v for k, v in enc.items()}
        columns["length"] = [len(ids) for ids in enc["input_ids"]]
        if "label" in df.columns:
            labels = [list(v) if isinstance(v, tuple) else v for v in df["label"].tolist()]  # multi-hot: a list
            columns["labels"] = labels if docs is None else [labels[d] for d in docs]  # each window: its document's
        if docs is not None:
            columns["doc"] = docs
        ds = datasets.Dataset.from_dict(columns)
        try:
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            quiet = not datasets.utils.are_progress_bars_disabled()
            if quiet:
                datasets.utils.disable_progress_bars()
            try:
                ds.save_to_disk(str(tmp))
            finally:
                if quiet:
                    datasets.utils.enable_progress_bars()
            os.replace(tmp, path)
            ds = datasets.load_from_disk(str(path))
        except OSError as e:
            log.warning("could not cache tokenised %s split in %s: %s", name, cache_root, e)
        out[name] = ds
    return out


class Collator:
    """Dynamic padding of a list of tokenised examples, dropping the bookkeeping `length` column."""

    def __init__(self, tokenizer, cfg: DataConfig, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorWithPadding

        fixed = cfg.padding == "max_length"  # exactly max_length, as asked: no rounding beyond it
        self.inner = DataCollatorWithPadding(tokenizer, padding="max_length" if fixed else "longest",
                                             max_length=cfg.max_length, return_tensors="pt",
                                             pad_to_multiple_of=None if fixed else cfg.pad_to_multiple_of or pad_to_multiple_of)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner([{k: v for k, v in f.items() if k not in ("length", "doc")} for f in features])
        if "doc" in features[0]:  # long documents in windows: which document each window belongs to
            import torch

            batch["doc"] = torch.tensor([f["doc"] for f in features])
        return batch
