"""Several CPU processes (gloo) and two "machines" on loopback, started as a user starts them.

The reference is one process with batch 8. Two processes with batch 2 and accumulation 2 (global batch
8 again) must take the same optimizer steps, end the schedule at the same step with lr 0, reach the
same weights within float tolerance and report the same evaluation. The training set (17 examples)
leaves a last step with one example, so one process gets a zero-weight filler batch; the evaluation
set (41 examples, batches of 6 per process) is not a multiple of the global evaluation batch.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, write_mrpc_head
from tuneloop.cli import main

TIMEOUT = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """glue_data-style MRPC with 64 train, 41 dev and 20 test rows, and a tokenisation cache of its own."""
    root = tmp_path_factory.mktemp("dist-data")
    return write_mrpc_head(root / "MRPC", (65, 42, 21)), root / "cache"


def train_args(model_dir, data, out, *extra):
    data_dir, cache = data
    return ["train", "--model", str(model_dir), "--data-dir", str(data_dir), "--cache-dir", str(cache),
            "--output-dir", str(out), "--epochs", "2", "--learning-rate", "1e-3", "--log-every", "1",
            "--max-train-samples", "17", "--max-length", "48", "--group-by-length", "--eval-batch-size", "6",
            "--mixed-precision", "no", *extra]


def env():
    # The children must import this checkout, whatever is installed; one thread each on a small CPU.
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run(cmd, timeout=TIMEOUT):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)


def tuneloop(*args):
    return [sys.executable, "-m", "tuneloop", *args]


def records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def assert_same_weights(a, b):
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    """One process, batch 8: 3 optimizer steps per epoch (8, 8, 1 examples)."""
    out = tmp_path_factory.mktemp("dist-ref") / "one"
    assert main(train_args(tiny_model_dir, data, out, "--batch-size", "8")) == 0
    return out


TWO_PROCESSES = ("--batch-size", "2", "--gradient-accumulation-steps", "2", "--num-processes", "2")


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir, data, tmp_path_factory):
    """`tuneloop train --num-processes 2` with batch 2 and accumulation 2 (global batch 8), a checkpoint per step."""
    out = tmp_path_factory.mktemp("dist-two") / "two"
    proc = run(tuneloop(*train_args(tiny_model_dir, data, out, *TWO_PROCESSES, "--checkpoint-every", "1",
                                    "--keep-last", "10")))
    return out, proc


def test_two_processes_train_like_one_with_the_same_global_batch(two_processes, reference):
    out, proc = two_processes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr

    # Process 0 alone speaks and writes: one start line, one result, one metrics line per step.
    assert proc.stdout.count("tuneloop: train=17") == 1 and proc.stdout.count('"accuracy"') == 1
    assert "2 process(es)" in proc.stdout
    assert "global batch 8 = 2 per device x 2 x 2 accumulation | 6 optimizer steps" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    one_train, two_train = records(reference, "train"), records(out, "train")
    assert [r["step"] for r in two_train] == [r["step"] for r in one_train] == [1, 2, 3, 4, 5, 6]
    assert two_train[-1]["lr"] == one_train[-1]["lr"] == 0.0  # the schedule ends at zero after the last step
    assert [r["lr"] for r in two_train] == pytest.approx([r["lr"] for r in one_train], rel=1e-12)
    assert [r["loss"] for r in two_train] == pytest.approx([r["loss"] for r in one_train], rel=1e-5)
    assert yaml.safe_load((out / "config.yaml").read_text())["launch"]["num_processes"] == 2

    # The same examples per optimizer step, weighted by their real count: the same weights and metrics.
    assert_same_weights(reference, out)
    one_eval, two_eval = records(reference, "eval"), records(out, "eval")
    assert [r["step"] for r in two_eval] == [r["step"] for r in one_eval] == [3, 6]
    for a, b in zip(one_eval, two_eval):
        assert b["num_examples"] == a["num_examples"] == 41
        assert (b["accuracy"], b["f1"]) == (a["accuracy"], a["f1"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_a_two_process_checkpoint_resumes_exactly_with_two_processes(tiny_model_dir, data, two_processes, tmp_path,
                                                                     capsys):
    finished, _ = two_processes
    out = tmp_path / "resumed"
    shutil.copytree(finished, out)
    for name in ("model", "eval_results.json"):
        shutil.rmtree(out / name) if name == "model" else (out / name).unlink()
    # Step 2 ends mid-epoch, just before the window whose last micro-batch gives process 1 a filler batch.
    checkpoint = out / "checkpoints" / "step-000002"
    resume = ("--checkpoint-every", "1", "--keep-last", "10", "--resume", str(checkpoint))
    one_process = train_args(tiny_model_dir, data, out, "--batch-size", "2", "--gradient-accumulation-steps", "2",
                             *resume)
    assert main(one_process) == 1
    assert "number of processes 2 -> 1" in capsys.readouterr().err
    proc = run(tuneloop(*train_args(tiny_model_dir, data, out, *TWO_PROCESSES, *resume)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "at optimizer step 2 (epoch 1, batch 4)" in proc.stdout
    a = load_file(str(finished / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    results = [json.loads((o / "eval_results.json").read_text()) for o in (finished, out)]
    assert results[0] == results[1]
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4, 5, 6]


def test_evaluation_on_two_processes_equals_one_process_for_the_same_weights(reference, data, tmp_path):
    data_dir, cache = data
    args = ["eval", "--model-dir", str(reference / "model"), "--data-dir", str(data_dir), "--cache-dir", str(cache),
            "--max-length", "48", "--eval-batch-size", "6"]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    # torchrun -m tuneloop works as is: 41 examples in batches of 6 per process, 12 per round.
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "tuneloop", *args, "--output-dir", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"num_examples": 41') == 1  # printed once, by process 0
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert two["num_examples"] == one["num_examples"] == 41  # no example counted twice, none dropped
    assert (two["accuracy"], two["f1"]) == (one["accuracy"], one["f1"])
    # Only float rounding differs (batch shapes); one duplicated example would move the mean by ~1e-2.
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_two_machines_on_loopback(tiny_model_dir, data, reference, tmp_path):
    out = tmp_path / "two-machines"
    port = str(free_port())
    machine = [*train_args(tiny_model_dir, data, out, "--batch-size", "4"), "--num-processes", "1",
               "--num-machines", "2", "--main-process-ip", "127.0.0.1", "--main-process-port", port, "--timeout", "120"]
    procs = [subprocess.Popen(tuneloop(*machine, "--machine-rank", str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO) for rank in (1, 0)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    (out1, _), (out0, _) = outputs
    assert out0.count('"accuracy"') == 1 and out1.strip() == ""  # machine 1 stays quiet
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4, 5, 6]
    assert records(out, "train")[-1]["lr"] == 0.0
    assert_same_weights(reference, out)


def test_a_failing_process_ends_the_job_with_its_error(tiny_model_dir, data, tmp_path):
    # Process 0 cannot create the output folder; process 1 would wait for it in a barrier forever.
    (tmp_path / "file").write_text("")
    start = time.monotonic()
    proc = run(tuneloop(*train_args(tiny_model_dir, data, tmp_path / "file" / "run", "--num-processes", "2",
                                    "--timeout", "60")), timeout=120)
    assert proc.returncode == 1 and time.monotonic() - start < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tuneloop: error: process 0 of 2 failed: cannot write to output folder"), proc.stderr
    assert "process 0 of 2: cannot write" in proc.stderr and "Traceback" not in proc.stderr


def test_a_process_dying_mid_training_ends_the_job(tiny_model_dir, data, tmp_path):
    # Process 1 fails at its second optimizer step while process 0 is inside a collective with it.
    script = tmp_path / "dies.py"
    script.write_text("import os, sys\n"
                      "from tuneloop.guard import StepGuard\n"
                      "from tuneloop.cli import main\n"
                      "check = StepGuard.check\n"
                      "def failing(self, window_loss, step):\n"
                      "    if os.environ['RANK'] == '1' and step == 2:\n"
                      "        raise RuntimeError('process 1 broke')\n"
                      "    return check(self, window_loss, step)\n"
                      "StepGuard.check = failing\n"
                      "sys.exit(main())\n")
    start = time.monotonic()
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                *train_args(tiny_model_dir, data, tmp_path / "out", "--batch-size", "4", "--timeout", "60")],
               timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "tuneloop: error: process 1 of 2: RuntimeError: process 1 broke" in proc.stderr


def test_a_machine_left_alone_fails_after_the_timeout(tiny_model_dir, data, tmp_path):
    start = time.monotonic()
    proc = run(tuneloop(*train_args(tiny_model_dir, data, tmp_path / "alone"), "--num-processes", "1",
                        "--num-machines", "2", "--machine-rank", "0", "--main-process-ip", "127.0.0.1",
                        "--main-process-port", str(free_port()), "--timeout", "3"), timeout=120)
    assert proc.returncode == 1 and time.monotonic() - start < 60
    assert "tuneloop: error: the 2 machines did not all join at 127.0.0.1" in proc.stderr
    assert "launch.timeout=3 s" in proc.stderr and "Traceback" not in proc.stderr


def test_accelerate_launch_runs_tuneloop_and_the_config_precision_wins(tiny_model_dir, data, tmp_path):
    out = tmp_path / "acc"
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "bf16",
                "-m", "tuneloop", *train_args(tiny_model_dir, data, out, "--epochs", "1")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("mixed precision: ACCELERATE_MIXED_PRECISION (set by accelerate launch) says 'bf16' but "
            "train.mixed_precision is 'no'; using 'no'") in proc.stderr
    assert "precision no" in proc.stdout and (out / "model" / "model.safetensors").exists()


def test_bf16_autocast_on_cpu(tiny_model_dir, data, reference, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(train_args(tiny_model_dir, data, out, "--batch-size", "8", "--mixed-precision", "bf16")) == 0
    assert "precision bf16" in capsys.readouterr().out
    wa = load_file(str(reference / "model" / "model.safetensors"))
    wb = load_file(str(out / "model" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in wb.values())  # autocast: fp32 weights, bf16 matmuls
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert 0 < diff < 1e-2


def test_a_signal_on_one_process_stops_all_at_the_next_logging_step(tiny_model_dir, data, tmp_path):
    # Process 1 is signalled during optimizer step 3; the processes agree on logging steps (every 4), so all
    # of them finish step 4, write its checkpoint together and stop.
    script = tmp_path / "signalled.py"
    script.write_text("import os, sys\n"
                      "import tuneloop.recipe as recipe\n"
                      "from tuneloop.guard import StepGuard\n"
                      "from tuneloop.cli import main\n"
                      "runs, loop, check = [], recipe.train_loop, StepGuard.check\n"
                      "recipe.train_loop = lambda run: runs.append(run) or loop(run)\n"
                      "def signalled(self, window_loss, step):\n"
                      "    if os.environ['RANK'] == '1' and step == 3:\n"
                      "        runs[0].stop.signal_name = 'SIGTERM'\n"
                      "    return check(self, window_loss, step)\n"
                      "StepGuard.check = signalled\n"
                      "sys.exit(main())\n")
    out = tmp_path / "out"
    args = train_args(tiny_model_dir, data, out, "--batch-size", "2", "--log-every", "4", "--timeout", "60",
                      "--max-train-samples", "32")
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                *args], timeout=180)
    assert proc.returncode != 0
    assert "stopped by a signal on another process after optimizer step 4" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]
    state = json.loads((out / "checkpoints" / "step-000004" / "training_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 0, 4)  # resumable mid-epoch (8 steps)
