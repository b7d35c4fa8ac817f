"""`export --format onnx` and `predict --runtime onnx`: torch's logits within 1e-4, int8 by ONNX Runtime,
adapters merged, settings carried, and a folder that predicts with onnxruntime, numpy and tokenizers alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import mrpc_dev_pairs
from tuneloop.cli import main
from tuneloop.predict import load_for_prediction, predict_rows

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return mrpc_dev_pairs(40)


@pytest.fixture(scope="module")
def source_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a settings file beside it, as later tuneloop versions may save (thresholds...)."""
    path = tmp_path_factory.mktemp("with-settings")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    (path / "thresholds.json").write_text('{"LABEL_1": 0.4}')
    return path


@pytest.fixture(scope="module")
def onnx_dir(source_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    assert main(["export", "--model-dir", str(source_dir), "--output-dir", str(out), "--format", "onnx"]) == 0
    return out


@pytest.fixture(scope="module")
def onnx_int8_dir(source_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "int8"
    assert main(["export", "--model-dir", str(source_dir), "--output-dir", str(out), "--format", "onnx",
                 "--quantize", "int8"]) == 0
    return out


def logits(model, tokenizer, df: pd.DataFrame):
    import torch

    batch = tokenizer(df.text.tolist(), df.text_pair.tolist(), padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits.numpy()


def test_the_folder_holds_the_model_tokenizer_labels_and_settings(onnx_dir):
    names = {p.name for p in onnx_dir.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "onnx_export.json", "thresholds.json"} <= names
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)
    info = json.loads((onnx_dir / "onnx_export.json").read_text())
    assert info["labels"] == ["LABEL_0", "LABEL_1"] and info["problem_type"] == "single_label_classification"
    assert info["quantize"] is None and info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]


def test_fp32_logits_equal_torch_within_1e_4_at_any_batch_and_length(tiny_model_dir, onnx_dir, rows):
    torch_model, tokenizer = load_for_prediction(str(tiny_model_dir))
    onnx_model, _ = load_for_prediction(str(onnx_dir), runtime="onnx")
    for part in (rows.head(1), rows.head(7), rows):  # batch and sequence axes are dynamic
        expected, got = logits(torch_model, tokenizer, part), logits(onnx_model, tokenizer, part)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4


def test_predict_runtime_onnx_writes_what_torch_writes(tiny_model_dir, onnx_dir, rows, tmp_path):
    inp = tmp_path / "in.jsonl"
    rows.to_json(inp, orient="records", lines=True)
    for runtime, folder in (("torch", tiny_model_dir), ("onnx", onnx_dir)):
        assert main(["predict", "--model-dir", str(folder), "--input", str(inp), "--output",
                     str(tmp_path / f"{runtime}.jsonl"), "--runtime", runtime, "--batch-size", "8"]) == 0
    torch_rows = [json.loads(line) for line in (tmp_path / "torch.jsonl").read_text().splitlines()]
    onnx_rows = [json.loads(line) for line in (tmp_path / "onnx.jsonl").read_text().splitlines()]
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows]
    assert [r["score"] for r in onnx_rows] == pytest.approx([r["score"] for r in torch_rows], abs=1e-5)


def test_int8_is_smaller_and_close_but_really_quantised(onnx_dir, onnx_int8_dir, rows):
    fp32 = list(predict_rows(str(onnx_dir), rows, runtime="onnx"))
    int8 = list(predict_rows(str(onnx_int8_dir), rows, runtime="onnx"))
    assert (onnx_int8_dir / "model.onnx").stat().st_size < 0.5 * (onnx_dir / "model.onnx").stat().st_size
    assert json.loads((onnx_int8_dir / "onnx_export.json").read_text())["quantize"] == "int8"
    diffs = [abs(a["score"] - b["score"]) if a["label"] == b["label"] else abs(a["score"] + b["score"] - 1)
             for a, b in zip(int8, fp32)]
    assert max(diffs) < 0.01 and sum(diffs) > 0
    # Quantising at load time (--runtime onnx --quantize int8 on the fp32 folder) gives the same model.
    on_load = list(predict_rows(str(onnx_dir), rows, runtime="onnx", quantize="int8"))
    assert [r["score"] for r in on_load] == pytest.approx([r["score"] for r in int8], abs=1e-6)


def test_int8_quantises_every_attention_and_linear_layer_and_keeps_their_padding_mask(onnx_dir, onnx_int8_dir):
    import onnx
    from collections import Counter

    layers = json.loads((onnx_dir / "config.json").read_text())["num_hidden_layers"]
    fp32 = onnx.load(str(onnx_dir / "model.onnx"))
    weights = {i.name for i in fp32.graph.initializer}
    attention = [n for n in fp32.graph.node if n.op_type == "Attention"]
    assert len(attention) == layers and all(n.input[1] in weights for n in attention)
    assert not any(a.name == "qkv_hidden_sizes" for n in attention for a in n.attribute)
    int8 = onnx.load(str(onnx_int8_dir / "model.onnx"))
    ops = Counter(n.op_type for n in int8.graph.node)
    assert ops["Attention"] == 0 and ops["QAttention"] == layers
    assert ops["MatMul"] == 0 and ops["MatMulInteger"] > 0
    # QAttention's mask_index (input 5) is the graph's attention_mask: ONNX Runtime's quantiser would have
    # dropped the exporter's additive attention_bias, and the int8 graph would have attended to padding.
    producer = {out: n for n in int8.graph.node for out in n.output}
    masks = {n.input[5] for n in int8.graph.node if n.op_type == "QAttention"}
    assert len(masks) == 1 and "" not in masks
    cast = producer[masks.pop()]
    assert cast.op_type == "Cast" and list(cast.input) == ["attention_mask"]


