"""LoRA and AdaLoRA through PEFT: what trains, what is saved, exact resume, the rank budget, bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MRPC, load_weights, small_config, tiny_args
from tuneloop.checkpoint import list_checkpoints
from tuneloop.cli import main

RUN_FLAGS = ["--max-train-samples", "48", "--max-eval-samples", "24", "--max-length", "48", "--epochs", "2",
             "--batch-size", "4", "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--log-every", "1",
             "--checkpoint-every", "1", "--keep-last", "100", "--mixed-precision", "no"]


def _cmd(model_dir, out, *extra):
    return [sys.executable, "-m", "tuneloop", "train", "--model", str(model_dir), "--data-dir", str(MRPC),
            "--output-dir", str(out), *RUN_FLAGS, *extra]


def _run(model_dir, out, *extra):
    proc = subprocess.run(_cmd(model_dir, out, *extra), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _outcome(out: Path):
    adapter = load_file(str(out / "model" / "adapter_model.safetensors"))
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return (adapter, json.loads((out / "eval_results.json").read_text()),
            [(r["step"], r["loss"]) for r in records if r["type"] == "train"],
            [r for r in records if r["type"] == "eval"])


def _assert_same(out: Path, reference):
    adapter, results, losses, evals = _outcome(out)
    ref_adapter, ref_results, ref_losses, ref_evals = reference
    assert adapter.keys() == ref_adapter.keys()
    assert all(torch.equal(adapter[k], ref_adapter[k]) for k in ref_adapter)  # bitwise
    assert (results, losses, evals) == (ref_results, ref_losses, ref_evals)


@pytest.fixture(scope="module")
def lora_run(tiny_dropout_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    proc = _run(tiny_dropout_model_dir, out, "--peft", "lora", "--lora-rank", "4", "--merge-adapter")
    return out, proc


def test_lora_trains_only_adapters_and_head(lora_run, tiny_dropout_model_dir):
    out, proc = lora_run
    assert "peft lora: trainable" in proc.stdout and "parameters (" in proc.stdout
    original = load_weights(tiny_dropout_model_dir / "model.safetensors")
    merged = load_weights(out / "model-merged" / "model.safetensors")
    adapter_config = json.loads((out / "model" / "adapter_config.json").read_text())
    targets = set(adapter_config["target_modules"])
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"query", "key", "value", "dense"}
    assert set(adapter_config["modules_to_save"]) <= {"classifier", "score"}  # PEFT adds its own names for the head
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    # Only adapted weight matrices (base + B @ A) and the head differ; embeddings, LayerNorms, biases are bitwise equal.
    assert changed <= {f"{t}.weight" for t in targets} | {"classifier.weight", "classifier.bias"}
    assert {"classifier.weight", "classifier.bias"} <= changed and len(changed) > 2

    # Checkpoints hold only what trains: the adapters and the head, far smaller than the model.
    step, ckpt = list_checkpoints(out / "checkpoints")[0]
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k or "modules_to_save" in k for k in saved)
    assert (ckpt / "model.safetensors").stat().st_size < (tiny_dropout_model_dir / "model.safetensors").stat().st_size / 5


def test_merged_and_unmerged_adapters_predict_the_same(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    out, _ = lora_run
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    batch = tokenizer(["A cat sat on the mat .", "Stocks fell sharply on Monday ."],
                      ["The cat was on the mat .", "He plays the violin ."], padding=True, return_tensors="pt")
    # As a user loads it with PEFT alone: the base model with the run's label config, then the adapter and head.
    base_path = json.loads((out / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, config=AutoConfig.from_pretrained(out / "model"))
    unmerged = PeftModel.from_pretrained(base, out / "model").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model-merged").eval()
    with torch.no_grad():
        a, b = unmerged(**batch).logits, merged(**batch).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert merged.config.id2label == {0: "not_equivalent", 1: "equivalent"}

    # `tuneloop eval` reads either folder and gets the run's own final metrics.
    final = json.loads((out / "eval_results.json").read_text())
    for folder in ("model", "model-merged"):
        assert main(["eval", "--model-dir", str(out / folder), "--data-dir", str(MRPC), "--max-eval-samples", "24",
                     "--max-length", "48", "--mixed-precision", "no", "--output-dir", str(tmp_path / folder)]) == 0
        again = json.loads((tmp_path / folder / "eval_results.json").read_text())
        assert again["accuracy"] == final["accuracy"] and again["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_lora_resumes_exactly_after_a_kill(lora_run, tiny_dropout_model_dir, tmp_path):
    ref_out, _ = lora_run
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(tiny_dropout_model_dir, out, "--peft", "lora", "--lora-rank", "4", "--merge-adapter"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len([s for s, _ in list_checkpoints(out / "checkpoints") if s >= 2]) >= 1:
            break
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    resumed = _run(tiny_dropout_model_dir, out, "--peft", "lora", "--lora-rank", "4", "--merge-adapter", "--resume")
    assert "resuming from" in resumed.stdout
    _assert_same(out, _outcome(ref_out))


def test_adalora_budget_shrinks_and_resume_is_exact(tiny_dropout_model_dir, tmp_path):
    flags = ["--peft", "adalora", "--adalora-init-rank", "6", "--adalora-target-rank", "2",
             "--adalora-update-every", "2", "--peft.adalora_warmup_fraction", "0.1",
             "--peft.adalora_final_fraction", "0.3"]
    ref = tmp_path / "ref"
    _run(tiny_dropout_model_dir, ref, *flags)
    config = json.loads((ref / "model" / "adapter_config.json").read_text())
    ranks = config["rank_pattern"]
    layers = len(ranks)
    assert layers == 2 * 6 + 1  # 2 BERT layers x (query, key, value, 3 x dense) + the pooler
    kept = sum(sum(mask) for mask in ranks.values())
    assert kept <= 2 * layers < 6 * layers  # the budget shrank from init_r per layer to target_r on average

    # The saved adapter loads back at the shrunk ranks, without PEFT's false "rank_pattern ignored" warning.
    import warnings

    from tuneloop.adapters import load_adapter_model
    from tuneloop.model import saved_label_names

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_adapter_model(ref / "model", saved_label_names(ref / "model"), merge=False)
    assert not [w for w in caught if "rank_pattern" in str(w.message)]
    loaded = {n.split("base_model.model.", 1)[1].replace(".default", ""): p.shape[0]
              for n, p in model.named_parameters() if "lora_E" in n}
    assert loaded == {name: sum(mask) for name, mask in ranks.items()}

    # Resuming from a checkpoint in the middle of the shrinking phase ends exactly like the uninterrupted run:
    # the allocator's importance averages are part of the checkpoint.
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    for step, path in list_checkpoints(out / "checkpoints"):
        if step != 6:
            shutil.rmtree(path)
    for name in ("model", "eval_results.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    _run(tiny_dropout_model_dir, out, *flags, "--resume")
    _assert_same(out, _outcome(ref))
    assert json.loads((out / "model" / "adapter_config.json").read_text())["rank_pattern"] == ranks


@pytest.mark.parametrize("extra, message", [
    (["--peft", "lora", "--lora-target-modules", "query,q_lin"],
     "peft.lora_target_modules: BertForSequenceClassification has no Linear layer named 'q_lin'"),
    (["--merge-adapter"], "peft.merge_adapter: there is no adapter to merge; add --peft lora"),
    (["--loraplus-lr-ratio", "16"], "optim.loraplus_lr_ratio: applies to LoRA adapters"),
    (["--peft", "adalora", "--adalora-orth-reg-weight", "-1"], "peft.adalora_orth_reg_weight: must be > 0, got -1.0"),
])
def test_bad_adapter_settings_fail_in_one_line(tiny_model_dir, mrpc_slice, tmp_path, capsys, extra, message):
    assert main(tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "run", *extra)) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneloop: error: ") and message in err and len(err.splitlines()) == 1


def test_adalora_orthogonality_weight_is_what_peft_adds_to_the_loss():
    from transformers import BertConfig, BertForSequenceClassification

    from tuneloop.adapters import prepare_model
    from tuneloop.config import PeftConfig

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_attention_heads=2,
                                                    intermediate_size=16, num_hidden_layers=1))
    batch = dict(input_ids=torch.randint(0, 50, (4, 6)), labels=torch.tensor([0, 1, 0, 1]))
    losses = {}
    for weight in (0.1, 0.2, 0.5):
        torch.manual_seed(1)  # the same adapter initialisation for each weight
        model = prepare_model(base, PeftConfig(method="adalora", lora_dropout=0.0, adalora_orth_reg_weight=weight), 100)
        assert model.peft_config["default"].orth_reg_weight == weight
        model.train()
        losses[weight] = model(**batch).loss.item()
        base = model.unload()  # the same frozen base for the next weight
    # The penalty is there and linear in its weight: L(0.5) - L(0.1) = 4 x (L(0.2) - L(0.1)).
    assert losses[0.1] < losses[0.2] < losses[0.5]
    assert losses[0.5] - losses[0.1] == pytest.approx(4 * (losses[0.2] - losses[0.1]), rel=1e-4)


def test_target_modules_are_found_per_architecture():
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, ElectraConfig, ElectraForSequenceClassification)

    from tuneloop.adapters import head_module_names, resolve_target_modules

    small = dict(vocab_size=50, hidden_size=8, num_attention_heads=2, intermediate_size=16)
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=8, n_layers=1, n_heads=2,
                                                                  hidden_dim=16))
    assert {n.rsplit(".", 1)[-1] for n in resolve_target_modules(distil, None)} == {
        "q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"}
    assert head_module_names(distil) == ["pre_classifier", "classifier"]
    electra = ElectraForSequenceClassification(ElectraConfig(num_hidden_layers=1, embedding_size=8, **small))
    found = resolve_target_modules(electra, None)
    assert {n.rsplit(".", 1)[-1] for n in found} == {"query", "key", "value", "dense"}
    assert not any(n.startswith("classifier") for n in found)  # ELECTRA's head has a `dense` too: trained in full
    bert = BertForSequenceClassification(BertConfig(num_hidden_layers=1, **small))
    assert "bert.pooler.dense" in resolve_target_modules(bert, None) and head_module_names(bert) == ["classifier"]


def test_fast_dropout_masks_reach_the_adapters(tiny_dropout_model_dir, mrpc_slice, tmp_path):
    from tuneloop import recipe
    from tuneloop.loop import TrainingState
    from tuneloop.tracking import MetricsLog

    config = small_config(tiny_dropout_model_dir, mrpc_slice, tmp_path / "out")
    config.peft.method, config.peft.lora_dropout, config.model.dropout_masks = "lora", 0.1, "fast"
    accelerator = recipe.make_accelerator(config)
    run = recipe.setup(config, accelerator, TrainingState(), MetricsLog(tmp_path / "m.jsonl", enabled=False))
    dropouts = {n: type(m).__name__ for n, m in run.model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert any("lora_dropout" in n for n in dropouts)
    assert set(dropouts.values()) == {"FastDropout"}, dropouts
