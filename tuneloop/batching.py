"""The training batch plan: which examples form each batch of an epoch, on which process, from where.

The plan for an epoch is a pure function of (seed, epoch): a seeded permutation, optionally grouped
by length, cut into the examples of each optimizer step (`batch_size x num_processes x
accumulation_steps`, the last one shorter), each cut into micro-batches of `batch_size x
num_processes` and each of those split into one part per process. Because the examples of an
optimizer step do not depend on how they are split, N processes with batch B and accumulation K
take exactly the optimizer steps of one process with batch N x K x B. Because the plan is recomputed
rather than replayed, resuming in the middle of an epoch is constant time: start at batch `start`.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

MEGA_BATCH_FACTOR = 50  # batches per length-sorted mega-batch (as the HF Trainer's group_by_length)


def plan_epoch(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
               group_by_length: bool = False) -> list[list[int]]:
    """All batches of one epoch, for all processes together; every example exactly once."""
    n = len(lengths)
    if not shuffle:
        order = list(range(n))
        return [order[i: i + batch_size] for i in range(0, n, batch_size)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if not group_by_length:
        return [order[i: i + batch_size] for i in range(0, n, batch_size)]
    # Sort each random mega-batch by length so a batch holds similar lengths (little padding),
    # then shuffle the batches so the model does not see lengths in order. The one short batch stays
    # last, as without grouping: with accumulation, only the epoch's last optimizer step is short.
    mega = batch_size * MEGA_BATCH_FACTOR
    batches = []
    for i in range(0, n, mega):
        chunk = sorted(order[i: i + mega], key=lambda j: -lengths[j])
        batches.extend(chunk[k: k + batch_size] for k in range(0, len(chunk), batch_size))
    short = batches[-1:] if batches and len(batches[-1]) < batch_size else []
    full = batches[: len(batches) - len(short)]
    perm = torch.randperm(len(full), generator=g).tolist()
    return [full[p] for p in perm] + short


def split_batch(batch: list[int], num_processes: int) -> list[list[int]]:
    """One global batch cut into `num_processes` consecutive parts whose sizes differ by at most one."""
    size, extra = divmod(len(batch), num_processes)
    parts, i = [], 0
    for p in range(num_processes):
        n = size + (1 if p < extra else 0)
        parts.append(batch[i: i + n])
        i += n
    return parts


class EpochBatchSampler:
    """A batch sampler for the train DataLoader: this process's share of the epoch's plan.

    Every process runs the same number of micro-batches and no example is repeated. Where a short
    last micro-batch has fewer examples than processes, a process gets a one-example filler batch
    whose real size (`local_sizes`) is 0: the loop gives it zero weight.
    `select_epoch(epoch, start)` selects the epoch and skips `start` of this process's batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 group_by_length: bool = False, num_processes: int = 1, process_index: int = 0,
                 accumulation_steps: int = 1):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.num_processes = num_processes
        self.process_index = process_index
        self.accumulation_steps = accumulation_steps
        self.epoch = 0
        self.start = 0

    # Deliberately not named `set_epoch`: Accelerate's DataLoaderShard calls `set_epoch` with its own
    # iteration counter on every pass, which would reset the epoch and the resume position.
    def select_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def step_size(self) -> int:
        """Examples per optimizer step: the global batch."""
        return self.batch_size * self.num_processes * self.accumulation_steps

    def windows(self) -> list[list[int]]:
        """The examples of each optimizer step, all processes together; every example exactly once."""
        return plan_epoch(self.lengths, self.step_size, self.seed, self.epoch, self.shuffle, self.group_by_length)

    def global_plan(self) -> list[list[int]]:
        """The epoch's micro-batches, all processes together (a short last window has fewer)."""
        micro = self.batch_size * self.num_processes
        return [w[i: i + micro] for w in self.windows() for i in range(0, len(w), micro)]

    def local_plan(self) -> list[list[int]]:
        plan = self.global_plan()
        parts = [split_batch(b, self.num_processes)[self.process_index] for b in plan]
        return [part or b[:1] for part, b in zip(parts, plan)]

    def local_sizes(self) -> list[int]:
        """Real examples in each of this process's batches (0 for a filler batch)."""
        return [len(split_batch(b, self.num_processes)[self.process_index]) for b in self.global_plan()]

    def window_sizes(self) -> list[int]:
        """Examples in each optimizer step's window, summed over all processes (for loss weighting)."""
        return [len(w) for w in self.windows()]

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.step_size)
        return full * self.accumulation_steps + math.ceil(rest / (self.batch_size * self.num_processes))

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.local_plan()[self.start:]
