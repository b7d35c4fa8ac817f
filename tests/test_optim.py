import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from tuneloop.config import OptimConfig
from tuneloop.errors import ConfigError
from tuneloop.optim import build_optimizer, build_scheduler, num_training_steps, num_warmup_steps, param_groups


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


@pytest.mark.parametrize("ratio, total, expected", [
    (0.1, 1, 0),  # 32 examples at batch 32: one step, so no warmup (was: an error)
    (0.1, 2, 1),
    (0.1, 10, 1),
    (0.1, 11, 2),  # rounded up, as before
    (0.9, 5, 4),  # capped one below the run: the last step still trains at a decayed lr
    (0.0, 1, 0),
])
def test_a_warmup_ratio_never_makes_a_run_invalid(ratio, total, expected):
    assert num_warmup_steps(OptimConfig(warmup_ratio=ratio), total) == expected


def test_a_ratio_warmup_on_a_one_step_run_trains_that_step_at_the_peak_lr():
    model = _model()
    cfg = OptimConfig(learning_rate=1e-3, warmup_ratio=0.1)
    opt = build_optimizer(model, cfg)
    build_scheduler(opt, cfg, total_steps=1)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # no warmup step at lr 0


def test_explicit_warmup_steps_are_kept_and_still_checked():
    assert num_warmup_steps(OptimConfig(warmup_steps=3, warmup_ratio=0.5), 10) == 3  # steps override the ratio
    with pytest.raises(ConfigError, match=r"optim.warmup_steps: warmup \(1 steps\) is not shorter than training "
                                          r"\(1 optimizer steps\)"):
        num_warmup_steps(OptimConfig(warmup_steps=1), 1)


def _first_step_moves(model, cfg):
    """Adam's first step moves every weight by lr (m / sqrt(v) = sign of the gradient): the lr each group uses."""
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5)
    opt.step()
    return {n: (p.detach() - before[n]).abs().mean().item() for n, p in model.named_parameters() if n in before}


def test_head_learning_rate_is_what_the_optimizer_uses():
    moves = _first_step_moves(_model(), OptimConfig(learning_rate=1e-3, head_learning_rate=1e-2, weight_decay=0.0))
    for name, move in moves.items():
        assert move == pytest.approx(1e-2 if name.startswith("classifier.") else 1e-3, rel=1e-3), name
    # The schedule scales each group from its own peak: the head stays 10x the body through warmup.
    model = _model()
    cfg = OptimConfig(learning_rate=1e-3, head_learning_rate=1e-2, warmup_steps=4)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    opt.step()
    sched.step()
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.25e-3, 0.25e-2])
    assert sched.get_last_lr()[0] == pytest.approx(0.25e-3)  # the logged lr is the body's


def test_loraplus_ratio_speeds_up_b_matrices_only():
    from tuneloop.adapters import prepare_model
    from tuneloop.config import PeftConfig

    model = prepare_model(_model(), PeftConfig(method="lora", lora_rank=2), num_training_steps=10)
    moves = _first_step_moves(model, OptimConfig(learning_rate=1e-3, loraplus_lr_ratio=16, weight_decay=0.0))
    assert any(".lora_B." in n for n in moves) and any(".lora_A." in n for n in moves)
    for name, move in moves.items():
        assert move == pytest.approx(16e-3 if ".lora_B." in name else 1e-3, rel=1e-3), name
    assert not any("embeddings" in n or "LayerNorm" in n for n in moves)  # frozen: not in any group


def test_adamw_8bit_trains_or_names_what_is_missing(monkeypatch):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs bitsandbytes, which is not installed"):
            build_optimizer(_model(), OptimConfig(name="adamw_8bit"))
        return
    def train(name):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=128))
        opt = build_optimizer(model, OptimConfig(name=name, learning_rate=1e-3))
        ids, labels = torch.randint(0, 50, (8, 12)), torch.randint(0, 2, (8,))
        losses = []
        for _ in range(15):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return model, opt, losses

    model, opt, losses = train("adamw_8bit")
    assert type(opt).__name__ == "AdamW8bit"
    _, _, reference = train("adamw")
    assert losses[-1] < 0.6 * losses[0]
    assert losses[-1] == pytest.approx(reference[-1], abs=0.1)  # follows 32-bit AdamW's trajectory
    # Large matrices keep their Adam moments in 8 bits (small ones stay 32-bit, as bitsandbytes decides).
    state = opt.state[model.bert.encoder.layer[0].intermediate.dense.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    # Without bitsandbytes: one line naming the package and how to install it.
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed: pip install"):
        build_optimizer(_model(), OptimConfig(name="adamw_8bit"))


def test_adamw_8bit_on_a_device_without_kernels_fails_in_one_line(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")

    def no_kernel(self, *args, **kwargs):
        raise RuntimeError("no kernel registered for device\nsecond line")

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", no_kernel)
    with pytest.raises(ConfigError, match=r"has no 8-bit AdamW for device cpu \(no kernel registered for device\); "
                                          r"use --optimizer adamw$"):
        build_optimizer(_model(), OptimConfig(name="adamw_8bit"))


def _three_layer_model():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=16))


def test_layer_decay_scales_each_layer_by_decay_to_its_depth_from_the_top():
    model = _three_layer_model()
    moves = _first_step_moves(model, OptimConfig(learning_rate=1e-3, layer_decay=0.5, weight_decay=0.0))
    for name, move in moves.items():
        if name.startswith("bert.embeddings."):
            expected = 1e-3 * 0.5 ** 4  # below layer 1 of 3
        elif name.startswith("bert.encoder.layer."):
            expected = 1e-3 * 0.5 ** (3 - int(name.split(".")[3]))  # layer index 0..2: decay^3..decay^1
        else:
            assert name.startswith(("bert.pooler.", "classifier.")), name
            expected = 1e-3
        assert move == pytest.approx(expected, rel=1e-3), name
    groups = build_optimizer(model, OptimConfig(learning_rate=1e-3, layer_decay=0.5)).param_groups
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.01  # the logged group: full lr, decayed
    assert sorted({g["lr"] for g in groups}) == pytest.approx([1e-3 * 0.5 ** k for k in (4, 3, 2, 1, 0)])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # every parameter, once


def test_layer_decay_composes_with_the_head_learning_rate():
    moves = _first_step_moves(_three_layer_model(), OptimConfig(learning_rate=1e-3, layer_decay=0.8,
                                                                head_learning_rate=1e-2, weight_decay=0.0))
    assert moves["classifier.weight"] == pytest.approx(1e-2, rel=1e-3)
    assert moves["bert.encoder.layer.0.output.dense.weight"] == pytest.approx(1e-3 * 0.8 ** 3, rel=1e-3)


def test_layer_decay_of_one_is_no_decay():
    groups = build_optimizer(_three_layer_model(), OptimConfig(layer_decay=1.0)).param_groups
    assert {g["lr"] for g in groups} == {5e-5}


def test_frozen_word_embeddings_are_in_no_group_and_get_no_state():
    from tuneloop.model import freeze_word_embeddings

    model = _three_layer_model()
    assert freeze_word_embeddings(model) == 50 * 8
    word = model.bert.embeddings.word_embeddings.weight
    opt = build_optimizer(model, OptimConfig())
    assert all(p is not word for g in opt.param_groups for p in g["params"])
    assert model.bert.embeddings.position_embeddings.weight.requires_grad  # only the word embeddings freeze