def test_the_mask_rewrite_keeps_the_fp32_logits_of_padded_rows_exactly(onnx_dir):
    import onnxruntime as ort
    from onnxscript import ir

    from tuneloop.onnx_export import attention_mask_as_index, padded_feed

    model = ir.load(str(onnx_dir / "model.onnx"))
    layers = json.loads((onnx_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(attention_mask_as_index(model)) == layers
    assert attention_mask_as_index(model) == []  # nothing left to rewrite
    before = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feed = padded_feed(before)
    assert feed["attention_mask"][1].tolist() == [1] * 5 + [0] * 4
    np.testing.assert_allclose(after.run(None, feed)[0], before.run(None, feed)[0], atol=1e-6)
    # The padded row alone, without its padding, gives the same logits: the mask really masks.
    alone = {k: v[1:, :5] for k, v in feed.items()}
    np.testing.assert_allclose(after.run(None, alone)[0][0], after.run(None, feed)[0][1], atol=1e-5)


def test_an_attention_bias_that_is_not_the_padding_mask_stays_out_of_int8(onnx_dir, tmp_path, monkeypatch):
    import onnx
    from collections import Counter

    from tuneloop import onnx_export

    # As if the bias held more than padding (a causal or windowed mask): the rewrite changes the logits.
    monkeypatch.setattr(onnx_export, "same_logits", lambda a, b: False)
    onnx_export.quantize_int8(onnx_dir / "model.onnx", tmp_path / "model.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node)
    layers = json.loads((onnx_dir / "config.json").read_text())["num_hidden_layers"]
    assert ops["Attention"] == layers and ops["QAttention"] == 0 and ops["MatMulInteger"] > 0


def test_an_adapter_is_merged_before_export(tiny_model_dir, tmp_path, rows):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import torch

    from tuneloop.adapters import save_adapter

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    # init_lora_weights=False: random B, so the adapter really changes the logits.
    lora = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"],
                                           init_lora_weights=False))
    save_adapter(lora, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    out = tmp_path / "onnx"
    assert main(["export", "--model-dir", str(tmp_path / "adapter"), "--output-dir", str(out), "--format", "onnx"]) == 0
    assert not (out / "adapter_config.json").exists()
    merged, tokenizer = load_for_prediction(str(tmp_path / "adapter"))
    plain, _ = load_for_prediction(str(tiny_model_dir))
    onnx_model, _ = load_for_prediction(str(out), runtime="onnx")
    to_merged = np.abs(logits(onnx_model, tokenizer, rows) - logits(merged, tokenizer, rows)).max()
    to_plain = np.abs(logits(onnx_model, tokenizer, rows) - logits(plain, tokenizer, rows)).max()
    # The tiny model's logits are ~1e-2, so the adapter moves them by ~1e-4 to 1e-3: the export must follow the
    # merged model, far closer than the adapter's own effect.
    assert to_merged < 1e-5 and to_plain > 100 * max(to_merged, 1e-7)


# What docs/serving.md shows: predict from the folder with onnxruntime, numpy and tokenizers only.
STANDALONE = r'''
import json, sys
from pathlib import Path
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

folder = Path(sys.argv[1])
labels = json.loads((folder / "onnx_export.json").read_text())["labels"]
tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
tokenizer.enable_truncation(max_length=512)
tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
pairs = [json.loads(line) for line in sys.stdin]
encodings = tokenizer.encode_batch([(p["text"], p["text_pair"]) for p in pairs])
feed = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
feed = {i.name: feed[i.name] for i in session.get_inputs()}
logits = session.run(["logits"], feed)[0]
probs = np.exp(logits - logits.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)
for p in probs:
    print(json.dumps({"label": labels[int(p.argmax())], "score": float(p.max())}))
assert not {"torch", "transformers", "tuneloop"} & set(sys.modules), "imported more than onnxruntime and tokenizers"
'''


def test_a_fresh_process_predicts_with_onnxruntime_numpy_and_tokenizers_alone(tiny_model_dir, onnx_dir, rows, tmp_path):
    expected = list(predict_rows(str(tiny_model_dir), rows))
    lines = "".join(json.dumps(r) + "\n" for r in rows.to_dict("records"))
    proc = subprocess.run([sys.executable, "-c", STANDALONE, str(onnx_dir)], input=lines, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={k: v for k, v in os.environ.items()
                                                                   if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_bad_format_and_missing_onnx_model_are_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["export", "--model-dir", str(tiny_model_dir), "--output-dir", str(tmp_path / "x"),
                 "--format", "tflite"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tuneloop: error: --format: 'tflite' is not supported; choose onnx (or leave it out for a transformers folder)"]
    assert not (tmp_path / "x").exists()
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "a"}\n')
    assert main(["predict", "--model-dir", str(tiny_model_dir), "--input", str(inp), "--runtime", "onnx"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tuneloop: error: --runtime onnx: {tiny_model_dir} holds no model.onnx; write one with tuneloop export "
        f"--model-dir {tiny_model_dir} --output-dir DIR --format onnx"]
    assert main(["predict", "--model-dir", str(tiny_model_dir), "--input", str(inp), "--runtime", "tflite"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tuneloop: error: --runtime: 'tflite' is not a runtime; choose torch or onnx"]


def test_without_the_onnx_extra_export_says_what_to_install(tiny_model_dir, tmp_path):
    code = ("import sys; sys.modules['onnxscript'] = None; from tuneloop.cli import main; "
            f"sys.exit(main(['export', '--model-dir', {str(tiny_model_dir)!r}, '--output-dir', {str(tmp_path / 'o')!r}, "
            "'--format', 'onnx']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "tuneloop: error: ONNX export needs onnxscript, which is not installed: pip install 'tuneloop[onnx]'"]
