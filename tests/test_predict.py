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


def test_precision_bf16_predicts_with_bf16_weights_close_to_fp32(tiny_model_dir, tmp_path):
    import json

    import torch

    from tuneloop.cli import main

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": f"sentence number {i}", "text_pair": "and its pair " * i}) + "\n"
                           for i in range(12)))
    for precision in ("fp32", "bf16"):
        assert main(["predict", "--model-dir", str(tiny_model_dir), "--input", str(inp), "--output",
                     str(tmp_path / f"{precision}.jsonl"), "--precision", precision]) == 0
    fp32, bf16 = ([json.loads(line)["score"] for line in (tmp_path / f"{p}.jsonl").read_text().splitlines()]
                  for p in ("fp32", "bf16"))
    assert len(bf16) == 12
    assert bf16 == pytest.approx(fp32, abs=0.01) and bf16 != fp32  # really bf16 arithmetic, and close
    model, _ = load_for_prediction(str(tiny_model_dir), precision="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("flags, line", [
    (["--precision", "fp16"], "--precision: 'fp16' is not a precision; choose fp32 or bf16"),
    (["--precision", "bf16", "--runtime", "onnx"],
     "--precision bf16 runs with --runtime torch; ONNX Runtime's fast CPU path is --quantize int8"),
    (["--precision", "bf16", "--quantize", "int8"], "--precision bf16 and --quantize int8: choose one"),
])
def test_a_bad_precision_is_one_line(tiny_model_dir, tmp_path, capsys, flags, line):
    from tuneloop.cli import main

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "a"}\n')
    assert main(["predict", "--model-dir", str(tiny_model_dir), "--input", str(inp), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"tuneloop: error: {line}"]


def test_precision_bf16_on_a_cpu_without_fast_bf16_warns(tiny_model_dir, monkeypatch, tuneloop_log):
    from tuneloop import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    load_for_prediction(str(tiny_model_dir), precision="bf16")
    assert [r.getMessage() for r in tuneloop_log.records] == [
        "this CPU has no fast bf16 (AVX512-BF16 or AMX): --precision bf16 predicts slower than fp32 here"]
