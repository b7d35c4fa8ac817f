"""Shared fixtures: a tiny random-init BERT with the bundled tokenizer, GLUE paths, small data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never wait on an unreachable Hub, never write caches beside ../shared.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GLUE = (REPO.parent / "shared" / "data" / "glue").resolve()
MRPC = GLUE / "MRPC"
SST2 = GLUE / "SST-2"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path_factory.getbasetemp() / "tuneloop-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT with random weights, saved with the bundled MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tuneloop.model import default_model_path

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(1234)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT with dropout 0.1, so that exactness checks also cover the dropout RNG."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("tiny-bert-dropout")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def mrpc_slice(tmp_path) -> Path:
    """A glue_data-style MRPC folder with the real files' first lines (BOM, header, quotes intact)."""
    return write_mrpc_head(tmp_path / "MRPC")


def write_mrpc_head(out: Path, lines: tuple[int, int, int] = (65, 41, 21)) -> Path:
    """The first lines (header included) of the real train/dev/test TSVs, bytes unchanged, in a new folder."""
    out.mkdir()
    for name, count in zip(("train.tsv", "dev.tsv", "test.tsv"), lines):
        with open(MRPC / name, "rb") as src:
            (out / name).write_bytes(b"".join(src.readline() for _ in range(count)))
    return out


def mrpc_dev_pairs(nrows: int):
    """The first `nrows` pairs of the real MRPC dev file as a predict-style frame (text, text_pair)."""
    import pandas as pd

    df = pd.read_csv(MRPC / "dev.tsv", sep="\t", quoting=3, encoding="utf-8-sig", nrows=nrows)
    return pd.DataFrame({"text": df["#1 String"], "text_pair": df["#2 String"]})


def tiny_args(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data-dir", str(data_dir), "--output-dir", str(out),
            "--epochs", "1", "--batch-size", "8", "--learning-rate", "1e-3", "--log-every", "2", "--mixed-precision", "no",
            *extra]


def small_config(model_dir: Path, data_dir: Path, out: Path, checkpoint_every_epoch: bool = True, **train):
    """A Config for the loop tests: max length 48, lr 1e-3, one epoch of batch 4, a log line every 5 steps."""
    from tuneloop.config import Config

    c = Config()
    c.model.name_or_path = str(model_dir)
    c.data.data_dir = str(data_dir)
    c.data.max_length = 48
    c.output.output_dir = str(out)
    c.optim.learning_rate = 1e-3
    c.train.epochs, c.train.batch_size, c.train.log_every = 1, 4, 5
    c.checkpoint.checkpoint_every_epoch = checkpoint_every_epoch
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def load_weights(path) -> dict:
    """A safetensors file's tensors under the names the model uses. transformers 5.0.0's save_pretrained writes
    LayerNorm parameters under their legacy names (gamma, beta) and loads them back as weight, bias."""
    from safetensors.torch import load_file

    legacy = {"gamma": "weight", "beta": "bias"}
    out = {}
    for key, value in load_file(str(path)).items():
        head, _, last = key.rpartition(".")
        out[f"{head}.{legacy[last]}" if "LayerNorm" in head and last in legacy else key] = value
    return out


@pytest.fixture
def tuneloop_log(caplog, monkeypatch):
    """caplog for tuneloop's warnings, which `cli.main` keeps from propagating to the root logger."""
    import logging

    monkeypatch.setattr(logging.getLogger("tuneloop"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="tuneloop")
    return caplog


# Hypothesis profiles for tests/test_fuzz.py: `ci` (the default) runs ~2,000 examples in about two minutes;
# HYPOTHESIS_PROFILE=quick for a smoke run, =thorough for ten times as many.
FUZZ_SCALE = {"ci": 1.0, "quick": 0.05, "thorough": 10.0}
FUZZ_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
try:
    from hypothesis import settings as _hypothesis_settings

    # `ci` draws the same examples every run, so a landing never hangs on a new draw; `thorough` (and `quick`)
    # draw new ones each time, to go looking for what the fixed set misses.
    for _name in FUZZ_SCALE:
        _hypothesis_settings.register_profile(_name, deadline=None, print_blob=True, derandomize=_name == "ci")
    _hypothesis_settings.load_profile(FUZZ_PROFILE if FUZZ_PROFILE in FUZZ_SCALE else "ci")
except ImportError:  # only test_fuzz.py needs it
    pass


def fuzz_examples(ci_count: int) -> int:
    return max(1, int(ci_count * FUZZ_SCALE.get(FUZZ_PROFILE, 1.0)))
