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


def _forward_backward(model, dtype=None):
    """Logits and the gradient of the first query projection for a padded batch of two."""
    x = torch.tensor([[101, 2000, 2001, 2002, 2003, 102], [101, 2004, 2005, 102, 0, 0]])
    mask = (x != 0).long()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        logits = model(input_ids=x, attention_mask=mask).logits
    logits.float().sum().backward()
    return logits.float(), model.bert.encoder.layer[0].attention.self.query.weight.grad.clone()


def test_lean_attention_computes_what_eager_computes(tiny_model_dir):
    eager = build_model(str(tiny_model_dir), ["no", "yes"], attn_implementation="eager")
    lean = build_model(str(tiny_model_dir), ["no", "yes"], attn_implementation="lean")
    assert lean.config._attn_implementation == "tuneloop_lean"
    torch.manual_seed(0)
    torch.nn.init.normal_(lean.classifier.weight)
    eager.classifier.load_state_dict(lean.classifier.state_dict())
    (le, ge), (ll, gl) = _forward_backward(eager), _forward_backward(lean)
    torch.testing.assert_close(ll, le, rtol=1e-5, atol=1e-6)  # padding is masked the same way
    torch.testing.assert_close(gl, ge, rtol=1e-4, atol=1e-7)
    assert ge.abs().sum() > 0


def _saved_bytes_in_training(model_dir, attn):
    """Bytes autograd keeps for backward in one bf16-autocast training forward (storages counted once)."""
    model = build_model(str(model_dir), ["no", "yes"], attn_implementation=attn)
    model.train()
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randint(1000, 2000, (8, 96))
    mask = torch.ones_like(x)
    mask[4:, 80:] = 0  # a padded batch, as training sees them
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=x, attention_mask=mask)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_lean_attention_keeps_less_for_backward_with_attention_dropout(tiny_dropout_model_dir):
    sdpa = _saved_bytes_in_training(tiny_dropout_model_dir, "sdpa")
    eager = _saved_bytes_in_training(tiny_dropout_model_dir, "eager")
    lean = _saved_bytes_in_training(tiny_dropout_model_dir, "lean")
    scores = 2 * 8 * 2 * 96 * 96  # layers x batch x heads x length x length
    # Per attention score, lean keeps bf16 probabilities, the bf16 dropped copy and a 1-byte mask (5 bytes);
    # SDPA's fp32 fallback keeps ~12 bytes, eager's fp32 softmax ~8.5 (measured 6.5 and 3.5 bytes more).
    assert (sdpa - lean) / scores > 6 and (eager - lean) / scores > 3, (lean, eager, sdpa)


def test_lean_attention_is_not_saved_into_the_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    lean = build_model(str(tiny_model_dir), ["no", "yes"], attn_implementation="lean")
    lean.save_pretrained(tmp_path / "saved")
    assert "tuneloop_lean" not in (tmp_path / "saved" / "config.json").read_text()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert reloaded.config._attn_implementation == "sdpa"


def test_auto_attention_is_lean_on_cpu_and_sdpa_elsewhere():
    from tuneloop.model import resolve_attention

    assert resolve_attention("auto", "cpu") == "lean"
    assert resolve_attention("auto", "cuda") == "sdpa"
    assert resolve_attention("eager", "cpu") == "eager"


def test_fast_dropout_keeps_1_minus_p_and_rescales():
    from tuneloop.model import fast_dropout

    x = torch.ones(1000, 1000)
    torch.manual_seed(0)
    y = fast_dropout(x, 0.1)
    kept = y != 0
    # 1e6 Bernoulli(0.9) draws: standard deviation of the rate is 3e-4
    assert abs(kept.float().mean().item() - 0.9) < 1.5e-3
    assert torch.allclose(y[kept], torch.tensor(1 / 0.9))
    torch.manual_seed(0)
    assert torch.equal(fast_dropout(x, 0.1), y)  # the default generator: seeded runs repeat
    assert not torch.equal(fast_dropout(x, 0.1), y)
    # neighbouring elements are independent (each 64-bit draw feeds four of them)
    pairs = kept.flatten()[: 10**6 // 4 * 4].view(-1, 4)
    assert abs((pairs[:, 0] & pairs[:, 1]).float().mean().item() - 0.81) < 3e-3


def test_use_fast_dropout_swaps_every_dropout(tiny_dropout_model_dir):
    from tuneloop.model import use_fast_dropout

    model = build_model(str(tiny_dropout_model_dir), ["no", "yes"], attn_implementation="lean")
    torch.manual_seed(0)
    before_a, _ = _two_training_forwards(model)
    # embeddings, 2 per layer, the attention probabilities of each layer, the classifier's
    assert use_fast_dropout(model) == 1 + 2 * 2 + 2 + 1
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    torch.manual_seed(0)
    a, b = _two_training_forwards(model)
    assert not torch.equal(a, b) and not torch.equal(a, before_a)  # masks now come from fast_dropout
    model.eval()
    x = torch.tensor([[101, 2000, 2001, 102]])
    assert torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)


def test_gradient_checkpointing_uses_the_method_the_installed_transformers_has(tiny_model_dir):
    import warnings

    from transformers import AutoModelForSequenceClassification

    from tuneloop.model import enable_gradient_checkpointing

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # never the deprecated alias where the new name exists
        enable_gradient_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())

    calls = []

    class Older(type(model)):  # transformers 5.x releases from before `activation_checkpointing_enable`
        activation_checkpointing_enable = property(lambda self: (_ for _ in ()).throw(AttributeError("absent")))

        def gradient_checkpointing_enable(self, **kwargs):
            calls.append(kwargs)

    older = Older.from_pretrained(tiny_model_dir)
    assert not hasattr(older, "activation_checkpointing_enable")
    enable_gradient_checkpointing(older)
    assert calls == [{"gradient_checkpointing_kwargs": {"use_reentrant": False}}]


