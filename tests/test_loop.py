"""The loop's step: no host read between logging steps, device-side skipping of non-finite updates."""

from __future__ import annotations

import json
import traceback

import pytest
import torch

import tuneloop
from conftest import small_config
from tuneloop.guard import StepGuard

# Every way a tensor's value reaches Python (each one waits for the device to finish its queued work).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def _config(model_dir, data_dir, out, **train):
    return small_config(model_dir, data_dir, out, checkpoint_every_epoch=False, **train)


@pytest.mark.parametrize("precision, accumulation", [("no", 1), ("bf16", 2)])
def test_no_host_read_between_logging_steps(tiny_dropout_model_dir, mrpc_slice, tmp_path, monkeypatch,
                                            precision, accumulation):
    reads: list[str] = []
    marks: list[tuple[int, int]] = []  # (optimizer step, reads so far) when each step's update is decided

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            reads.append(f"{name} at {traceback.format_stack(limit=3)[0].strip()}")
            return real(self, *a, **k)
        return read

    def to(self, *a, **k):
        target = a[0] if a else k.get("device")
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu" and self.device.type != "cpu":
            reads.append("to(cpu)")
        return real_to(self, *a, **k)

    real_to, real_check = torch.Tensor.to, StepGuard.check

    def check(self, window_loss, step):
        marks.append((step, len(reads)))
        return real_check(self, window_loss, step)

    monkeypatch.setattr(StepGuard, "check", check)
    cfg = _config(tiny_dropout_model_dir, mrpc_slice, tmp_path / "run", mixed_precision=precision,
                  gradient_accumulation_steps=accumulation)
    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, counting(name))
        m.setattr(torch.Tensor, "to", to)
        tuneloop.train(cfg)
    steps = [s for s, _ in marks]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 8
    logging = {s for s in steps if s % 5 == 0} | {steps[-1]}
    # From deciding step s to deciding step s + 1: step s's update and bookkeeping, step s + 1's micro-batches.
    per_step = {s: b - a for (s, a), (_, b) in zip(marks, marks[1:])}
    assert all(per_step[s] == 0 for s in per_step if s not in logging), \
        (per_step, reads[marks[0][1]:marks[-1][1]][:10])
    assert all(per_step[s] > 0 for s in per_step if s in logging)  # the counter does see the reads that happen


def test_a_non_finite_step_stops_at_the_next_logging_step_without_applying_anything(tiny_model_dir, mrpc_slice,
                                                                                     tmp_path, monkeypatch):
    import tuneloop.recipe as recipe

    applied = []  # per optimizer step: did the weights change?
    real_build, real_check = recipe.build_model, StepGuard.check

    def build(*a, **k):
        model = real_build(*a, **k)
        forward = model.forward
        calls = [0]

        def nan_at_3(*fa, **fk):
            calls[0] += 1
            out = forward(*fa, **fk)
            if calls[0] == 3:
                out.loss = out.loss * float("nan")
            return out
        monkeypatch.setattr(model, "forward", nan_at_3)
        return model

    def check(self, window_loss, step):
        self._weights = [p.detach().clone() for p in self.optimizer.param_groups[0]["params"][:4]]
        return real_check(self, window_loss, step)

    def after_step(self):
        applied.append(not all(torch.equal(a, p) for a, p in zip(self._weights, self.optimizer.param_groups[0]["params"])))
        StepGuard.__dict__["_real_after"](self)

    monkeypatch.setattr(recipe, "build_model", build)
    monkeypatch.setattr(StepGuard, "check", check)
    monkeypatch.setattr(StepGuard, "_real_after", StepGuard.after_step, raising=False)
    monkeypatch.setattr(StepGuard, "after_step", after_step)
    out = tmp_path / "run"
    with pytest.raises(tuneloop.TuneloopError, match=r"NaN/infinite at optimizer step 3 \(epoch 1\).* Last good "
                                                     r"checkpoint: none"):
        tuneloop.train(_config(tiny_model_dir, mrpc_slice, out))
    # Read on logging step 5: steps 1-2 were applied, step 3 and everything after it was not.
    assert applied == [True, True, False, False, False]
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()  # no log line, no model


def test_skip_policy_skips_on_the_device_and_keeps_the_schedule_on_the_step_counter(tiny_model_dir, mrpc_slice,
                                                                                    tmp_path, monkeypatch):
    import tuneloop.recipe as recipe

    real_build = recipe.build_model
    seen = {}

    def build(*a, **k):
        model = real_build(*a, **k)
        forward = model.forward
        calls = [0]

        def nan_at_2_and_7(*fa, **fk):
            calls[0] += 1
            out = forward(*fa, **fk)
            if calls[0] in (2, 7):
                out.loss = out.loss * float("inf")
            return out
        monkeypatch.setattr(model, "forward", nan_at_2_and_7)
        seen["model"] = model
        return model

    real_loop = recipe.train_loop

    def loop(run):
        seen["run"] = run
        return real_loop(run)

    monkeypatch.setattr(recipe, "build_model", build)
    monkeypatch.setattr(recipe, "train_loop", loop)
    out = tmp_path / "run"
    tuneloop.train(_config(tiny_model_dir, mrpc_slice, out, nan_policy="skip"))
    run = seen["run"]
    total = run.num_training_steps
    inner = run.optimizer.optimizer
    assert all(g["fused"] for g in inner.param_groups)  # the device-side path is the one under test
    adam_steps = {float(s["step"]) for s in inner.state.values()}
    assert adam_steps == {total - 2}  # Adam's bias correction counts applied updates only
    assert run.scheduler.last_epoch == total and run.scheduler.get_last_lr()[0] == 0.0  # the schedule ends on time
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in train] == [(5, 1), (10, 2), (15, 2), (total, 2)][:len(train)]
    assert all(r["loss"] is not None for r in train)
    from safetensors.torch import load_file

    assert all(torch.isfinite(w).all() for w in load_file(str(out / "model" / "model.safetensors")).values())


def test_fused_adamw_skips_the_whole_update_when_found_inf_is_set():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(5)
    opt.step()
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    opt.found_inf, opt.grad_scale = torch.ones(()), None
    opt.step()
    assert torch.equal(p, before) and all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    opt.found_inf = torch.zeros(())
    opt.step()
    assert not torch.equal(p, before) and float(opt.state[p]["step"]) == 2.0


def test_under_loss_scaling_the_stop_policy_leaves_the_skip_to_the_scaler_for_every_later_step():
    class ScaledAccelerator:  # fp16 on a GPU: Accelerate's GradScaler decides the skip from the gradients
        num_processes, device, scaler = 1, torch.device("cpu"), object()

    p = torch.nn.Parameter(torch.zeros(2))
    guard = StepGuard(ScaledAccelerator(), torch.optim.AdamW([p], fused=True), "stop", steps_per_epoch=10)
    grads = []
    for step, loss in enumerate([1.0, float("nan"), 1.0], start=1):
        p.grad = torch.ones(2)
        guard.check(torch.tensor(loss, dtype=torch.float64), step)
        grads.append(p.grad.isnan().all().item())
        assert guard.apply_update and not hasattr(guard.optimizer, "found_inf")
    assert grads == [False, True, True]
    assert int(guard.first_bad) == 2 and int(guard.bad_steps) == 2
