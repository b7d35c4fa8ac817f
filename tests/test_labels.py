"""Label inference and encoding of one's own files: missing cells, whitespace, booleans, leaks."""

import json

import pandas as pd
import pytest

from tuneloop.cli import main
from tuneloop.config import Config, DataConfig
from tuneloop.data import load_raw
from tuneloop.errors import ConfigError, DataError
from tuneloop.labels import encode_labels, infer_label_names, label_key


def _own(tmp_path, train: str, dev: str | None = None, **cfg) -> DataConfig:
    (tmp_path / "train.csv").write_text(train)
    if dev is not None:
        (tmp_path / "dev.csv").write_text(dev)
    return DataConfig(task=None, train_file=str(tmp_path / "train.csv"),
                      validation_file=str(tmp_path / "dev.csv") if dev is not None else None, **cfg)


def test_empty_label_cell_names_the_rows_instead_of_adding_a_class(tmp_path):
    # Before: the empty cell became a third class "" (or, with numbers, a NaN regression target).
    cfg = _own(tmp_path, "text,label\na,pos\nb,\nc,neg\nd, \n")
    with pytest.raises(DataError, match=r"train split .*train\.csv\): 2 of 4 row\(s\) have no label in column "
                                        r"'label' \(rows 2, 4, counting data rows from 1\).*--drop-unlabeled"):
        load_raw(cfg)


def test_nan_label_does_not_turn_classification_into_regression(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": v}) for t, v in
                              [("a", 1), ("b", 0), ("c", None), ("d", 1)]))
    with pytest.raises(DataError, match=r"1 of 4 row\(s\) have no label .*\(row 3,"):
        load_raw(DataConfig(task=None, train_file=str(path)))
    raw = load_raw(DataConfig(task=None, train_file=str(path), drop_unlabeled=True))
    assert raw.label_names == ["0", "1"] and not raw.is_regression
    assert raw.splits["train"]["label"].tolist() == [1, 0, 1] and raw.dropped == {"train": 1}


def test_literal_nan_in_a_csv_is_missing_too(tmp_path):
    cfg = _own(tmp_path, "text,label\na,0.5\nb,NaN\nc,1.5\n", drop_unlabeled=True)
    raw = load_raw(cfg)
    assert raw.is_regression and raw.splits["train"]["label"].tolist() == [0.5, 1.5]


def test_many_unlabeled_rows_are_counted_beyond_five(tmp_path):
    cfg = _own(tmp_path, "text,label\n" + "".join(f"t{i},\n" for i in range(8)) + "x,a\ny,b\n")
    with pytest.raises(DataError, match=r"8 of 10 row\(s\) .*rows 1, 2, 3, 4, 5 and 3 more"):
        load_raw(cfg)


def test_drop_unlabeled_is_counted_in_the_start_line(tmp_path, tiny_model_dir, capsys):
    rows = "".join(f"sentence {i} is {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}\n" for i in range(16))
    (tmp_path / "train.csv").write_text("text,label\n" + rows + "no label here,\n  ,\n")
    (tmp_path / "dev.csv").write_text("text,label\n" + rows)
    code = main(["train", "--model", str(tiny_model_dir), "--train-file", str(tmp_path / "train.csv"),
                 "--validation-file", str(tmp_path / "dev.csv"), "--drop-unlabeled", "--epochs", "1",
                 "--output-dir", str(tmp_path / "out"), "--mixed-precision", "no", "--report-to", "none"])
    out = capsys.readouterr().out
    assert code == 0
    assert "train=16 (2 unlabeled rows dropped), validation=16 |" in out


def test_whitespace_around_labels_is_one_class_in_inference_and_encoding(tmp_path):
    # Before: inferred unstripped (' pos' and 'pos' two classes), encoded stripped (' pos' not in the set).
    cfg = _own(tmp_path, 'text,label\na," pos"\nb,neg \nc,pos\n', 'text,label\nd,  neg\n')
    raw = load_raw(cfg)
    assert raw.label_names == ["neg", "pos"]
    assert raw.splits["train"]["label"].tolist() == [1, 0, 1] and raw.splits["validation"]["label"].tolist() == [0]


def test_json_booleans_are_two_classes(tmp_path):
    # Before: read as the numbers 0 and 1, then `label True is not in the label set ['0', '1']`.
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2 == 0}) for i in range(4)))
    (tmp_path / "dev.csv").write_text("text,label\nx,True\ny,false\n")
    raw = load_raw(DataConfig(task=None, train_file=str(path), validation_file=str(tmp_path / "dev.csv")))
    assert raw.label_names == ["false", "true"] and raw.metrics == ("accuracy", "f1")
    assert raw.splits["train"]["label"].tolist() == [1, 0, 1, 0]
    assert raw.splits["validation"]["label"].tolist() == [1, 0]


def test_label_column_named_as_a_text_column_is_refused(tmp_path):
    cfg = _own(tmp_path, "text,label\na,pos\nb,neg\n")
    with pytest.raises(DataError, match="column 'label' is both a text column and the label column"):
        load_raw(DataConfig(**{**cfg.__dict__, "text_columns": ["text", "label"]}))
    with pytest.raises(ConfigError, match="data.label_column: 'stars' is also a text column"):
        Config.from_flags(train_file="x.csv", text_columns="review,stars", label_column="stars")


def test_one_inference_function_decides_the_kind():
    assert infer_label_names(pd.Series(["1", "0", "2"])) == ["0", "1", "2"]
    assert infer_label_names(pd.Series([1.0, 10.0, 2.0])) == ["1", "2", "10"]  # numerically sorted
    assert infer_label_names(pd.Series(["0.5", "1"])) is None
    assert infer_label_names(pd.Series(["b", "a", " a"])) == ["a", "b"]
    assert infer_label_names(pd.Series([True, False])) == ["false", "true"]
    with pytest.raises(DataError, match="not a finite number"):
        infer_label_names(pd.Series(["0.5", "inf"]))


def test_label_keys_and_encoding():
    assert [label_key(v) for v in (None, float("nan"), "", "  ", " x ", 3.0, 2.5, True)] == \
        [None, None, None, None, "x", "3", "2.5", "true"]
    with pytest.raises(DataError, match="is a list"):
        label_key([1, 2])
    df = pd.DataFrame({"text": ["a", "b"], "label": ["1", "0"]})
    assert encode_labels(df, ["neg", "pos"], "validation")["label"].tolist() == [1, 0]  # ids of named classes
    with pytest.raises(DataError, match="regression label 'x' is not a finite number"):
        encode_labels(df.assign(label=["x", "1"]), None, "train")