def test_reinit_layers_changes_the_top_layers_and_the_pooler_only(tiny_model_dir):
    from tuneloop.model import reinit_top_layers

    pretrained = build_model(str(tiny_model_dir), ["no", "yes"])
    torch.manual_seed(0)
    model = build_model(str(tiny_model_dir), ["no", "yes"])
    before = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    torch.manual_seed(1)
    assert reinit_top_layers(model, 1) == 1
    for name, p in model.named_parameters():
        top = name.startswith(("bert.encoder.layer.1.", "bert.pooler."))
        if top and name.endswith("dense.weight"):  # matrices: freshly drawn from N(0, initializer_range)
            assert not torch.equal(p, before[name]), name
            assert p.std().item() == pytest.approx(model.config.initializer_range, rel=0.3)
        elif top and "LayerNorm" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        elif not top and not name.startswith("classifier."):  # the head is new anyway
            assert torch.equal(p, before[name]), name
    # Seeded: the same seed re-initialises to the same weights.
    again = build_model(str(tiny_model_dir), ["no", "yes"])
    torch.manual_seed(1)
    reinit_top_layers(again, 1)
    assert torch.equal(again.bert.encoder.layer[1].output.dense.weight, model.bert.encoder.layer[1].output.dense.weight)


def test_reinit_more_layers_than_the_model_has_is_one_clear_error(tiny_model_dir):
    from tuneloop.model import reinit_top_layers

    with pytest.raises(TuneloopError, match="model.reinit_layers: the model has 2 encoder layers, cannot re-initialise 3"):
        reinit_top_layers(build_model(str(tiny_model_dir), ["no", "yes"]), 3)


def test_frozen_bottom_layers_get_no_gradient_and_backward_stops_above_them(tiny_model_dir):
    from tuneloop.model import freeze_bottom_layers

    model = build_model(str(tiny_model_dir), ["no", "yes"])
    bottom = model.bert.encoder.layer[0]
    expected = (sum(p.numel() for p in model.bert.embeddings.parameters())
                + sum(p.numel() for p in bottom.parameters()))
    assert freeze_bottom_layers(model, 1) == expected
    # What reaches the top layer must need no gradient: then autograd does no backward below it at all.
    seen = {}
    model.bert.encoder.layer[1].register_forward_pre_hook(lambda _, args: seen.update(needs_grad=args[0].requires_grad))
    out = model(input_ids=torch.tensor([[101, 2000, 2001, 102]]), labels=torch.tensor([1]))
    out.loss.backward()
    assert seen == {"needs_grad": False}
    for name, p in model.named_parameters():
        low = name.startswith(("bert.embeddings.", "bert.encoder.layer.0."))
        assert (p.grad is None) == low, name


def test_freezing_more_layers_than_can_train_is_one_clear_error(tiny_model_dir):
    from tuneloop.model import apply_layer_options

    with pytest.raises(TuneloopError, match="optim.freeze_layers: the model has 2 encoder layers, cannot freeze 3$"):
        apply_layer_options(build_model(str(tiny_model_dir), ["no", "yes"]), 0, "train", freeze_layers=3)
    with pytest.raises(TuneloopError, match="cannot freeze 2 with 1 re-initialised on top"):
        apply_layer_options(build_model(str(tiny_model_dir), ["no", "yes"]), 1, "train", freeze_layers=2)


def test_layer_depths_of_bert_names():
    from tuneloop.model import layer_depth

    stack = "bert.encoder.layer"
    assert layer_depth("bert.embeddings.word_embeddings.weight", stack, 6) == 0
    assert layer_depth("bert.encoder.layer.0.attention.self.query.weight", stack, 6) == 1
    assert layer_depth("bert.encoder.layer.5.output.dense.bias", stack, 6) == 6
    assert layer_depth("bert.pooler.dense.weight", stack, 6) == 7
    assert layer_depth("classifier.weight", stack, 6) == 7


def test_max_length_above_the_position_embeddings_is_capped_before_training(tiny_model_dir, tmp_path, capsys):
    """Before: --max-length 256 on a model with 128 positions crashed at the first batch
    (IndexError on a CPU, a device-side assert on a GPU)."""
    from tuneloop.cli import main

    long = " ".join(f"word{i}" for i in range(300))
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"{long} {i},{i % 2}\n" for i in range(8)))
    code = main(["train", "--model", str(tiny_model_dir), "--train-file", str(tmp_path / "t.csv"),
                 "--validation-file", str(tmp_path / "t.csv"), "--max-length", "256", "--epochs", "1",
                 "--output-dir", str(tmp_path / "out"), "--mixed-precision", "no", "--report-to", "none"])
    err = capsys.readouterr().err
    assert code == 0, err
    warning = "data.max_length 256 is above the 128 positions of model"
    assert err.count(warning) == 1 and "truncated at 128 instead" in err
    assert "max_length: 128" in (tmp_path / "out" / "config.yaml").read_text()


def test_position_limit_of_roberta_counts_the_padding_offset():
    from transformers import BertConfig, RobertaConfig

    from tuneloop.model import position_limit

    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
