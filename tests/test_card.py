"""Model cards: Hugging Face metadata that huggingface_hub reads back; a push that cannot happen is one line."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_args
from tuneloop.cli import main


def test_saved_model_has_a_card_and_offline_push_is_one_line(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    code = main(tiny_args(tiny_model_dir, mrpc_slice, out, "--report-to", "none", "--push-to-hub", "me/tiny-mrpc"))
    assert code == 1  # the upload could not happen (HF_HUB_OFFLINE=1) ...
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"tuneloop: error: --push-to-hub: HF_HUB_OFFLINE is set, nothing was uploaded (the local run in "
                       f"{out} is complete; upload it later with `hf upload me/tiny-mrpc {out / 'model'}`)")
    # ... and the local run is whole.
    assert {p.name for p in (out / "model").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                            "README.md"}
    results = json.loads((out / "eval_results.json").read_text())
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.pipeline_tag == "text-classification" and card.data.library_name == "transformers"
    assert card.data.datasets == ["nyu-mll/glue"]
    assert {(r.dataset_config, r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results} == \
        {("mrpc", "validation", "accuracy", round(results["accuracy"], 4)), ("mrpc", "validation", "f1", round(results["f1"], 4))}
    assert "| learning_rate | 0.001 |" in card.text and "## Intended use and limits" in card.text


def test_push_without_login_is_one_line(tmp_path, monkeypatch):
    from tuneloop.card import push_to_hub
    from tuneloop.errors import TuneloopError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    (tmp_path / "model").mkdir()
    with pytest.raises(TuneloopError, match=r"^--push-to-hub: not logged in to the Hugging Face Hub \(run `hf auth "
                                            r"login` or set HF_TOKEN\); nothing was uploaded"):
        push_to_hub(tmp_path / "model", "me/tiny")
