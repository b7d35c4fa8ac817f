"""Label columns: which cells hold no label, what the label set is, and how each value maps to an id.

`infer_label_names` is the one place that decides, from the training labels, whether one's own data is
classification (and with which classes) or regression. Every cell passes through `label_key` first, in
inference and in encoding alike, so that `" pos"` and `"pos"`, or JSON `true` and CSV `true`, are one class.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from tuneloop.errors import DataError

MAX_ROWS_NAMED = 5  # an error names this many rows, then counts the rest


def label_key(value: Any) -> str | None:
    """The canonical text of one label cell; None for a missing one (null, NaN, empty or blank).

    Booleans become `true`/`false` (two classes, not 1.0/0.0); integral numbers lose their `.0`.
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() in ("nan", "-nan", "+nan"):  # float("nan") would make it a NaN target
            return None
        return text
    raise DataError(f"label {value!r} is a {type(value).__name__}; a label is a string, a number or a boolean")


def keys(labels: pd.Series) -> list[str | None]:
    return [label_key(v) for v in labels.tolist()]


def number(key: str) -> float | None:
    try:
        value = float(key)
    except ValueError:
        return None
    return value


def is_list_cell(value: Any) -> bool:
    """A multi-label cell: a JSON list, a Parquet list, a `datasets` Sequence (numpy array) or a tuple."""
    return isinstance(value, (list, tuple, np.ndarray))


def unlabeled_rows(labels: pd.Series) -> list[int]:
    """Positions (0-based) of the cells that hold no label (a list, even empty, holds a label set)."""
    return [i for i, v in enumerate(labels.tolist()) if not is_list_cell(v) and label_key(v) is None]


def is_multi_label(labels: pd.Series, split: str) -> bool:
    """True when the column's cells are lists of labels; lists mixed with single values are an error."""
    cells = labels.tolist()
    lists = [is_list_cell(v) for v in cells]
    if not any(lists):
        return False
    scalars = [i for i, is_list in enumerate(lists) if not is_list]
    if scalars:
        raise DataError(f"{split}: the label column mixes lists (multi-label) with single labels ({describe_rows(scalars)}, "
                        f"counting data rows from 1, e.g. {cells[scalars[0]]!r}); give every row a list, [] for none")
    return True


def multi_label_names(train_labels: pd.Series) -> list[str]:
    """The label set of a multi-label column: every label in any row's list, sorted as single labels are."""
    flat = pd.Series([v for cell in train_labels.tolist() for v in list(cell)], dtype=object)
    names = infer_label_names(flat)
    if names is None:
        raise DataError("train: a multi-label column holds label names or integers, not fractional numbers")
    return names


def encode_multi_labels(df: pd.DataFrame, label_names: list[str], split: str) -> pd.DataFrame:
    """Each row's list of labels as a multi-hot tuple of floats (hashable, so splits keep their fingerprint)."""
    index = {name: i for i, name in enumerate(label_names)}
    names_are_numbers = all(number(n) is not None for n in label_names)
    rows = []
    for cell in df["label"].tolist():
        hot = [0.0] * len(label_names)
        for value in list(cell):
            key = label_key(value)
            if key is not None:
                hot[label_id(key, index, names_are_numbers, split, label_names)] = 1.0
        rows.append(tuple(hot))
    return df.assign(label=pd.Series(rows, index=df.index, dtype=object))


def describe_rows(rows: list[int]) -> str:
    """'rows 3, 7' (1-based, as a user counts data rows), with the rest counted beyond MAX_ROWS_NAMED."""
    named = ", ".join(str(i + 1) for i in rows[:MAX_ROWS_NAMED])
    more = f" and {len(rows) - MAX_ROWS_NAMED} more" if len(rows) > MAX_ROWS_NAMED else ""
    return f"row{'s' if len(rows) > 1 else ''} {named}{more}"


