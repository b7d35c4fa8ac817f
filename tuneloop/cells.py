"""Table cells as the tokenizer needs them: one string per row, whatever the file format made of the cell.

`Series.astype(str)` is not that: under pandas 3 it keeps a missing cell (a JSON null, a number column's NaN) as
NaN, which the tokenizer then rejects mid-run. A missing text cell is empty text here, as an empty CSV cell is.
"""

from __future__ import annotations

import math

import pandas as pd

from tuneloop.errors import DataError


def cell_text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    return str(value)


def text_column(df: pd.DataFrame, column, where: str) -> pd.Series:
    """Column `column` of `df` as strings; a column name that appears twice is an error, not a frame."""
    values = df[column]
    if isinstance(values, pd.DataFrame):
        raise DataError(f"{where}: column {column!r} appears {values.shape[1]} times; give each column its own name")
    return pd.Series([cell_text(v) for v in values.tolist()], index=df.index, dtype=object)
