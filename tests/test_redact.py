"""Secrets: passwords in storage URLs and the Hub token never appear in anything printed or written."""

from __future__ import annotations

import pytest
import yaml

from conftest import tiny_args
from tuneloop.cli import main
from tuneloop.redact import mask_command, mask_url, redact, secrets_of

TYPO = "postgresql://tuner:Pa55@word@db.example.com:54x2/optuna"  # unescaped '@' in the password, a port typo


@pytest.mark.parametrize("url, masked", [
    ("postgresql://tuner:hunter2@db:5432/optuna", "postgresql://tuner:***@db:5432/optuna"),
    (TYPO, "postgresql://tuner:***@db.example.com:54x2/optuna"),  # SQLAlchemy cannot parse it
    ("mysql+pymysql://a:b@c@d@host/db", "mysql+pymysql://a:***@host/db"),
    ("postgresql://tuner:@db/x", "postgresql://tuner:***@db/x"),
    ("sqlite:////tmp/study.db?mode=rwc&password=s3cret", "sqlite:////tmp/study.db?mode=rwc&password=***"),
    ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
    ("postgresql://tuner@db/x", "postgresql://tuner@db/x"),
    ("tuner:pw@db:5432/x", "tuner:***@db:5432/x"),  # no scheme
])
def test_mask_url_never_gives_back_a_password(url, masked):
    assert mask_url(url) == masked
    message = redact(f"Could not parse SQLAlchemy URL from given URL string {url!r}", url)
    assert mask_url(url) in message and all(s not in message for s in secrets_of(url))
    assert "hunter2" not in message and "s3cret" not in message and "Pa55" not in message


def test_mask_command_hides_secret_options():
    assert mask_command(["tuneloop", "search", "--storage", TYPO, "--token=hf_abc", "--lr", "1"]) == \
        ["tuneloop", "search", "--storage", "postgresql://tuner:***@db.example.com:54x2/optuna", "--token=***", "--lr", "1"]


def _files_holding(root, *secrets):
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def test_a_search_and_a_tracked_run_print_and_write_no_secret(tiny_model_dir, mrpc_slice, tmp_path, capfd, monkeypatch):
    pytest.importorskip("optuna")
    pytest.importorskip("tensorboard")
    token, password = "hf_TuneloopTestToken1234567890", "Sup3rS3cretPw"
    monkeypatch.setenv("HF_TOKEN", token)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"learning_rate": [1e-3]}))
    base = tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "search", "--max-train-samples", "16", "--max-eval-samples", "8",
                     "--checkpoint-every-epoch", "false", "--report-to", "none", "--search-space", str(space))

    # A storage URL SQLAlchemy cannot parse (a port typo, an '@' in the password): one line, password masked.
    typo = f"postgresql://tuner:{password}@x@db.example.com:54x2/optuna"
    assert main(["search", *base[1:], "--storage", typo, "--n-trials", "1"]) != 0
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tuneloop: error: --storage postgresql://tuner:***@db.example.com:54x2/optuna: "
                              "cannot open the study storage")

    # A search whose storage URL carries a password, and a run reporting to TensorBoard.
    storage = f"sqlite:///{tmp_path / 'search' / 'study.db'}?mode=rwc&password={password}"
    assert main(["search", *base[1:], "--storage", storage, "--n-trials", "1"]) == 0
    tracked = tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "tracked", "--max-train-samples", "16",
                        "--max-eval-samples", "8", "--report-to", "tensorboard")
    assert main(tracked) == 0
    printed = capfd.readouterr()
    assert "password=***" in printed.out
    assert (tmp_path / "tracked" / "tensorboard").is_dir() and (tmp_path / "search" / "trial-0000" / "model").is_dir()
    for text in (printed.out, printed.err, *err):
        assert token not in text and password not in text
    assert _files_holding(tmp_path, token, password) == []
