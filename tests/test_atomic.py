"""Atomic writes: a kill at any moment leaves the old file or the new one, never an empty or torn one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from tuneloop import atomic

WRITER = """import sys
from tuneloop import atomic
path, i = sys.argv[1], 0
print('writing', flush=True)
while True:
    i += 1
    atomic.write_text(path, str(i % 10) * 4_000_000)
"""


def test_a_kill_during_writes_leaves_a_whole_file(tmp_path):
    target = tmp_path / "best_config.yaml"
    rng = random.Random(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        text = target.read_text()
        assert len(text) == 4_000_000 and len(set(text)) == 1  # one whole version
    # What a kill can leave besides: hidden temporaries, never a file under the real name that is cut short.
    assert all(p == target or (p.name.startswith(".best_config.yaml.") and p.name.endswith(".tmp.yaml"))
               for p in tmp_path.iterdir())


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "trials.csv"
    atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["trials.csv"]
    assert target.stat().st_mode & 0o777 == 0o644  # readable like any file, not mkstemp's private 0o600
