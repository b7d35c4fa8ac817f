"""Checkpoints survive kills, signals, corruption and a full disk; resume is exact (bitwise on CPU)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuneloop
from conftest import MRPC
from tuneloop.checkpoint import list_checkpoints, read_checkpoint
from tuneloop.config import Config

RUN_FLAGS = ["--max-train-samples", "48", "--max-eval-samples", "24", "--max-length", "48", "--epochs", "3",
             "--batch-size", "4", "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--log-every", "1",
             "--checkpoint-every", "1", "--keep-last", "2", "--mixed-precision", "no"]


def _cmd(model_dir, out, *extra):
    return [sys.executable, "-m", "tuneloop", "train", "--model", str(model_dir), "--data-dir", str(MRPC),
            "--output-dir", str(out), *RUN_FLAGS, *extra]


def _run(model_dir, out, *extra, check=True):
    proc = subprocess.run(_cmd(model_dir, out, *extra), capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _start(model_dir, out, *extra, env=None):
    return subprocess.Popen(_cmd(model_dir, out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_for_checkpoint(out: Path, proc, count: int = 1, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len([s for s, _ in list_checkpoints(out / "checkpoints") if s >= 0]) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint appeared (exit {proc.poll()})")


def _outcome(out: Path):
    weights = load_file(str(out / "model" / "model.safetensors"))
    results = json.loads((out / "eval_results.json").read_text())
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    evals = [{k: v for k, v in r.items()} for r in records if r["type"] == "eval"]
    losses = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    return weights, results, train_steps, evals, losses


@pytest.fixture(scope="module")
def reference(tiny_dropout_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(tiny_dropout_model_dir, out)
    return _outcome(out)


def _assert_same(out: Path, reference):
    weights, results, steps, evals, losses = _outcome(out)
    ref_weights, ref_results, ref_steps, ref_evals, ref_losses = reference
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)  # bitwise
    assert results == ref_results
    assert steps == ref_steps == list(range(1, len(ref_steps) + 1))  # no duplicate or missing step
    assert evals == ref_evals
    assert losses == ref_losses


def test_sigkill_twice_at_random_moments_then_resume_is_exact(tiny_dropout_model_dir, tmp_path, reference):
    tiny_model_dir = tiny_dropout_model_dir  # dropout on: the RNG must be restored exactly too
    out = tmp_path / "run"
    rng = random.Random(os.getpid())
    proc = _start(tiny_model_dir, out)
    for kill in range(2):
        _wait_for_checkpoint(out, proc)
        time.sleep(rng.uniform(0.0, 1.5))  # anywhere: mid-accumulation window, mid-save, mid-eval
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
        proc = _start(tiny_model_dir, out, "--resume")
    out_, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "resuming from" in out_
    _assert_same(out, reference)


SLOW_SAVE = """
import sys, time, pathlib
import tuneloop.checkpoint as ck
original = ck._write_json
def slow(path, data):
    if path.name == ck.MANIFEST and data["step"] == 3:
        pathlib.Path(sys.argv[-1]).write_text("saving")
        time.sleep(60)
    original(path, data)
