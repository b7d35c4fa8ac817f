import pytest
import torch

from tuneloop.precision import resolve_mixed_precision


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
def test_auto_on_gpu(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_mixed_precision("auto", use_cpu=False) == expected


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
