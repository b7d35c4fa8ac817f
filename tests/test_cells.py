"""Text cells: always strings, whatever the format made of a missing cell."""

import pandas as pd
import pytest

from tuneloop.cells import text_column
from tuneloop.errors import DataError


def test_missing_cells_are_empty_text_not_nan():
    """Found by tests/test_fuzz.py: under pandas 3 `astype(str)` keeps NaN, which the tokenizer rejects."""
    df = pd.DataFrame({"text": [0.5, float("nan"), None, "a", True]})
    assert text_column(df, "text", "input").tolist() == ["0.5", "", "", "a", "True"]


def test_a_column_named_twice_is_one_line():
    df = pd.DataFrame([["a", "b"]], columns=["text", "text"])
    with pytest.raises(DataError, match="input: column 'text' appears 2 times"):
        text_column(df, "text", "input")
