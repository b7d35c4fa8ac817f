"""Notebook use: `notebook_launch` forks N CPU processes from this process, as from a Jupyter kernel, and the
example notebook runs headlessly on a tiny model and a small slice.

The reference is `tuneloop.train` in this process with batch 8; two processes with batch 2 and accumulation 2
(global batch 8) must report the same evaluation (41 dev examples, not a multiple of the global eval batch).
"""

import json
import os
import time
from pathlib import Path

import pytest
import yaml

import tuneloop
from conftest import MRPC, REPO
from tuneloop import notebook
from tuneloop.launch import LaunchError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb-data")
    out = root / "MRPC"
    out.mkdir()
    for name, lines in (("train.tsv", 65), ("dev.tsv", 42)):
        with open(MRPC / name, "rb") as src:
            (out / name).write_bytes(b"".join(src.readline() for _ in range(lines)))
    return out, root / "cache"


def settings(model_dir, data, out, **extra):
    data_dir, cache = data
    return dict(model=str(model_dir), data_dir=str(data_dir), cache_dir=str(cache), output_dir=str(out), epochs=2,
                learning_rate=1e-3, log_every=1, max_train_samples=17, max_length=48, eval_batch_size=6,
                mixed_precision="no", **extra)


def records(out, kind):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.fixture(autouse=True)
def _one_thread_each(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("nb-ref") / "one"
    return out, tuneloop.train(**settings(tiny_model_dir, data, out, batch_size=8))


def test_two_cpu_processes_from_python_give_the_metrics_of_one(tiny_model_dir, data, reference, tmp_path, capfd):
    assert not notebook.has_accelerators()  # this machine: CPU processes (gloo)
    ref_out, one = reference
    out = tmp_path / "two"
    config = tuneloop.Config.from_flags(**settings(tiny_model_dir, data, out, batch_size=2,
                                                   gradient_accumulation_steps=2))
    two = tuneloop.notebook_launch(config, num_processes=2)
    assert config.launch.num_processes is None  # the caller's config is left as it was, fit for train()
    printed = capfd.readouterr().out  # the processes write to the file descriptors they inherit
    assert "Launching training on 2 CPU processes." in printed
    assert printed.count("tuneloop: train=17") == 1 and "2 process(es) on cpu" in printed
    assert "global batch 8 = 2 per device x 2 x 2 accumulation | 6 optimizer steps" in printed
    assert two["num_examples"] == one["num_examples"] == 41
    assert (two["accuracy"], two["f1"]) == (one["accuracy"], one["f1"])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert [r["loss"] for r in records(out, "train")] == pytest.approx([r["loss"] for r in records(ref_out, "train")],
                                                                      rel=1e-5)
    assert yaml.safe_load((out / "config.yaml").read_text())["launch"]["num_processes"] == 2
    assert json.loads((out / "eval_results.json").read_text())["accuracy"] == two["accuracy"]


def test_a_process_that_raises_ends_the_launch_with_its_error(tiny_model_dir, data, tmp_path, monkeypatch):
    from tuneloop.guard import StepGuard

    check = StepGuard.check

    def failing(self, window_loss, step):  # forked processes inherit the patch
        if os.environ["RANK"] == "1" and step == 2:
            raise RuntimeError("process 1 broke")
        return check(self, window_loss, step)

    monkeypatch.setattr(StepGuard, "check", failing)
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        tuneloop.notebook_launch(num_processes=2, timeout=60, **settings(tiny_model_dir, data, tmp_path / "out",
                                                                          batch_size=4))
    assert time.monotonic() - start < 60
    assert str(info.value) == "process 1 of 2 failed: RuntimeError: process 1 broke"
    assert "in failing" in "".join(getattr(info.value, "__notes__", ["in failing"]))  # where it happened


def test_a_tuneloop_error_in_a_process_is_its_one_line(tiny_model_dir, data, tmp_path):
    (tmp_path / "file").write_text("")  # process 0 cannot create the output folder; process 1 waits for it
    with pytest.raises(LaunchError) as info:
        tuneloop.notebook_launch(num_processes=2, timeout=60, **settings(tiny_model_dir, data,
                                                                          tmp_path / "file" / "run"))
    assert str(info.value).startswith("process 0 of 2 failed: cannot write to output folder")
    assert not getattr(info.value, "__notes__", None)  # a tuneloop error is its one line, no traceback


def test_bad_settings_fail_before_any_process_starts(tiny_model_dir, data, reference):
    with pytest.raises(tuneloop.ConfigError, match="unknown option 'learning_rat' .did you mean 'learning_rate'"):
        tuneloop.notebook_launch(num_processes=2, learning_rat=1e-3)
    ref_out, _ = reference
    with pytest.raises(tuneloop.TuneloopError, match="already holds a run"):
        tuneloop.notebook_launch(num_processes=2, **settings(tiny_model_dir, data, ref_out))


def test_the_example_notebook_runs(tiny_model_dir, tmp_path, capfd):
    """examples/quickstart.ipynb, executed headlessly in a real kernel on a tiny model and a small slice."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    path = REPO / "examples" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    env = {"TUNELOOP_NB_MODEL": str(tiny_model_dir), "TUNELOOP_NB_DATA": str(MRPC), "TUNELOOP_NB_SAMPLES": "24",
           "TUNELOOP_NB_OUTPUT": str(tmp_path / "runs"), "PYTHONPATH": os.pathsep.join(
               [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                                ).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    outputs = {i: "".join(o.get("text", "") + json.dumps(o.get("data", {})) for o in c.get("outputs", []))
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "image/png" in text  # the learning curves, inline
    assert "'accuracy'" in text and "'label': " in text  # metrics and predictions
    for run in ("quickstart", "quickstart-2-processes"):
        assert (tmp_path / "runs" / run / "model" / "model.safetensors").exists()
    assert (tmp_path / "runs" / "saved-model" / "config.json").exists()
    # The forked processes draw their training bar as text: ipykernel drops widgets sent from a fork.
    launched = outputs[max(outputs)]
    assert "Launching training on 2 CPU processes." in launched and "train: 100%" in launched
    assert "application/vnd.jupyter.widget-view+json" not in launched
    assert "attempted to send message from fork" not in capfd.readouterr().err  # the kernel's own log
