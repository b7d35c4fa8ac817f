"""The training batch plan: which examples form each batch of an epoch, on which process, from where.

The plan for an epoch is a pure function of (seed, epoch): a seeded permutation, optionally grouped
by length, cut into batches, and dealt round-robin to the processes. Because it is recomputed rather
than replayed, resuming in the middle of an epoch is constant time: start at batch `start`.
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
    # then shuffle the batches so the model does not see lengths in order.
    mega = batch_size * MEGA_BATCH_FACTOR
    batches = []
    for i in range(0, n, mega):
        chunk = sorted(order[i: i + mega], key=lambda j: -lengths[j])
        batches.extend(chunk[k: k + batch_size] for k in range(0, len(chunk), batch_size))
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[p] for p in perm]


class EpochBatchSampler:
    """A batch sampler for the train DataLoader: this process's share of the epoch's plan.

    The global plan is padded (by repeating its first batches) to a multiple of `num_processes`
    so every process runs the same number of steps; process `p` takes batches p, p+N, p+2N, ...
    `select_epoch(epoch, start)` selects the epoch and skips `start` of this process's batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 group_by_length: bool = False, num_processes: int = 1, process_index: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.num_processes = num_processes
        self.process_index = process_index
        self.epoch = 0
        self.start = 0

    # Deliberately not named `set_epoch`: Accelerate's DataLoaderShard calls `set_epoch` with its own
    # iteration counter on every pass, which would reset the epoch and the resume position.
    def select_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def global_plan(self) -> list[list[int]]:
        plan = plan_epoch(self.lengths, self.batch_size, self.seed, self.epoch, self.shuffle, self.group_by_length)
        extra = (-len(plan)) % self.num_processes
        return plan + plan[:extra]

    def local_plan(self) -> list[list[int]]:
        return self.global_plan()[self.process_index:: self.num_processes]

    def window_sizes(self, accumulation_steps: int) -> list[int]:
        """Examples in each optimizer step's window, summed over all processes (for loss weighting)."""
        plan = self.global_plan()
        per_window = accumulation_steps * self.num_processes
        return [sum(len(b) for b in plan[i: i + per_window]) for i in range(0, len(plan), per_window)]

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.lengths) / self.batch_size) / self.num_processes)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.local_plan()[self.start:]
