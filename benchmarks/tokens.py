"""Counting what a row trained on: samples, real (non-padding) tokens, padded tokens, sum of squared lengths.

Rows (a) and (b) count in-process with `TokenCounter`, a wrapper around their data collator (the batch
the model gets is exactly what the collator returns). tuneloop rows run as the real CLI, so their counts
come from tuneloop's own batch plan (`tuneloop.batching.plan_epoch`), replayed here on the lengths of
tuneloop's tokenisation of the same data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence


@dataclass
class TokenCounts:
    samples: int = 0
    real_tokens: int = 0  # attention-mask ones: what the model was actually asked to learn from
    padded_tokens: int = 0  # batch size x padded length, summed over batches: what it computed on
    sum_sq_len: int = 0  # sum over examples of real_length**2, for the attention FLOPs term
    batches: int = 0

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def add_batch(self, lengths: Sequence[int], padded_length: int) -> None:
        self.samples += len(lengths)
        self.real_tokens += int(sum(lengths))
        self.padded_tokens += len(lengths) * int(padded_length)
        self.sum_sq_len += int(sum(int(n) * int(n) for n in lengths))
        self.batches += 1

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "padding_share": self.padding_share}


class TokenCounter:
    """A collator wrapper that counts the batches it builds while `counting` is true (switch it off
    before evaluation: the HF Trainer uses one collator for training and evaluation)."""

    def __init__(self, collator):
        self.collator = collator
        self.counts = TokenCounts()
        self.counting = True

    def __call__(self, features):
        batch = self.collator(features)
        if self.counting:
            mask = batch["attention_mask"]
            self.counts.add_batch(mask.sum(dim=1).tolist(), mask.shape[1])
        return batch


def padded_length(lengths: Sequence[int], padding: str = "longest", max_length: int = 128,
                  pad_to_multiple_of: int | None = None) -> int:
    """The length `DataCollatorWithPadding` pads a batch to (tuneloop's `data.padding` options)."""
    if padding == "max_length":
        return max_length
    n = max(lengths)
    if pad_to_multiple_of:
        n = math.ceil(n / pad_to_multiple_of) * pad_to_multiple_of
    return n


def plan_counts(lengths: Sequence[int], batch_size: int, seed: int, epochs: int, group_by_length: bool,
                padding: str = "longest", max_length: int = 128, pad_to_multiple_of: int | None = None,
                accumulation: int = 1) -> tuple[TokenCounts, list[int]]:
    """Counts of a single-process tuneloop run, from its batch plan; also the samples of each optimizer
    step (to turn the per-interval samples/s in metrics.jsonl back into seconds)."""
    from tuneloop.batching import plan_epoch

    counts, step_samples = TokenCounts(), []
    for epoch in range(epochs):
        plan = plan_epoch(lengths, batch_size, seed, epoch, shuffle=True, group_by_length=group_by_length)
        for batch in plan:
            batch_lengths = [lengths[i] for i in batch]
            counts.add_batch(batch_lengths, padded_length(batch_lengths, padding, max_length, pad_to_multiple_of))
        # An optimizer step takes `accumulation` micro-batches; an epoch's short last window still steps.
        step_samples += [sum(len(b) for b in plan[i: i + accumulation]) for i in range(0, len(plan), accumulation)]
    return counts, step_samples
