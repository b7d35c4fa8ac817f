"""`tuneloop data`: what the training loop will see, before spending any compute on it."""

from __future__ import annotations

import numpy as np

from tuneloop.batching import plan_epoch
from tuneloop.labels import label_counts


def padding_share(lengths: list[int], batch_size: int, seed: int, group_by_length: bool,
                  pad_to_multiple_of: int | None = None) -> float:
    """Share of padding tokens in one epoch of dynamically padded batches."""
    real = padded = 0
    for batch in plan_epoch(lengths, batch_size, seed, 0, True, group_by_length):
        longest = max(lengths[i] for i in batch)
        if pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        real += sum(lengths[i] for i in batch)
        padded += longest * len(batch)
    return 1 - real / padded if padded else 0.0


def summarize(raw, tokenized, tokenizer, collator, config) -> str:
    lines = [f"task: {raw.task_name or 'custom'} | {'pairs' if raw.is_pair else 'single sentences'} | "
             f"{'regression' if raw.is_regression else f'{raw.num_labels} labels {raw.label_names}'}"
             f"{' (multi-label)' if raw.multi_label else ''} | "
             f"metrics: {', '.join(raw.metrics)}"]
    lines.append("splits:")
    for name, df in raw.splits.items():
        source = raw.sources.get(name, "")
        dropped = f", {raw.dropped[name]} unlabeled rows dropped" if raw.dropped.get(name) else ""
        line = f"  {name:<22} {len(df):>7} examples  ({source}{dropped})"
        if "label" in df.columns and not raw.is_regression:
            counts = label_counts(df["label"], raw.num_labels)  # multi-label: the examples carrying each label
            balance = ", ".join(f"{raw.label_names[i]}: {c} ({c / len(df):.1%})" for i, c in enumerate(counts) if c)
            line += f"\n  {'':<22} labels: {balance}"
        elif "label" in df.columns:
            line += f"\n  {'':<22} label mean {df['label'].mean():.3f}, std {df['label'].std():.3f}, " \
                    f"range [{df['label'].min():.3f}, {df['label'].max():.3f}]"
        else:
            line += "  (unlabeled)"
        lines.append(line)
    split = "train" if "train" in tokenized else next(iter(tokenized))
    ds = tokenized[split]
    example = ds[0]
    lines.append(f"first {split} example, decoded: {tokenizer.decode(example['input_ids'])}")
    if "labels" in example:
        label = example["labels"]
        if raw.is_regression:
            lines.append(f"  label: {label}")
        else:
            named = [n for n, v in zip(raw.label_names, label) if v] if raw.multi_label else raw.label_names[int(label)]
            lines.append(f"  label: {label} ({named})")
    batch = collator([ds[i] for i in range(min(config.train.batch_size, len(ds)))])
    lines.append("one batch: " + ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
                                           for k, v in batch.items()))
    lengths = ds["length"]
    p = np.percentile(lengths, [50, 90, 95, 99, 100])
    truncated = sum(1 for n in lengths if n >= config.data.max_length)
    lines.append(f"{split} token lengths: p50 {p[0]:.0f}, p90 {p[1]:.0f}, p95 {p[2]:.0f}, p99 {p[3]:.0f}, "
                 f"max {p[4]:.0f}; {truncated} example(s) truncated at max_length {config.data.max_length}")
    if "doc" in ds.column_names:
        from tuneloop.chunking import chunk_summary

        c = chunk_summary(ds["doc"])
        lines.append(f"long_text chunk (stride {config.data.stride}): {c['windows']} windows of at most "
                     f"{config.data.max_length} tokens for {len(set(ds['doc']))} documents; windows per document: "
                     f"mean {c['windows_per_document']['mean']}, max {c['windows_per_document']['max']}")
    for grouped in (False, True):
        share = padding_share(lengths, 8, config.train.seed, grouped, config.data.pad_to_multiple_of)
        lines.append(f"padding share of a batch-size-8 epoch{' grouped by length' if grouped else ''}: {share:.1%}")
    return "\n".join(lines)
