import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from tuneloop.config import OptimConfig
from tuneloop.errors import ConfigError
from tuneloop.optim import build_optimizer, build_scheduler, num_training_steps, param_groups


def _model():
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16))


def test_no_decay_on_biases_and_layernorm():
    model = _model()
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"bert.embeddings.LayerNorm.weight", "classifier.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_weight_decay_is_decoupled():
    """AdamW shrinks a weight with zero gradient by lr * wd * w, independent of the adaptive term."""
    model = _model()
    opt = build_optimizer(model, OptimConfig(learning_rate=0.1, weight_decay=0.5))
    w = model.classifier.weight
    before = w.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.1 * 0.5))


def test_steps_from_dataloader_epochs_and_accumulation():
    assert num_training_steps(459, 3, 1) == 1377
    assert num_training_steps(459, 3, 4) == 3 * 115  # the short last window still steps


def test_linear_schedule_warms_up_and_ends_at_zero():
    model = _model()
    cfg = OptimConfig(learning_rate=1e-3, warmup_ratio=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=100)
    lrs = []
    for _ in range(100):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == 0.0


def test_warmup_longer_than_training_is_refused():
    with pytest.raises(ConfigError, match="warmup .* is not shorter than training"):
        build_scheduler(build_optimizer(_model(), OptimConfig()), OptimConfig(warmup_steps=50), total_steps=50)
