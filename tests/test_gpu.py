"""On a CUDA GPU: bf16/fp16/tf32 training, fp16 overflow, the compiled path, no host sync between logging
steps, exact resume. Skipped without CUDA; benchmarks/gpu_check.sh runs them."""

from __future__ import annotations

import json

import pytest
import torch

import tuneloop
from conftest import small_config
from tuneloop.guard import StepGuard

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _config(model_dir, data_dir, out, **train):
    return small_config(model_dir, data_dir, out, **train)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _capture_run(monkeypatch):
    import tuneloop.recipe as recipe

    seen, real_loop = {}, recipe.train_loop

    def loop(run):
        seen["run"] = run
        return real_loop(run)

    monkeypatch.setattr(recipe, "train_loop", loop)
    return seen


@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32", "auto"])
def test_training_on_the_gpu(tiny_model_dir, mrpc_slice, tmp_path, monkeypatch, precision):
    seen = _capture_run(monkeypatch)
    out = tmp_path / precision
    results = tuneloop.train(_config(tiny_model_dir, mrpc_slice, out, mixed_precision=precision))
    run = seen["run"]
    assert run.accelerator.device.type == "cuda"
    expected = {"bf16": "bf16", "fp16": "fp16", "tf32": "no", "auto": "no"}[precision]  # auto: hidden 32 -> tf32
    assert run.accelerator.mixed_precision == expected
    if precision in ("tf32", "auto"):
        assert torch.backends.cuda.matmul.allow_tf32
        assert "mixed_precision: tf32" in (out / "config.yaml").read_text()
    losses = [r["loss"] for r in _records(out) if r["type"] == "train"]
    assert losses and all(isinstance(v, float) for v in losses) and 0 <= results["accuracy"] <= 1


def test_fp16_overflow_skips_the_update_and_keeps_the_schedule_aligned(tiny_model_dir, mrpc_slice, tmp_path,
                                                                       monkeypatch):
    import tuneloop.recipe as recipe

    seen = _capture_run(monkeypatch)
    applied = []
    real_build, real_check, real_after = recipe.build_model, StepGuard.check, StepGuard.after_step

    def build(*a, **k):
        model = real_build(*a, **k)
        forward, calls = model.forward, [0]

        def overflow_at_3(*fa, **fk):
            calls[0] += 1
            out = forward(*fa, **fk)
            if calls[0] == 3 and model.training:
                out.loss = out.loss * 1e30  # finite in fp32; its fp16 gradients overflow
            return out
        monkeypatch.setattr(model, "forward", overflow_at_3)
        return model

    def check(self, window_loss, step):
        self._before = [p.detach().clone() for p in self.optimizer.param_groups[0]["params"]]
        return real_check(self, window_loss, step)

    def after_step(self):
        applied.append(not all(torch.equal(a, p) for a, p in zip(self._before, self.optimizer.param_groups[0]["params"])))
        real_after(self)

    monkeypatch.setattr(recipe, "build_model", build)
    monkeypatch.setattr(StepGuard, "check", check)
    monkeypatch.setattr(StepGuard, "after_step", after_step)
    tuneloop.train(_config(tiny_model_dir, mrpc_slice, tmp_path / "run", mixed_precision="fp16"))
    run = seen["run"]
    total = run.num_training_steps
    assert applied[2] is False and applied[:2] == [True, True]
    inner = run.optimizer.optimizer
    assert {float(s["step"]) for s in inner.state.values()} == {float(sum(applied))}  # Adam counts applied updates
    assert run.scheduler.last_epoch == total and run.scheduler.get_last_lr()[0] == 0.0
    assert run.accelerator.scaler.get_scale() < 65536.0  # the scaler backed off


def test_compiled_with_cuda_graphs(tiny_model_dir, mrpc_slice, tmp_path, monkeypatch):
    seen = _capture_run(monkeypatch)
    eager = tuneloop.train(_config(tiny_model_dir, mrpc_slice, tmp_path / "eager", mixed_precision="tf32"))
    compiled = tuneloop.train(_config(tiny_model_dir, mrpc_slice, tmp_path / "graphs", mixed_precision="tf32",
                                      compile="reduce-overhead"))
    assert type(seen["run"].model).__name__ == "OptimizedModule"
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=5e-2)
    assert all(r["loss"] is not None for r in _records(tmp_path / "graphs") if r["type"] == "train")


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_no_host_sync_between_logging_steps(tiny_dropout_model_dir, mrpc_slice, tmp_path, monkeypatch, precision):
    real_check = StepGuard.check
    steps = []

    def check(self, window_loss, step):
        # From deciding step s to deciding step s + 1 nothing may wait for the GPU, unless s is a logging step.
        torch.cuda.set_sync_debug_mode("default")
        steps.append(step)
        keep = real_check(self, window_loss, step)
        if step % 5 != 0 and step != 16:
            torch.cuda.set_sync_debug_mode("error")
        return keep

    monkeypatch.setattr(StepGuard, "check", check)
    cfg = _config(tiny_dropout_model_dir, mrpc_slice, tmp_path / "run", mixed_precision=precision)
    cfg.checkpoint.checkpoint_every_epoch = False
    try:
        tuneloop.train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps == list(range(1, 17))  # 64 examples, batch 4


def test_resume_on_the_gpu_ends_with_the_same_metrics(tiny_dropout_model_dir, mrpc_slice, tmp_path, monkeypatch):
    full = tuneloop.train(_config(tiny_dropout_model_dir, mrpc_slice, tmp_path / "full", mixed_precision="bf16",
                                  epochs=2))
    seen = _capture_run(monkeypatch)
    real_check = StepGuard.check

    def check(self, window_loss, step):
        if step == 7:  # as if SIGTERM arrived during step 7 (epoch 1 of 2)
            seen["run"].stop.signal_name = "SIGTERM"
        return real_check(self, window_loss, step)

    monkeypatch.setattr(StepGuard, "check", check)
    cfg = _config(tiny_dropout_model_dir, mrpc_slice, tmp_path / "cut", mixed_precision="bf16", epochs=2)
    with pytest.raises(tuneloop.TuneloopError, match="after optimizer step 7"):
        tuneloop.train(cfg)
    monkeypatch.setattr(StepGuard, "check", real_check)
    cfg.checkpoint.resume = "latest"
    resumed = tuneloop.train(cfg)
    assert resumed["accuracy"] == full["accuracy"] and resumed["f1"] == full["f1"]
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-3)  # GPU kernels (embedding backward) add in any order
