"""Fast inference: length-sorted batched prediction, int8 prediction, `tuneloop export` loading without tuneloop."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import mrpc_dev_pairs
from tuneloop.cli import main
from tuneloop.predict import predict_rows


# int8 export writes torchao weights; torchao (tuneloop[int8]) needs torch >= 2.11, so `make test-min` runs without it.
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="int8 export needs torchao: pip install 'tuneloop[int8]'")


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return mrpc_dev_pairs(60)


@pytest.fixture(scope="module")
def fp32(tiny_model_dir, rows):
    return list(predict_rows(str(tiny_model_dir), rows, batch_size=1))  # one row per batch: no padding at all


def test_batches_sorted_by_length_return_rows_in_input_order(tiny_model_dir, rows, fp32):
    batched = list(predict_rows(str(tiny_model_dir), rows, batch_size=16))
    assert [r["label"] for r in batched] == [r["label"] for r in fp32]
    assert [r["score"] for r in batched] == pytest.approx([r["score"] for r in fp32], abs=1e-5)


def test_int8_predictions_agree_with_fp32(tiny_model_dir, rows, fp32):
    int8 = list(predict_rows(str(tiny_model_dir), rows, batch_size=16, quantize="int8"))
    # The tiny random model's two classes are close (scores near 0.5), so compare probabilities, not labels.
    diffs = [abs(a["score"] - b["score"]) if a["label"] == b["label"] else abs(a["score"] + b["score"] - 1)
             for a, b in zip(int8, fp32)]
    assert max(diffs) < 0.01 and sum(diffs) > 0  # close, and really computed differently


def test_int8_weights_have_one_scale_per_output_channel(tiny_model_dir):
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from tuneloop.predict import load_for_prediction

    model, _ = load_for_prediction(str(tiny_model_dir), "int8")
    layers = [m for m in model.modules() if isinstance(m, DynamicLinear)]
    assert layers and all(m.weight().qscheme() == torch.per_channel_affine for m in layers)


def test_int8_layers_are_packed_for_the_engine_asked_and_leave_the_global_engine(tiny_model_dir, monkeypatch):
    import torch
    import torch.ao.quantization as tq
    from transformers import AutoTokenizer

    from tuneloop import export

    engines = [e for e in ("x86", "onednn", "fbgemm") if e in torch.backends.quantized.supported_engines]
    if not engines:
        pytest.skip("this PyTorch build has no x86/oneDNN/fbgemm quantized engine")
    model = export.load_saved_model(str(tiny_model_dir))
    batch = AutoTokenizer.from_pretrained(str(tiny_model_dir))(["a short one", "and a somewhat longer second one"],
                                                                padding=True, return_tensors="pt")
    packed_with, real_quantize_dynamic = [], tq.quantize_dynamic

    def recording_quantize_dynamic(*args, **kwargs):
        packed_with.append(torch.backends.quantized.engine)
        return real_quantize_dynamic(*args, **kwargs)

    monkeypatch.setattr(tq, "quantize_dynamic", recording_quantize_dynamic)
    before = torch.backends.quantized.engine
    with torch.no_grad():
        fp32 = model.eval()(**batch).logits
        for engine in engines:
            quantized = export.quantize_dynamic_int8(model, engine)
            assert packed_with[-1] == engine and torch.backends.quantized.engine == before
            int8 = quantized(**batch).logits
            assert torch.allclose(int8, fp32, atol=0.05) and not torch.equal(int8, fp32)
            for other in set(engines) - {engine}:
                torch.backends.quantized.engine = other
                try:  # packed layers keep their engine's kernels whatever the global engine is
                    assert torch.equal(quantized(**batch).logits, int8)
                finally:
                    torch.backends.quantized.engine = before


def test_int8_engine_is_onednn_only_where_the_cpu_has_amx(monkeypatch):
    import torch

    from tuneloop import export

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert export.int8_engine() == ("onednn" if "onednn" in torch.backends.quantized.supported_engines
                                    else torch.backends.quantized.engine)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert export.int8_engine() == torch.backends.quantized.engine


@pytest.mark.parametrize("quantize", [None, pytest.param("int8", marks=needs_torchao)])
def test_export_loads_in_a_fresh_process_without_tuneloop(tiny_model_dir, rows, fp32, tmp_path, quantize):
    rows.head(8).to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    out = tmp_path / f"export-{quantize}"
    assert main(["export", "--model-dir", str(tiny_model_dir), "--output-dir", str(out),
                 *(["--quantize", quantize] if quantize else [])]) == 0
    config = json.loads((out / "config.json").read_text())
    assert ("quantization_config" in config) == (quantize == "int8")
    # Only transformers (+ torchao for int8): tuneloop is made unimportable in the child.
    script = ("import sys, json; sys.modules['tuneloop'] = None\n"
              "from transformers import pipeline\n"
              "rows = [json.loads(l) for l in open(sys.argv[2])]\n"
              "clf = pipeline('text-classification', model=sys.argv[1], device='cpu')\n"
              "print(json.dumps(clf([{'text': r['text'], 'text_pair': r['text_pair']} for r in rows])))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "in.jsonl")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    tol = 0.01 if quantize else 1e-5
    for g, ref in zip(got, fp32[:8]):
        score = g["score"] if g["label"] == ref["label"] else 1 - g["score"]
        assert score == pytest.approx(ref["score"], abs=tol)


@needs_torchao
def test_int8_export_is_smaller(tiny_model_dir, tmp_path):
    from tuneloop.export import folder_size

    for quantize in (None, "int8"):
        assert main(["export", "--model-dir", str(tiny_model_dir), "--output-dir", str(tmp_path / str(quantize)),
                     *(["--quantize", quantize] if quantize else [])]) == 0
    weights = {q: (tmp_path / q / "model.safetensors").stat().st_size for q in ("None", "int8")}
    assert weights["int8"] < weights["None"]
    assert folder_size(tmp_path / "int8") < folder_size(tmp_path / "None")


@pytest.mark.parametrize("argv, message", [
    (["predict", "--input", "-", "--quantize", "int4"], "--quantize: 'int4' is not supported; the one choice is int8"),
    (["export", "--output-dir", "OUT", "--quantize", "int4"], "--quantize: 'int4' is not supported"),
])
def test_unsupported_quantization_fails_in_one_line(tiny_model_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main([argv[0], "--model-dir", str(tiny_model_dir), *argv[1:]]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneloop: error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_folder(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", "--model-dir", str(tiny_model_dir), "--output-dir", str(tmp_path / "out")]) != 0
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_export_overwrite_replaces_only_an_earlier_export(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # A training run's folder: --overwrite used to delete its checkpoints and metrics.
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    (run / "checkpoints" / "step-000004" / "model.safetensors").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')
    (run / "config.yaml").write_text("model: {}\n")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert main(["export", "--model-dir", str(tiny_model_dir), "--output-dir", str(run), "--overwrite"]) != 0
    err = capsys.readouterr().err.strip()
    assert err == (f"tuneloop: error: output folder {run} is a training run (no .tuneloop-export.json): --overwrite "
                   f"replaces only an earlier export, nothing in it was touched; choose an empty --output-dir")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert (run / "checkpoints" / "step-000004" / "model.safetensors").read_bytes() == b"weights"

    # The current folder: refused, nothing removed.
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    assert main(["export", "--model-dir", str(tiny_model_dir), "--output-dir", ".", "--overwrite"]) != 0
    assert "is not an earlier export" in capsys.readouterr().err
    assert (here / "notes.txt").read_text() == "mine"

    # An earlier export is replaced.
    out = tmp_path / "exported"
    assert main(["export", "--model-dir", str(tiny_model_dir), "--output-dir", str(out)]) == 0
    assert json.loads((out / ".tuneloop-export.json").read_text())["source"] == str(tiny_model_dir)
    (out / "stale.txt").write_text("from the earlier export")
    assert main(["export", "--model-dir", str(tiny_model_dir), "--output-dir", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
