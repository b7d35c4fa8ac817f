"""Long documents: head-tail, windows with stride, per-document aggregation (once per document, 2 processes too)."""

import json
import sys

import numpy as np
import pytest

from conftest import REPO
from tuneloop.chunking import aggregate, encode
from tuneloop.cli import main

FILLER = "the weather report said nothing new about the town today ."


def long_docs(path, n, seed=0):
    """n documents of 3-12 filler sentences; the label word sits in the last sentence."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ["LABEL_0", "LABEL_1"][i % 2]
        word = "terrible" if label == "LABEL_0" else "wonderful"
        rows.append({"text": " ".join([FILLER] * int(rng.integers(3, 13)) + [f"it was {word} ."]), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_windows_overlap_by_the_stride_and_map_to_their_document(tokenizer):
    texts = [" ".join(f"w{i}" for i in range(60)), "short text"]
    enc, docs = encode(tokenizer, texts, None, "chunk", 32, 8)
    whole = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    windows = [ids[1:-1] for ids, d in zip(enc["input_ids"], docs) if d == 0]  # without [CLS] ... [SEP]
    assert docs.count(1) == 1 and len(windows) > 2 and all(len(ids) <= 32 for ids in enc["input_ids"])
    for a, b in zip(windows, windows[1:]):
        assert a[-8:] == b[:8]  # neighbours share `stride` tokens
    assert windows[0] + [t for w in windows[1:] for t in w[8:]] == whole  # together they hold the whole text


def test_head_tail_keeps_both_ends(tokenizer):
    text = " ".join(f"w{i}" for i in range(200))
    (ids,) = encode(tokenizer, [text], None, "head-tail", 34, 0)[0]["input_ids"]
    whole = tokenizer(text)["input_ids"]
    assert len(ids) == 34 and ids[:9] == whole[:9] and ids[9:] == whole[-25:]  # [CLS] + 8 head, 24 tail + [SEP]


def test_aggregation_mean_and_max():
    logits = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0], [-1.0, 1.0]])
    docs = np.array([1, 0, 1, 1])
    ids, mean = aggregate(logits, docs, "mean")
    assert ids.tolist() == [0, 1] and mean.tolist() == [[3.0, 2.0], [0.0, 2.0]]
    assert aggregate(logits, docs, "max")[1].tolist() == [[3.0, 2.0], [1.0, 5.0]]


def test_chunked_run_trains_on_windows_and_counts_each_document_once(tiny_model_dir, tmp_path, capsys):
    train, dev = long_docs(tmp_path / "train.jsonl", 24), long_docs(tmp_path / "dev.jsonl", 13, seed=1)
    out = tmp_path / "run"
    assert main(["train", "--task", "null", "--model", str(tiny_model_dir), "--train-file", str(train),
                 "--validation-file", str(dev), "--output-dir", str(out), "--long-text", "chunk", "--max-length", "32",
                 "--stride", "8", "--epochs", "1", "--mixed-precision", "no", "--report-to", "none"]) == 0
    capsys.readouterr()
    results = json.loads((out / "eval_results.json").read_text())
    summary = json.loads((out / "run_summary.json").read_text())
    assert results["num_examples"] == 13
    assert summary["data"]["train"]["examples"] == 24 and summary["data"]["train"]["windows"] > 24 * 2
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()[1:]]
    assert sorted(r["index"] for r in rows) == list(range(13))
    assert results["accuracy"] == pytest.approx(np.mean([r["label"] == r["prediction"] for r in rows]))
    # `tuneloop predict` windows and aggregates like the evaluation did (settings stored in config.json).
    assert main(["predict", "--model-dir", str(out / "model"), "--input", str(dev), "--output", str(tmp_path / "p.jsonl")]) == 0
    predicted = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    by_index = {r["index"]: r for r in rows}
    assert [p["label"] for p in predicted] == [by_index[i]["prediction"] for i in range(13)]
    assert [p["score"] for p in predicted] == pytest.approx([by_index[i]["confidence"] for i in range(13)], abs=1e-4)
    assert main(["data", "--task", "null", "--model", str(tiny_model_dir), "--train-file", str(train),
                 "--long-text", "chunk", "--max-length", "32", "--stride", "8"]) == 0
    assert "windows of at most 32 tokens for 24 documents" in capsys.readouterr().out


def test_two_processes_count_every_document_once(tiny_model_dir, tmp_path):
    import os
    import subprocess

    dev = long_docs(tmp_path / "dev.jsonl", 13, seed=2)
    args = ["eval", "--model-dir", str(tiny_model_dir), "--task", "null", "--validation-file", str(dev),
            "--long-text", "chunk", "--max-length", "32", "--stride", "8", "--eval-batch-size", "5",
            "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tuneloop", *args, "--output-dir", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert two["num_examples"] == one["num_examples"] == 13
    assert two["accuracy"] == one["accuracy"] and two["f1"] == one["f1"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--long-text", "chunk", "--max-length", "48", "--stride", "48"], "data.stride: must be in 0..max_length - 1 (47)"),
    (["--long-text", "chunk", "--max-length", "48", "--stride", "47"], "data.stride: must be below max_length minus"),
    (["--long-text", "head-tail"], "data.long_text head-tail: keeps the head and tail of one text; for pairs"),
])
def test_bad_long_text_settings_are_one_line(tiny_model_dir, mrpc_slice, tmp_path, capsys, flags, message):
    from conftest import tiny_args

    code = main(tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "bad", *flags))
    err = capsys.readouterr().err
    assert code != 0 and err.startswith(f"tuneloop: error: {message}") and len(err.strip().splitlines()) == 1
