"""Model loading: label names and the attention-dropout override."""

import json
import shutil
from unittest import mock

import pytest
import torch

from tuneloop.errors import TuneloopError
from tuneloop.model import build_model


@pytest.fixture
def attention_dropout_only_dir(tiny_model_dir, tmp_path):
    """The tiny BERT with dropout on attention probabilities (0.5) and none elsewhere."""
    path = tmp_path / "attn-dropout"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _two_training_forwards(model):
    model.train()
    x = torch.tensor([[101, 2000, 2001, 2002, 2003, 102]])
    return model(input_ids=x).logits, model(input_ids=x).logits


def test_attention_dropout_override(attention_dropout_only_dir):
    kept = build_model(str(attention_dropout_only_dir), ["no", "yes"])
    assert kept.config.attention_probs_dropout_prob == 0.5 and kept.config.id2label == {0: "no", 1: "yes"}
    a, b = _two_training_forwards(kept)
    assert not torch.equal(a, b)  # the checkpoint's attention dropout is active in training mode

    off = build_model(str(attention_dropout_only_dir), ["no", "yes"], attention_dropout=0.0)
    assert off.config.attention_probs_dropout_prob == 0.0 and off.config.hidden_dropout_prob == 0.0
    a, b = _two_training_forwards(off)
    assert torch.equal(a, b)


def test_attention_dropout_on_a_model_without_one(tiny_model_dir):
    with mock.patch("tuneloop.model.ATTENTION_DROPOUT_NAMES", ("no_such_setting",)):
        with pytest.raises(TuneloopError, match="BertConfig has no attention dropout setting .*leave it null"):
            build_model(str(tiny_model_dir), ["a", "b"], attention_dropout=0.0)
