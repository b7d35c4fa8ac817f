"""Non-finite losses and stop signals, decided without reading the device at every optimizer step.

A GPU runs ahead of Python only while Python never waits for a tensor's value. So each optimizer step
only *marks* a non-finite loss, in a flag on the device, and the skip happens there too: PyTorch's fused
Adam/AdamW read `optimizer.found_inf` (the hook GradScaler uses) and, when it is 1, leave the weights,
the moments and Adam's step counter untouched inside the kernel. The count of skipped steps and the
first bad step also stay on the device; the host reads them, together with every process's stop signal,
in one small reduction on logging steps, before checkpoints and at epoch ends (`StepGuard.read`).

Where that hook is not available the update is still never applied with a bad loss:
- fp16 with loss scaling: Accelerate's GradScaler owns `found_inf` and skips any step whose gradients
  are non-finite, which a non-finite loss makes them (under nan_policy stop, the steps after the bad one
  get NaN gradients so that they are skipped too);
- an optimizer without the fused kernel: the flag is read at once (one host sync per step).

The learning-rate schedule follows the optimizer step counter and is stepped on skipped steps too: the
schedule then ends where it should at the last step whatever was skipped, every process agrees on it
without a sync, and a resumed run replays it exactly.
"""

from __future__ import annotations

import torch

from tuneloop.errors import TuneloopError

NO_STEP = 2**62  # "no bad step yet": larger than any step number, exact in int64


class NonFiniteLoss(TuneloopError):
    """The loss became NaN or infinite and nan_policy is `stop`."""


def inner_optimizer(optimizer):
    """The torch optimizer inside Accelerate's wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step()` honours `optimizer.found_inf` (PyTorch's fused Adam and AdamW do)."""
    inner = inner_optimizer(optimizer)
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and \
        all(group.get("fused") for group in inner.param_groups)


class StepGuard:
    """Per-step non-finite checks on the device; `read` brings counts and stop signals to the host."""

    def __init__(self, accelerator, optimizer, nan_policy: str, steps_per_epoch: int):
        self.accelerator, self.nan_policy, self.steps_per_epoch = accelerator, nan_policy, steps_per_epoch
        self.optimizer = inner_optimizer(optimizer)
        self.scaled = getattr(accelerator, "scaler", None) is not None  # fp16: GradScaler decides the skip
        self.on_device = skips_on_device(optimizer)
        device = accelerator.device
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)  # since the last read
        self.first_bad = torch.full((), NO_STEP, dtype=torch.int64, device=device)
        self.halted = torch.zeros((), dtype=torch.float32, device=device)  # nan_policy stop: skip all from here on
        self.apply_update = True

    def check(self, window_loss: torch.Tensor, step: int) -> torch.Tensor:
        """Mark optimizer step `step` (1-based) bad if its loss is non-finite on any process; arm the skip.

        Returns 1.0 (keep) or 0.0 (skipped) on the device, for the loss bookkeeping."""
        bad = (~torch.isfinite(window_loss)).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "max")  # a device collective, not a host read
        if self.nan_policy == "stop":  # nothing after the first bad step is applied before the read raises
            bad = torch.maximum(bad, self.halted)
            self.halted = bad
        self.bad_steps += bad.long()
        self.first_bad = torch.minimum(self.first_bad, step + (1 - bad.long()) * NO_STEP)
        if self.scaled:  # GradScaler skips steps with non-finite gradients; under `stop`, NaN gradients make it
            if self.nan_policy == "stop":  # skip every step from the bad one on
                grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, torch.where(bad > 0, float("nan"), 1.0))
            self.apply_update = True
        elif self.on_device:
            self.optimizer.found_inf = bad  # read by the fused kernel, float32 0/1 on the parameters' device
            self.optimizer.grad_scale = None
            self.apply_update = True
        else:
            self.apply_update = not bool(bad)  # fallback: one host read per step
        return 1.0 - bad

    def after_step(self) -> None:
        for name in ("found_inf", "grad_scale"):
            if name in vars(self.optimizer):
                delattr(self.optimizer, name)

    def read(self, run) -> bool:
        """Counts since the last read, agreed by all processes; raises NonFiniteLoss under nan_policy stop.

        Returns whether every process is to stop for a signal (SIGTERM/Ctrl-C on any of them)."""
        stop = torch.tensor(float(run.stop.requested), device=self.bad_steps.device, dtype=torch.float64)
        flags = torch.stack([self.bad_steps.double(), -self.first_bad.double(), stop])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, "max")
        bad_steps, first_bad, stop = flags.tolist()
        first_bad = int(-first_bad)
        self.bad_steps.zero_()
        self.first_bad.fill_(NO_STEP)
        run.state.skipped_steps += int(bad_steps)
        if bad_steps and self.nan_policy == "stop":
            from tuneloop.checkpoint import latest_checkpoint

            epoch = (first_bad - 1) // self.steps_per_epoch + 1
            raise NonFiniteLoss(f"the loss became NaN/infinite at optimizer step {first_bad} (epoch {epoch}); its "
                                f"update and any later one were not applied. Lower the learning rate, check the data, "
                                f"or set --train.nan_policy skip. Last good checkpoint: {latest_checkpoint(run) or 'none'}")
        if stop and not run.stop.requested:
            run.stop.signal_name = "a signal on another process"
        return bool(stop)