ck._write_json = slow
from tuneloop.cli import main
sys.exit(main(sys.argv[1:-1]))
"""


def test_kill_during_a_checkpoint_write_falls_back_to_the_previous_one(tiny_dropout_model_dir, tmp_path, reference):
    tiny_model_dir = tiny_dropout_model_dir
    out, marker = tmp_path / "run", tmp_path / "marker"
    cmd = _cmd(tiny_model_dir, out)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *cmd[3:], str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    # The half-written step-3 checkpoint is a temporary folder; the complete ones are intact.
    assert (out / "checkpoints" / ".tmp-step-000003").exists()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 1]
    proc = _run(tiny_model_dir, out, "--resume")
    assert "at optimizer step 2" in proc.stdout
    _assert_same(out, reference)
    assert not (out / "checkpoints" / ".tmp-step-000003").exists()


def test_sigterm_checkpoints_and_exits_with_a_distinct_code(tiny_dropout_model_dir, tmp_path, reference):
    tiny_model_dir = tiny_dropout_model_dir
    out = tmp_path / "run"
    proc = _start(tiny_model_dir, out, "--checkpoint-every", "0", "--checkpoint.checkpoint_every_epoch", "false")
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or '"train"' not in (out / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by SIGTERM" in err and "--resume" in err
    assert len(list_checkpoints(out / "checkpoints")) == 1
    _run(tiny_model_dir, out, "--resume", "--checkpoint-every", "0", "--checkpoint.checkpoint_every_epoch", "false")
    _assert_same(out, reference)


def test_corrupted_checkpoint_is_skipped_with_a_warning(tiny_model_dir, tmp_path, reference):
    out = tmp_path / "run"
    _run(tiny_model_dir, out, "--epochs", "1", "--keep-last", "3")  # keeps steps 4, 5, 6 of epoch 1
    (steps := [s for s, _ in list_checkpoints(out / "checkpoints")])
    assert steps == [6, 5, 4]
    newest = out / "checkpoints" / "step-000006"
    blob = bytearray((newest / "optimizer.bin").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (newest / "optimizer.bin").write_bytes(bytes(blob))
    assert read_checkpoint(newest) is None
    (out / "checkpoints" / "step-000005" / "manifest.json").unlink()  # as if killed before the manifest
    proc = _run(tiny_model_dir, out, "--resume", "--epochs", "3", "--resume-force")
    assert "is corrupted" in proc.stderr and "is incomplete" in proc.stderr
    assert "at optimizer step 4" in proc.stdout


def test_changed_settings_are_refused_unless_forced(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    _run(tiny_model_dir, out, "--epochs", "1")
    proc = _run(tiny_model_dir, out, "--resume", "--epochs", "1", "--batch-size", "2", "--max-train-samples", "40",
                check=False)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert "cannot resume exactly" in err and "train.batch_size 4 -> 2" in err and "the data changed" in err
    assert "--resume-force" in err
    proc = _run(tiny_model_dir, out, "--resume", "--epochs", "1", "--learning-rate", "5e-4", "--resume-force")
    record = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"resume"' in l][-1]
    assert record["forced_changes"] == ["optim.learning_rate 0.001 -> 0.0005"]


def _api_config(model_dir, out, **kw):
    c = Config()
    c.model.name_or_path = str(model_dir)
    c.data.data_dir = str(MRPC)
    c.data.max_train_samples, c.data.max_eval_samples, c.data.max_length = 24, 16, 32
    c.output.output_dir = str(out)
    c.train.epochs, c.train.batch_size, c.train.log_every = 2, 4, 1
    c.checkpoint.checkpoint_every = 2
    for k, v in kw.items():
        section, name = k.split("__")
        setattr(getattr(c, section), name, v)
    return c


def test_full_disk_during_save_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import accelerate.checkpointing

    real = accelerate.checkpointing.save

    def failing(obj, f, *a, **k):
        if "step-000004" in str(f):  # the second checkpoint: part of a file is written, then the disk is full
            Path(f).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(accelerate.checkpointing, "save", failing)
    out = tmp_path / "run"
    with pytest.raises(tuneloop.TuneloopError, match="cannot write checkpoint .*step-000004: no space left on device"):
        tuneloop.train(_api_config(tiny_model_dir, out))
    ckpts = list_checkpoints(out / "checkpoints")
    assert [s for s, _ in ckpts] == [2] and read_checkpoint(ckpts[0][1]) is not None
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # no partial folder left


class _NanAt:
    """Wrap a model so that its loss is NaN on the given forward calls."""

    def __init__(self, model, bad_calls):
        self.model, self.bad, self.calls = model, set(bad_calls), 0

    def __call__(self, *a, **k):
        self.calls += 1
        out = self.model(*a, **k)
        if self.calls in self.bad:
            out.loss = out.loss * float("nan")
        return out


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_loss_policy(tiny_model_dir, tmp_path, monkeypatch, policy):
    import tuneloop.recipe as recipe

    real_build = recipe.build_model

    def build(*a, **k):
        model = real_build(*a, **k)
        wrapper = _NanAt(model.forward, {4})  # the 4th training forward = optimizer step 4
        monkeypatch.setattr(model, "forward", wrapper)
        return model

    monkeypatch.setattr(recipe, "build_model", build)
    out = tmp_path / "run"
    cfg = _api_config(tiny_model_dir, out, train__nan_policy=policy)
    if policy == "stop":
        with pytest.raises(tuneloop.TuneloopError, match="NaN/infinite at optimizer step 4 .* Last good checkpoint: .*step-000002"):
            tuneloop.train(cfg)
        assert not (out / "model").exists()
        return
    results = tuneloop.train(cfg)
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r["type"] == "train"][3:5] == [1, 1]
    # The skipped step has no loss to report; every other logged loss is finite.
    assert [r["step"] for r in records if r["type"] == "train" and r["loss"] is None] == [4]
    assert results["loss"] == results["loss"]  # finite eval


def test_retention_keeps_last_k_and_the_best(tiny_model_dir, tmp_path):
    from tuneloop.checkpoint import apply_retention

    root = tmp_path / "checkpoints"
    for step, metric in [(1, 0.5), (2, 0.9), (3, 0.6), (4, None), (5, 0.7)]:
        d = root / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "training_state.json").write_text(json.dumps({"metric": metric}))
        (d / "manifest.json").write_text(json.dumps({"step": step, "files": {}}))
    (root / ".tmp-step-000006").mkdir()
    apply_retention(root, keep_last=2, keep_best=True)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004", "step-000005"]


class _Payload:
    """A pickle that writes a marker file when it is unpickled: what a stranger's checkpoint could hold."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _plant(checkpoint: Path, name: str, marker: Path) -> None:
    """Put the payload into the checkpoint under `name` and update the manifest as tuneloop computes it."""
    import hashlib
    import pickle

    (checkpoint / name).write_bytes(pickle.dumps(_Payload(marker)))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = {str(p.relative_to(checkpoint)): hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert read_checkpoint(checkpoint) is not None  # the checksums hold: integrity is not origin


def test_a_payload_pickle_in_a_checkpoint_is_never_run(tiny_model_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    _run(tiny_model_dir, out, "--epochs", "1", "--keep-last", "1")
    checkpoint = out / "checkpoints" / "step-000006"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert not any(n.startswith("custom_checkpoint") for n in names)  # nothing of tuneloop's is pickled
    assert {"scheduler.json", "training_state.json", "model.safetensors"} <= set(names)
    assert json.loads((checkpoint / "scheduler.json").read_text())["last_epoch"] == 6
    originals = {n: (checkpoint / n).read_bytes() for n in names}
    log_before = (out / "metrics.jsonl").read_text()
    # Accelerate unpickles custom_checkpoint_*.pkl with weights_only=False; the others must load as plain tensors.
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"):
        _plant(checkpoint, name, marker)
        proc = _run(tiny_model_dir, out, "--resume", "--epochs", "2", "--resume-force", check=False)
        assert not marker.exists(), f"the payload in {name} ran"
        err = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0 and err.startswith(f"tuneloop: error: cannot resume from {checkpoint}"), proc.stderr[-2000:]
        assert "does not" in err and "unpickle" in err or "pickled state that tuneloop does not load" in err
        assert (out / "metrics.jsonl").read_text() == log_before
        (checkpoint / name).unlink()
        for n, data in originals.items():
            (checkpoint / n).write_bytes(data)
    # The manifest restored with the files: the untouched checkpoint resumes.
    (checkpoint / "manifest.json").write_bytes(originals["manifest.json"])
    proc = _run(tiny_model_dir, out, "--resume", "--epochs", "2", "--resume-force")
    assert "resuming from" in proc.stdout and not marker.exists()
