import logging

import pytest
import torch

from tuneloop.config import Config, ConfigError
from tuneloop.precision import reconcile_mixed_precision, resolve_mixed_precision


def test_explicit_precision_is_kept():
    for value in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(value) == value


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                         (False, False, "no")])
def test_auto_on_cpu_uses_bf16_only_where_it_is_fast(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_mixed_precision("auto", use_cpu=True) == expected


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_gpu_for_large_models(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_mixed_precision("auto", use_cpu=False, hidden_size=768) == expected
    assert resolve_mixed_precision("auto", use_cpu=False, hidden_size=4096) == expected


def test_auto_on_gpu_keeps_small_models_in_fp32_with_tf32_matmuls(monkeypatch, tiny_model_dir):
    from tuneloop.precision import GPU_BF16_MIN_HIDDEN, model_hidden_size

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert GPU_BF16_MIN_HIDDEN == 768  # H200: MiniLM (384) faster in fp32, BERT-base (768) in bf16
    assert resolve_mixed_precision("auto", use_cpu=False, hidden_size=384) == "tf32"
    assert resolve_mixed_precision("auto", use_cpu=False, hidden_size=767) == "tf32"
    assert model_hidden_size(None) == 384  # the bundled MiniLM
    assert resolve_mixed_precision("auto", use_cpu=False, model=None) == "tf32"
    assert resolve_mixed_precision("auto", use_cpu=False, model=str(tiny_model_dir)) == "tf32"  # hidden 32
    # A model whose config cannot be read: the device alone decides.
    assert model_hidden_size("/nonexistent/model") is None
    assert resolve_mixed_precision("auto", use_cpu=False, model="/nonexistent/model") == "bf16"
    # The model's size never changes the CPU rule.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto", use_cpu=True, hidden_size=32) == "bf16"


def test_tf32_is_fp32_for_accelerate_and_switches_tf32_matmuls_on_only_on_gpus():
    from tuneloop.precision import accelerate_precision, apply_tf32

    assert [accelerate_precision(p) for p in ("tf32", "no", "bf16", "fp16")] == ["no", "no", "bf16", "fp16"]
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        apply_tf32("tf32", "cpu")
        apply_tf32("bf16", "cuda")
        assert torch.backends.cuda.matmul.allow_tf32 is False
        apply_tf32("tf32", "cuda")
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:  # a process-wide switch (torch's own attributes, which monkeypatch cannot restore on every release)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_compiled_and_eager_models_give_the_same_loss():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=32, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0)).eval()
    batch = dict(input_ids=torch.randint(5, 64, (4, 8)), attention_mask=torch.ones(4, 8, dtype=torch.long),
                 labels=torch.tensor([0, 1, 1, 0]))
    with torch.no_grad():
        eager = model(**batch).loss
        compiled = torch.compile(model)(**batch).loss
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.fixture
def accelerate_settings(monkeypatch):
    """No Accelerate setting of this machine leaks in; tuneloop's warnings reach caplog."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr("tuneloop.precision.default_accelerate_config", lambda: None)
    monkeypatch.setattr(logging.getLogger("tuneloop"), "propagate", True)  # the CLI sets False


def test_config_precision_wins_and_a_disagreeing_accelerate_setting_is_named(accelerate_settings, monkeypatch, tmp_path,
                                                                              caplog):
    c = Config()
    c.train.mixed_precision = "bf16"
    with caplog.at_level(logging.WARNING):
        assert reconcile_mixed_precision(c) == "bf16"
        assert not caplog.records
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        assert reconcile_mixed_precision(c) == "bf16" and not caplog.records
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        assert reconcile_mixed_precision(c) == "bf16"
    assert len(caplog.records) == 1
    assert "ACCELERATE_MIXED_PRECISION" in caplog.text and "'fp16'" in caplog.text and "'bf16'" in caplog.text
    caplog.clear()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    file = tmp_path / "accelerate.yaml"
    file.write_text("compute_environment: LOCAL_MACHINE\nmixed_precision: fp16\nnum_processes: 2\n")
    c.launch.accelerate_config = str(file)
    with caplog.at_level(logging.WARNING):
        assert reconcile_mixed_precision(c) == "bf16"
    assert f"accelerate config {file} says 'fp16' but train.mixed_precision is 'bf16'; using 'bf16'" in caplog.text
    c.launch.accelerate_config = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="launch.accelerate_config: file not found"):
        reconcile_mixed_precision(c)


def test_the_default_accelerate_config_file_is_checked(accelerate_settings, monkeypatch, tmp_path, caplog):
    file = tmp_path / "default_config.yaml"
    file.write_text("mixed_precision: bf16\n")
    monkeypatch.setattr("tuneloop.precision.default_accelerate_config", lambda: file)
    config = Config()
    config.train.mixed_precision = "no"
    with caplog.at_level(logging.WARNING):
        assert reconcile_mixed_precision(config) == "no"
    assert "says 'bf16' but train.mixed_precision is 'no'" in caplog.text


def test_auto_is_resolved_before_it_is_compared(accelerate_settings, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    c = Config()
    c.train.mixed_precision = "auto"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    with caplog.at_level(logging.WARNING):
        assert reconcile_mixed_precision(c) == "no" and not caplog.records
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        assert reconcile_mixed_precision(c) == "no"
    assert "says 'bf16' but train.mixed_precision is 'auto' (no here); using 'no'" in caplog.text
