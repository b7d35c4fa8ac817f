"""Property-based fuzzing of every input a user hands tuneloop: data files, YAML configs, flag lists, predict input.

Each example ends in success or in one TuneloopError line (what the CLI prints as `tuneloop: error: ...`),
never in another exception. The fuzzing runs in-process at the layer that reads the input (data loading,
label inference, tokenisation and the `tuneloop data` preview; config parsing; the CLI's parsing up to
`--print-config`; predict's input reading and one forward pass), so that thousands of examples take about
two minutes. Example counts come from the Hypothesis profile (`ci` by default, see conftest.py); every
failure found here also has a plain regression test in the module's own test file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import fuzz_examples
from tuneloop.config import Config, DataConfig, field_paths, load_config, short_names
from tuneloop.errors import TuneloopError



def fuzz(examples: int) -> settings:
    """`examples` in the `ci` profile (scaled by the others); fixtures reused across examples are meant."""
    return settings(max_examples=fuzz_examples(examples), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def one_line_or_success(fn):
    """Run `fn`; a TuneloopError must be one non-empty line. Anything else propagates (a test failure)."""
    try:
        return fn()
    except TuneloopError as e:
        message = str(e)
        assert message.strip() and "\n" not in message and "Traceback" not in message, repr(message)
        return None


# ---------------------------------------------------------------------------------------------------------
# Data files

COLUMN_NAMES = st.one_of(st.sampled_from(["text", "label", "text_pair", "sentence1", "sentence2", "sentence", "y"]),
                         st.text(min_size=0, max_size=6))
HUGE = "x" * 200_000
CELLS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "pos", " pos ", "neg", "NaN", "nan", "null", "True", "false", "1", "0", "1.0", "0.5",
                     "inf", "-inf", "a\tb", 'say "hi"', "line\nbreak", "é", "\ufeffbom", HUGE]),
    st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
)


LABEL_CELLS = {"classes": st.sampled_from(["pos", "neg", " pos", "neg ", "pos"]), "few": st.integers(0, 2),
               "floats": st.floats(0, 5, width=32), "bools": st.booleans(), "mixed": CELLS,
               "gappy": st.one_of(st.sampled_from(["pos", "neg"]), st.sampled_from(["", " ", "NaN"]), st.none())}


@st.composite
def tables(draw) -> pd.DataFrame:
    """Half shaped like a real file (text and label columns, labels of one kind), half anything at all."""
    shaped = draw(st.booleans())
    names = draw(st.lists(COLUMN_NAMES, min_size=1, max_size=4, unique=True))
    if shaped:
        names = ["text", "label", *(n for n in names[:2] if n not in ("text", "label"))]
    rows = draw(st.integers(1, 8) if shaped else st.integers(0, 6))
    columns = {}
    for name in names:
        if shaped and name == "label":
            cell = LABEL_CELLS[draw(st.sampled_from(sorted(LABEL_CELLS)))]
        elif shaped and name == "text":
            cell = st.one_of(st.text(max_size=30), st.sampled_from(["", HUGE, "a\tb", 'say "hi"', "line\nbreak"]))
        else:
            kind = draw(st.sampled_from(["mixed", "str", "int", "float", "bool"]))
            cell = {"mixed": CELLS, "str": st.text(max_size=10), "int": st.integers(-2, 5),
                    "float": st.floats(allow_nan=True, allow_infinity=True, width=32), "bool": st.booleans()}[kind]
        columns[name] = draw(st.lists(cell, min_size=rows, max_size=rows))
    return pd.DataFrame(columns)


def _csv_text(df: pd.DataFrame, sep: str, quote: bool) -> str:
    import csv

    buf = io.StringIO()
    df.to_csv(buf, sep=sep, index=False, quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE,
              escapechar="\\" if not quote else None)
    return buf.getvalue()


@st.composite
def data_files(draw, folder: Path, stem: str) -> Path:
    """One file in a random format, encoding, BOM and line ending; sometimes random bytes."""
    suffix = draw(st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".parquet"]))
    path = folder / f"{stem}{suffix}"
    if draw(st.integers(0, 9)) == 0:
        path.write_bytes(draw(st.binary(max_size=64)))
        return path
    df = draw(tables())
    if suffix == ".parquet":
        try:
            df.to_parquet(path)
        except Exception:  # a column pyarrow cannot store (mixed types): write it as strings instead
            df.astype(str).to_parquet(path)
        return path
    if suffix in (".csv", ".tsv"):
        try:
            text = _csv_text(df, "," if suffix == ".csv" else "\t", draw(st.booleans()))
        except Exception:  # QUOTE_NONE cannot write some cells: quote them
            text = _csv_text(df, "," if suffix == ".csv" else "\t", True)
    elif suffix == ".jsonl":
        text = df.to_json(orient="records", lines=True)
    else:
        text = df.to_json(orient="records")
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    path.write_bytes(text.encode(encoding, errors="replace"))
    return path


@st.composite
def data_configs(draw, folder: Path) -> DataConfig:
    train = draw(data_files(folder, "train"))
    validation = draw(st.one_of(st.none(), st.just(train), data_files(folder, "dev")))
    explicit = draw(st.integers(0, 3)) == 0  # mostly the defaults: the columns are found by name
    text_columns = draw(st.lists(COLUMN_NAMES, min_size=1, max_size=2, unique=True)) if explicit else None
    label_column = draw(COLUMN_NAMES) if explicit and draw(st.booleans()) else None
    if text_columns and label_column in text_columns:  # refused by the config itself (tested in test_labels)
        label_column = None
    return DataConfig(task=None, train_file=str(train), validation_file=str(validation) if validation else None,
                      text_columns=text_columns, label_column=label_column, drop_unlabeled=draw(st.booleans()),
                      max_length=draw(st.integers(1, 40)), cache_dir=str(folder / "cache"))


def check_loaded(raw) -> None:
    """What every successful load promises the loop."""
    names = raw.label_names
    if names is not None:
        assert len(set(names)) == len(names) and "" not in names
    for df in raw.splits.values():
        assert df["text"].map(type).eq(str).all()
        if "label" not in df.columns:
            continue
        labels = df["label"].to_numpy()
        if names is None:
            assert labels.dtype == "float32" and all(math.isfinite(v) for v in labels)
        else:
            assert labels.dtype == "int64" and all(0 <= v < len(names) for v in labels)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@fuzz(700)
@given(data=st.data())
def test_fuzz_data_files_load_tokenise_and_preview(data, tiny_tokenizer):
    from tuneloop.data import Collator, load_raw, tokenize_splits
    from tuneloop.preview import summarize

    with tempfile.TemporaryDirectory() as tmp:
        cfg = data.draw(data_configs(Path(tmp)))
        raw = one_line_or_success(lambda: load_raw(cfg))
        if raw is None:
            event("refused while loading")
            return
        check_loaded(raw)
        tokenized = one_line_or_success(lambda: tokenize_splits(raw, tiny_tokenizer, cfg))
        if tokenized is None:
            event("refused while tokenising")
            return
        event("loaded, tokenised and previewed: " + ("regression" if raw.is_regression else "classification"))
        assert all(max(ds["length"], default=0) <= cfg.max_length for ds in tokenized.values())
        config = Config()
        config.data = cfg
        summarize(raw, tokenized, tiny_tokenizer, Collator(tiny_tokenizer, cfg), config)


# ---------------------------------------------------------------------------------------------------------
# YAML configs and flag lists

PATHS = sorted(field_paths())
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=10), st.sampled_from(["auto", "null", "none", "true", "no", "lora", "bf16",
                                                           "1e-4", "cosine", "mrpc", "sst2", "latest", "~", "a,b"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))


@st.composite
def raw_configs(draw) -> dict:
    raw: dict = {}
    for path in draw(st.lists(st.sampled_from(PATHS), max_size=6)):
        section, name = path.split(".")
        raw.setdefault(section, {})[name] = draw(VALUES)
    if draw(st.integers(0, 4)) == 0:  # an unknown section or key, or a section that is not a mapping
        raw[draw(st.text(max_size=8))] = draw(st.one_of(VALUES, st.dictionaries(st.text(max_size=6), VALUES)))
    return raw


@fuzz(800)
@given(raw=raw_configs(), as_text=st.booleans())
@example(raw={"checkpoint": {"resume": False}}, as_text=True)
def test_fuzz_yaml_configs(raw, as_text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True) if as_text else json.dumps(raw, default=str))
        config = one_line_or_success(lambda: load_config(path))
    if config is not None:  # what a run saves loads back as the same config
        assert Config.from_dict(yaml.safe_load(config.to_yaml())) == config
        assert config.checkpoint.resume is None or isinstance(config.checkpoint.resume, str)
        assert config.checkpoint.resume not in ("False", "True", "None")


@fuzz(200)
@given(text=st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1"))))
def test_fuzz_yaml_text(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(text.encode("utf-8", errors="surrogatepass") if text.isascii() else text.encode("latin-1",
                                                                                                           "replace"))
        one_line_or_success(lambda: load_config(path))


FLAGS = sorted({f"--{p}" for p in field_paths()} | {f"--{n.replace('_', '-')}" for n in short_names()}
               | {"--config", "--seeds", "--bogus", "--learning_rate", "--epochs", "-x"})
FLAG_VALUES = st.one_of(st.sampled_from(["fast", "lora", "null", "true", "false", "0", "-1", "1e-3", "2.5", "nan",
                                         "auto", "a,b", "", "=", "--", "mrpc", "none", "tensorboard,mlflow"]),
                        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8))


@st.composite
def flag_lists(draw) -> list[str]:
    argv = []
    for _ in range(draw(st.integers(0, 5))):
        flag = draw(st.sampled_from(FLAGS))
        style = draw(st.sampled_from(["space", "equals", "bare"]))
        value = draw(FLAG_VALUES)
        argv += {"space": [flag, value], "equals": [f"{flag}={value}"], "bare": [flag]}[style]
    return argv


@fuzz(300)
@given(argv=flag_lists())
def test_fuzz_train_flags_parse_to_a_config_or_one_line(argv, capsys):
    from tuneloop.cli import main

    code = main(["train", *argv, "--print-config"])
    captured = capsys.readouterr()
    if code == 0:
        config = Config.from_dict(yaml.safe_load(captured.out))
        assert config.checkpoint.resume not in ("False", "True")
        return
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tuneloop: error: "), captured.err
    assert "run with --debug for the traceback" not in lines[0], lines[0]  # an unexpected exception


# ---------------------------------------------------------------------------------------------------------
# predict inputs


@pytest.fixture(scope="module")
def tiny_classifier(tiny_model_dir):
    from tuneloop.predict import load_for_prediction

    return load_for_prediction(str(tiny_model_dir))


@fuzz(250)
@given(data=st.data(), stdin=st.booleans())
def test_fuzz_predict_inputs(data, stdin, tiny_classifier, monkeypatch):
    from tuneloop.predict import predict_with, read_inputs

    model, tokenizer = tiny_classifier
    with tempfile.TemporaryDirectory() as tmp:
        if stdin:
            text = data.draw(st.one_of(st.text(max_size=200), st.builds(
                lambda df, lines: df.to_json(orient="records", lines=lines) if lines else df.to_csv(index=False),
                tables(), st.booleans())))
            monkeypatch.setattr(sys, "stdin", io.StringIO(text))
            df = one_line_or_success(lambda: read_inputs("-"))
        else:
            path = data.draw(data_files(Path(tmp), "input"))
            df = one_line_or_success(lambda: read_inputs(str(path)))
    if df is None:
        return
    max_length = data.draw(st.integers(1, 600))
    with contextlib.redirect_stderr(io.StringIO()):
        rows = one_line_or_success(lambda: predict_with(model, tokenizer, df, batch_size=4, max_length=max_length))
    if rows is None:
        return
    assert len(rows) == len(df) and all(r["label"] in model.config.id2label.values() for r in rows)


def test_a_config_section_named_with_a_line_break_is_one_line():
    """Found by test_fuzz_yaml_configs: {'\\n': None} gave "unknown config section '\\n'" across two lines."""
    from tuneloop.config import config_from_dict
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config_from_dict({"\n": None})
    assert str(e.value) == "unknown config section '\\n'"