def infer_label_names(train_labels: pd.Series) -> list[str] | None:
    """The task's kind from the training labels: None (regression) when every label is a number and one is
    not integral; else the class names, sorted (numerically when every label is an integer)."""
    found = [k for k in keys(train_labels) if k is not None]
    numbers = [number(k) for k in found]
    if found and all(n is not None for n in numbers):
        bad = next((k for k, n in zip(found, numbers) if not math.isfinite(n)), None)
        if bad is not None:
            raise DataError(f"train: label {bad!r} is not a finite number")
        if not all(float(n).is_integer() for n in numbers):
            return None
        return [str(v) for v in sorted({int(n) for n in numbers})]
    return sorted(set(found))


def encode_labels(df: pd.DataFrame, label_names: list[str] | None, split: str) -> pd.DataFrame:
    """Map raw labels to ids (classification) or floats (regression); unknown labels are an error."""
    if "label" not in df.columns:
        return df
    found = keys(df["label"])
    if label_names is None:
        values = []
        for key in found:
            value = number(key) if key is not None else None
            if value is None or not math.isfinite(value):
                raise DataError(f"{split}: regression label {key!r} is not a finite number")
            values.append(value)
        return df.assign(label=np.asarray(values, dtype=np.float32))
    index = {name: i for i, name in enumerate(label_names)}
    names_are_numbers = all(number(n) is not None for n in label_names)
    ids = [label_id(key, index, names_are_numbers, split, label_names) for key in found]
    return df.assign(label=np.asarray(ids, dtype=np.int64))


def label_id(key: str | None, index: dict[str, int], names_are_numbers: bool, split: str,
             label_names: list[str]) -> int:
    """One label's id: its name, an integral number naming a numeric class, a boolean's name in any case,
    or (for named classes) the id itself, as GLUE files write them."""
    if key in index:
        return index[key]
    value = number(key) if key is not None else None
    if value is not None and math.isfinite(value) and value.is_integer():
        if str(int(value)) in index:
            return index[str(int(value))]
        if not names_are_numbers and 0 <= int(value) < len(label_names):
            return int(value)
    if key is not None and key.lower() in index and key.lower() in ("true", "false"):
        return index[key.lower()]
    raise DataError(f"{split}: label {key!r} is not in the label set {label_names}")


def split_label_cells(labels: pd.Series, separator: str) -> pd.Series:
    """A string label column as lists: each cell split at `separator`, blanks dropped (an empty cell: no label
    on); a missing cell stays missing."""
    out = []
    for v in labels.tolist():
        if is_list_cell(v) or v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(v)
        else:
            out.append([part.strip() for part in str(v).split(separator) if part.strip()])
    return pd.Series(out, index=labels.index, dtype=object)


def label_columns_as_lists(df: pd.DataFrame, columns: list[str], where: str) -> pd.Series:
    """Several 0/1 columns as one list column: each row lists the columns that hold 1 (or true)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing label column(s) {missing} (data.label_columns); found {list(df.columns)}")
    on = {"1": True, "true": True, "0": False, "false": False}
    rows = []
    for i, cells in enumerate(zip(*(df[c].tolist() for c in columns))):
        flags = [on.get((label_key(v) or "").lower()) for v in cells]
        bad = next((c for c, v, f in zip(columns, cells, flags) if f is None), None)
        if bad is not None:
            raise DataError(f"{where}: label column {bad!r} holds {cells[columns.index(bad)]!r} in row {i + 1}; "
                            f"each of data.label_columns holds 0 or 1 (or true/false)")
        rows.append([c for c, f in zip(columns, flags) if f])
    return pd.Series(rows, index=df.index, dtype=object)


def label_counts(labels: pd.Series, num_labels: int) -> list[int]:
    """Examples that carry each label id: one per row for single labels, every label on for multi-hot rows."""
    cells = labels.tolist()
    if cells and isinstance(cells[0], tuple):
        return [int(v) for v in np.asarray(cells, dtype=np.float64).sum(0)]
    return [int(v) for v in np.bincount(np.asarray(cells, dtype=np.int64), minlength=num_labels)]
