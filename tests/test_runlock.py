"""Run locks: a second run into a live run's folder is one line naming the holder; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, tiny_args
from tuneloop.cli import main
from tuneloop.errors import TuneloopError
from tuneloop.runlock import HOLDER_FILE, RunLock, claim_for_study, is_alive

HOLD = "import sys, time; from tuneloop.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"


@pytest.fixture
def holder(tmp_path):
    """Another process holding the run lock of tmp_path/run, as a `tuneloop train` in another terminal does."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "--storage", "postgresql://u:hunter2@db/x"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.wait()


def test_a_second_run_into_a_live_runs_folder_is_one_line_naming_the_holder(holder, tiny_model_dir, mrpc_slice, capsys):
    out, proc = holder
    (out / "config.yaml").write_text("the live run's config\n")
    (out / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')
    for extra in ((), ("--overwrite",)):  # --overwrite never touches a live run's folder either
        assert main(tiny_args(tiny_model_dir, mrpc_slice, out, *extra)) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("tuneloop: error: ") and len(err.splitlines()) == 1, err
        assert f"is in use by another run (host {socket.gethostname()}, pid {proc.pid}, started 20" in err
        assert "command: " in err and "hunter2" not in err and "postgresql://u:***@db/x" in err
    assert (out / "config.yaml").read_text() == "the live run's config\n"
    assert (out / "metrics.jsonl").read_text() == '{"type": "train", "step": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == [".tuneloop.lock", HOLDER_FILE, "config.yaml", "metrics.jsonl"]
    assert is_alive(out)


def test_a_dead_holders_lock_is_taken_over_with_a_warning(holder, caplog):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)  # as kill -9 or a lost machine: the holder file stays, the OS lock goes
    proc.wait()
    assert json.loads((out / HOLDER_FILE).read_text())["pid"] == proc.pid and not is_alive(out)
    logger = logging.getLogger("tuneloop.runlock")
    logger.addHandler(caplog.handler)  # the CLI's logging setup may stop tuneloop's records from propagating
    try:
        with RunLock(out):
            assert json.loads((out / HOLDER_FILE).read_text())["pid"] == os.getpid() and is_alive(out)
    finally:
        logger.removeHandler(caplog.handler)
    assert f"taking over the lock of {out}" in caplog.text and f"pid {proc.pid}" in caplog.text
    assert "no longer alive" in caplog.text
    assert not (out / HOLDER_FILE).exists() and not is_alive(out)  # released at the end of the run


def test_a_lock_is_held_against_this_process_too(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(TuneloopError, match="is in use by another run"):
            RunLock(tmp_path / "run").acquire()


def test_a_search_folder_belongs_to_one_study(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    out = tmp_path / "search"
    url = f"sqlite:///{out / 'study.db'}"
    claim_for_study(out, "tuneloop", url)
    claim_for_study(out, "tuneloop", url)  # its workers share it
    with pytest.raises(TuneloopError, match="belongs to study 'tuneloop'"):
        claim_for_study(out, "other", url)
    (out / "trial-0000").mkdir()
    (out / "trial-0000" / "config.yaml").write_text("trial 0 of study tuneloop\n")
    args = tiny_args(tiny_model_dir, mrpc_slice, out, "--report-to", "none")
    assert main(["search", *args[1:], "--study-name", "other", "--n-trials", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneloop: error: search folder") and len(err.splitlines()) == 1
    assert "belongs to study 'tuneloop'" in err and "choose another --output-dir" in err
    assert (out / "trial-0000" / "config.yaml").read_text() == "trial 0 of study tuneloop\n"
    assert not (out / "trial-0001").exists()
