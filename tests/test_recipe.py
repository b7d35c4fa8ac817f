"""End-to-end runs of the Python API with a tiny model: determinism, accumulation, outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

import tuneloop
from tuneloop.config import Config


def _config(model_dir, data_dir, out, **train):
    c = Config()
    c.model.name_or_path = str(model_dir)
    c.data.data_dir = str(data_dir)
    c.data.max_train_samples = 20
    c.data.max_length = 48
    c.output.output_dir = str(out)
    c.optim.learning_rate = 1e-3
    c.train.epochs = 2
    c.train.log_every = 1
    c.train.mixed_precision = "no"  # fp32: the equivalence checks below are about the loop, not bf16 rounding
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _weights(out):
    """The saved weights by their current names: transformers 5.0.0 (the lowest supported) writes a BERT's
    LayerNorm weight and bias under their legacy names, gamma and beta, and maps them back when loading."""
    legacy = {".gamma": ".weight", ".beta": ".bias"}
    weights = load_file(str(out / "model" / "model.safetensors"))
    return {next((k[: -len(old)] + new for old, new in legacy.items() if k.endswith(old)), k): v
            for k, v in weights.items()}


def test_same_seed_same_weights_and_metrics(tiny_model_dir, mrpc_slice, tmp_path):
    a = tuneloop.train(_config(tiny_model_dir, mrpc_slice, tmp_path / "a"))
    b = tuneloop.train(_config(tiny_model_dir, mrpc_slice, tmp_path / "b"))
    assert a == b and set(a) >= {"accuracy", "f1", "loss"}
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    tuneloop.train(_config(tiny_model_dir, mrpc_slice, tmp_path / "c", seed=1))
    assert not torch.equal(_weights(tmp_path / "c")["classifier.weight"], wa["classifier.weight"])


def test_accumulation_equals_the_larger_batch_including_a_short_last_window(tiny_model_dir, mrpc_slice, tmp_path):
    # 20 examples: one batch of 8 per step -> windows 8, 8, 4; micro-batches of 2 x 4 steps -> the same
    # windows, the last one holding only 2 micro-batches.
    big = tuneloop.train(_config(tiny_model_dir, mrpc_slice, tmp_path / "big", batch_size=8))
    small = tuneloop.train(_config(tiny_model_dir, mrpc_slice, tmp_path / "small", batch_size=2,
                                   gradient_accumulation_steps=4))
    wb, ws = _weights(tmp_path / "big"), _weights(tmp_path / "small")
    for k in wb:
        torch.testing.assert_close(ws[k], wb[k], rtol=1e-4, atol=1e-5)
    assert small["accuracy"] == big["accuracy"]
    steps = [json.loads(l)["step"] for l in open(tmp_path / "small" / "metrics.jsonl") if '"train"' in l]
    assert steps == list(range(1, 7))  # 3 optimizer steps per epoch, never an extra one


def test_outputs_of_a_run(tiny_model_dir, mrpc_slice, tmp_path):
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, mrpc_slice, out)
    cfg.eval.eval_every = 2
    results = tuneloop.train(cfg)
    assert sorted(p.name for p in out.iterdir()) == [".tuneloop.lock", "checkpoints", "config.yaml", "eval_results.json", "learning_curves.png",
                                                     "metrics.jsonl", "model", "predictions.jsonl", "run_summary.json",
                                                     "tensorboard"]
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [2, 3, 4, 6]  # every 2 steps and at each epoch end, never twice
    assert train[-1]["lr"] == 0.0 and all(r["samples_per_second"] > 0 for r in train)
    final = json.loads((out / "eval_results.json").read_text())
    assert final["accuracy"] == results["accuracy"] == evals[-1]["accuracy"] and final["step"] == 6
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "not_equivalent", "1": "equivalent"}


def test_refuses_to_overwrite_a_finished_run(tiny_model_dir, mrpc_slice, tmp_path):
    out = tmp_path / "run"
    tuneloop.train(_config(tiny_model_dir, mrpc_slice, out, epochs=1))
    before = (out / "eval_results.json").read_text()
    with pytest.raises(tuneloop.TuneloopError, match="already holds a run .* pass --overwrite"):
        tuneloop.train(_config(tiny_model_dir, mrpc_slice, out, epochs=1))
    assert (out / "eval_results.json").read_text() == before


@pytest.mark.parametrize("masks", ["torch", "fast"])
def test_gradient_checkpointing_recomputes_and_trains_the_same_weights(tiny_dropout_model_dir, mrpc_slice, tmp_path,
                                                                        masks):
    from unittest import mock

    import torch.utils.checkpoint

    def config(out, **train):
        c = _config(tiny_dropout_model_dir, mrpc_slice, out, **train)
        c.model.dropout_masks = masks
        return c

    plain = tuneloop.train(config(tmp_path / "plain"))
    real = torch.utils.checkpoint.checkpoint
    with mock.patch("transformers.modeling_utils.checkpoint", side_effect=real) as spy:
        ckpt = tuneloop.train(config(tmp_path / "ckpt", gradient_checkpointing=True))
    assert spy.call_count >= 2 * 6  # both layers, every training forward (3 steps x 2 epochs)
    wp, wc = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    for k in wp:  # dropout is on: equal weights need the recomputation to replay the same masks
        torch.testing.assert_close(wc[k], wp[k], rtol=1e-4, atol=1e-6)
    assert ckpt["accuracy"] == plain["accuracy"]


def test_resuming_a_checkpoint_into_a_folder_of_another_run_is_refused(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    from conftest import tiny_args
    from tuneloop.cli import main

    first, other = tmp_path / "first", tmp_path / "other"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, first, "--report-to", "none")) == 0
    assert main(tiny_args(tiny_model_dir, mrpc_slice, other, "--report-to", "none", "--seed", "7")) == 0
    capsys.readouterr()
    checkpoint = sorted((first / "checkpoints").iterdir())[-1]
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    assert main(tiny_args(tiny_model_dir, mrpc_slice, other, "--report-to", "none", "--resume", str(checkpoint))) != 0
    err = capsys.readouterr().err.strip()
    assert err == (f"tuneloop: error: cannot resume {checkpoint} into {other}: that folder holds another run "
                   f"(config.yaml, metrics.jsonl, eval_results.json, model); to continue the checkpoint's own run, "
                   f"pass --output-dir {first} (or --resume alone there); to start a new run from it, choose an "
                   f"empty --output-dir")
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before  # metrics.jsonl not mixed


def test_a_leftover_model_old_is_cleaned_up(tmp_path):
    from tuneloop.recipe import save_atomically

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").write_text("v1")
    (tmp_path / "model.old").mkdir()  # a save that died while removing the previous model
    (tmp_path / "model.old" / "weights").write_text("v0")
    save_atomically(tmp_path / "model", lambda tmp: (tmp.mkdir(), (tmp / "weights").write_text("v2")))
    assert (tmp_path / "model" / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_frozen_word_embeddings_stay_bitwise_and_have_no_optimizer_state(tiny_model_dir, mrpc_slice, tmp_path):
    out = tmp_path / "frozen"
    c = _config(tiny_model_dir, mrpc_slice, out)
    c.optim.embeddings = "freeze"
    tuneloop.train(c)
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), _weights(out)
    word = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(after[word], before[word])
    assert not torch.equal(after["bert.embeddings.position_embeddings.weight"],
                           before["bert.embeddings.position_embeddings.weight"])  # the rest trained
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    state = torch.load(ckpt / "optimizer.bin", weights_only=False)["state"]
    trainable = sum(1 for k in after if k != word and "position_ids" not in k)
    assert len(state) == trainable  # one AdamW state per trained tensor, none for the word embeddings
    assert all(s["exp_avg"].shape != after[word].shape for s in state.values())


def test_frozen_bottom_layer_run_trains_only_above_it(tiny_model_dir, mrpc_slice, tmp_path):
    out = tmp_path / "frozen-layer"
    c = _config(tiny_model_dir, mrpc_slice, out)
    c.optim.freeze_layers = 1
    tuneloop.train(c)
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), _weights(out)
    low = [k for k in before if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))]
    assert low and all(torch.equal(after[k], before[k]) for k in low)
    assert not torch.equal(after["bert.encoder.layer.1.output.dense.weight"],
                           before["bert.encoder.layer.1.output.dense.weight"])
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    state = torch.load(ckpt / "optimizer.bin", weights_only=False)["state"]
    assert len(state) == sum(1 for k in after if k not in low and "position_ids" not in k)


def test_reinit_layers_run_is_seeded_and_recorded(tiny_model_dir, mrpc_slice, tmp_path):
    import yaml

    def run(name):
        c = _config(tiny_model_dir, mrpc_slice, tmp_path / name, epochs=1)
        c.model.reinit_layers = 1
        tuneloop.train(c)
        return _weights(tmp_path / name)

    a, b = run("a"), run("b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["model"]["reinit_layers"] == 1
