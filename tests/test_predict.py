"""Reading predict input and predicting with a tiny model, in-process."""

import io
import sys

import pytest

from tuneloop.errors import DataError
from tuneloop.predict import load_for_prediction, predict_with, read_inputs


def test_stdin_json_lines_with_a_null_text_predict(tiny_model_dir, monkeypatch):
    """Found by tests/test_fuzz.py: a JSON null text reached the tokenizer as NaN (TypeError: TextEncodeInput ...)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"text": 0}\n{"other": 1}\n{"text": null}\n'))
    df = read_inputs("-")
    model, tokenizer = load_for_prediction(str(tiny_model_dir))
    rows = predict_with(model, tokenizer, df, batch_size=2)
    assert len(rows) == 3 and all(r["label"] in model.config.id2label.values() for r in rows)


def test_max_length_without_room_for_text_is_one_line(tiny_model_dir):
    import pandas as pd

    model, tokenizer = load_for_prediction(str(tiny_model_dir))
    with pytest.raises(DataError, match="data.max_length 1 leaves no room for text"):
        predict_with(model, tokenizer, pd.DataFrame({"text": ["a b c"]}), max_length=1)
