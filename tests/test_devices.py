"""Per-device resolution of `auto` settings, and what a run records of them."""

from __future__ import annotations

import pytest
import torch
import yaml

import tuneloop
from tuneloop.config import Config, load_config
from tuneloop.devices import device_kind, resolve_for_device


def _cpu(monkeypatch, fast_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.parametrize("device, fast_bf16, kind, expected", [
    # (mixed_precision, gradient_checkpointing, attn_implementation, dropout_masks)
    ("cuda", True, "gpu", ("tf32", False, "sdpa", "torch")),  # the bundled MiniLM: hidden 384
    ("cpu", True, "cpu-bf16", ("bf16", True, "lean", "fast")),
    ("cpu", False, "cpu", ("no", False, "lean", "fast")),
])
def test_the_fast_recipe_resolves_per_device(monkeypatch, device, fast_bf16, kind, expected):
    _cpu(monkeypatch, fast_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    config = load_config("fast")
    assert (config.train.gradient_checkpointing, config.model.dropout_masks) == ("auto", "auto")
    assert device_kind(device) == kind
    r = resolve_for_device(config, device)
    assert (r.train.mixed_precision, r.train.gradient_checkpointing, r.model.attn_implementation,
            r.model.dropout_masks) == expected
    assert config.train.gradient_checkpointing == "auto"  # the given config is left as it was
    # Everything else is the recipe's, on every device.
    assert (r.train.batch_size, r.optim.learning_rate, r.model.attention_dropout, r.data.pad_to_multiple_of) == \
        (32, 1e-4, 0.0, 16)


@pytest.mark.parametrize("precision, checkpointing", [("auto", True), ("bf16", True), ("no", False)])
def test_a_bf16_cpu_forced_to_fp32_does_not_checkpoint(monkeypatch, precision, checkpointing):
    # Recomputing an fp32 step only costs: such a run gets the no-bf16 CPU's value.
    _cpu(monkeypatch, True)
    r = resolve_for_device(load_config("fast", {"mixed_precision": precision}), "cpu")
    assert r.train.gradient_checkpointing is checkpointing


@pytest.mark.parametrize("device, fast_bf16, expected", [
    ("cuda", True, ("sdpa", "torch")),  # as before on GPUs
    ("cpu", True, ("lean", "fast")),
    ("cpu", False, ("lean", "fast")),
])
def test_the_defaults_resolve_the_step_per_device_too(monkeypatch, device, fast_bf16, expected):
    # Attention kernel and mask generator change no hyperparameter: every run gets the device's, not only --config fast.
    _cpu(monkeypatch, fast_bf16)
    config = load_config(None, {})
    assert (config.model.attn_implementation, config.model.dropout_masks) == ("auto", "auto")
    r = resolve_for_device(config, device)
    assert (r.model.attn_implementation, r.model.dropout_masks) == expected
    # ... and nothing that is a hyperparameter moves.
    assert (r.train.batch_size, r.optim.learning_rate, r.model.attention_dropout, r.train.gradient_checkpointing) == \
        (8, 5e-5, None, False)


def test_a_large_model_gets_bf16_on_gpus(monkeypatch, tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    c = load_config("fast", {"model": str(tmp_path)})
    assert resolve_for_device(c, "cuda").train.mixed_precision == "bf16"


def test_explicit_values_are_kept_on_every_device(monkeypatch):
    _cpu(monkeypatch, False)
    c = load_config("fast", {"train.gradient_checkpointing": "true", "mixed_precision": "bf16",
                             "attn_implementation": "eager", "dropout_masks": "torch"})
    for device in ("cuda", "cpu"):
        r = resolve_for_device(c, device)
        assert (r.train.mixed_precision, r.train.gradient_checkpointing, r.model.attn_implementation,
                r.model.dropout_masks) == ("bf16", True, "eager", "torch")


def test_gradient_checkpointing_flag_takes_auto_or_a_bool():
    from tuneloop.cli import build_parser, parse_config

    parse = lambda *a: parse_config(build_parser().parse_args(["train", *a]))  # noqa: E731
    assert parse("--gradient-checkpointing").train.gradient_checkpointing is True
    assert parse("--gradient-checkpointing", "auto").train.gradient_checkpointing == "auto"
    assert parse("--gradient-checkpointing", "false").train.gradient_checkpointing is False
    with pytest.raises(tuneloop.ConfigError, match="train.gradient_checkpointing"):
        parse("--gradient-checkpointing", "sometimes")


def test_the_run_records_the_resolved_values(monkeypatch, tiny_model_dir, mrpc_slice, tmp_path):
    _cpu(monkeypatch, False)  # this machine's kind does not matter: an AVX2-only CPU is mocked
    c = load_config("fast", {"model": str(tiny_model_dir), "data_dir": str(mrpc_slice), "output_dir": str(tmp_path / "run"),
                             "epochs": "1", "max_train_samples": "64", "max_eval_samples": "8"})
    tuneloop.train(c)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["train"]["mixed_precision"], saved["train"]["gradient_checkpointing"],
            saved["model"]["attn_implementation"], saved["model"]["dropout_masks"]) == ("no", False, "lean", "fast")
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["train"]["gradient_checkpointing"] is False


def test_a_setting_the_device_cannot_honour_says_so(monkeypatch, tuneloop_log):
    caplog = tuneloop_log
    _cpu(monkeypatch, False)
    c = load_config(None, {"mixed_precision": "tf32", "dropout_masks": "fast"})
    r = resolve_for_device(c, "cpu")
    assert r.train.mixed_precision == "tf32" and "tf32 uses a GPU's TF32 matmuls; on this cpu device" in caplog.text
    caplog.clear()
    resolve_for_device(c, "cuda")
    assert "model.dropout_masks fast applies on CPUs; on this cuda device" in caplog.text
    caplog.clear()
    resolve_for_device(load_config("fast"), "cpu")  # every auto resolves to what this device honours
    assert caplog.text == ""
