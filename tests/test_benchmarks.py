"""The benchmark's arithmetic: FLOPs, MFU, token counting, batch-plan replay and tuneloop timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import tuneloop_train_seconds  # noqa: E402
from benchmarks.flops import mfu, non_embedding_params, training_flops  # noqa: E402
from benchmarks.tokens import TokenCounter, padded_length, plan_counts  # noqa: E402


def test_non_embedding_params_of_a_small_bert():
    from transformers import BertConfig, BertForSequenceClassification

    L, H, I, V, P = 2, 32, 64, 100, 40
    config = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=2, intermediate_size=I,
                        max_position_embeddings=P, type_vocab_size=2, num_labels=2)
    model = BertForSequenceClassification(config)
    per_layer = 4 * (H * H + H) + (H * I + I) + (I * H + H) + 2 * 2 * H  # q,k,v,o; FFN in, out; 2 LayerNorms
    expected = 2 * H + L * per_layer + (H * H + H) + (H * 2 + 2)  # embedding LayerNorm, layers, pooler, classifier
    assert non_embedding_params(model) == expected
    assert sum(p.numel() for p in model.parameters()) - expected == (V + P + 2) * H


def test_training_flops_and_mfu_for_a_known_config():
    # MiniLM-L6 shape: 6 layers, hidden 384; 10 M non-embedding parameters; two examples of 50 and 30 tokens.
    flops = training_flops(10_000_000, 6, 384, real_tokens=80, sum_sq_len=50 ** 2 + 30 ** 2)
    assert flops == 6 * 10_000_000 * 80 + 12 * 6 * 384 * (2500 + 900)
    assert mfu(flops, seconds=2.0, peak_flops_per_second=flops) == pytest.approx(0.5)


def test_token_counter_counts_only_while_counting():
    def collate(features):
        n = max(len(f) for f in features)
        return {"attention_mask": torch.tensor([[1] * len(f) + [0] * (n - len(f)) for f in features])}

    counter = TokenCounter(collate)
    counter([[1, 2, 3], [1]])
    counter.counting = False
    counter([[1, 2, 3, 4, 5]])
    c = counter.counts
    assert (c.samples, c.real_tokens, c.padded_tokens, c.sum_sq_len, c.batches) == (2, 4, 6, 10, 1)
    assert c.padding_share == pytest.approx(1 / 3)


def test_padded_length_follows_the_collator_options():
    assert padded_length([3, 7]) == 7
    assert padded_length([3, 7], pad_to_multiple_of=8) == 8
    assert padded_length([3, 7], padding="max_length", max_length=128) == 128


def test_plan_counts_replays_tuneloops_batch_plan():
    from tuneloop.batching import plan_epoch

    lengths = [5, 9, 2, 7, 3]
    counts, step_samples = plan_counts(lengths, batch_size=2, seed=0, epochs=2, group_by_length=False)
    assert step_samples == [2, 2, 1, 2, 2, 1]
    assert counts.samples == 10 and counts.real_tokens == 2 * sum(lengths)
    expected_padded = sum(len(b) * max(lengths[i] for i in b)
                          for e in range(2) for b in plan_epoch(lengths, 2, 0, e, shuffle=True))
    assert counts.padded_tokens == expected_padded
    _, windows = plan_counts(lengths, batch_size=2, seed=0, epochs=1, group_by_length=False, accumulation=2)
    assert windows == [4, 1]


def test_tuneloop_train_seconds_removes_epoch_end_evaluation():
    step_samples = [8] * 6  # 2 epochs of 3 steps, logged every 2 steps and at the last
    records = [
        {"type": "train", "step": 2, "samples_per_second": 16.0},  # 1 s
        {"type": "eval", "step": 3},
        {"type": "train", "step": 4, "samples_per_second": 4.0},  # 4 s, of which the evaluation is 3 s
        {"type": "train", "step": 6, "samples_per_second": 16.0},  # 1 s
        {"type": "eval", "step": 6},
    ]
    timing = tuneloop_train_seconds(records, step_samples)
    assert timing["train_seconds_raw"] == pytest.approx(6.0)
    assert timing["train_seconds"] == pytest.approx(3.0)
    assert timing["eval_seconds_removed"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        tuneloop_train_seconds(records[:3], step_samples)


def test_tiny_rows_ratio_and_table_name_the_device():
    from benchmarks.bench import markdown_table, precision_label, ratios

    row = dict(runs_ok=1, samples_per_second=10.0, real_tokens_per_second=500.0, padding_share=0.1, train_seconds=2.0,
               seconds_per_step=0.02, wall_seconds=9.0, peak_rss_mb=600.0, accuracy=0.7, f1=0.8, mfu=0.01,
               precision="fp32", accuracy_std=0.0, f1_std=0.0)
    summary = {"e": row, "f": {**row, "seconds_per_step": 0.015}}
    assert ratios(summary) == {"f_over_e_seconds_per_step": pytest.approx(0.75)}
    table = markdown_table(summary, False, "NVIDIA H200")
    assert table.startswith("Device: NVIDIA H200") and "| 20.0 |" in table and "| 15.0 |" in table
    assert precision_label("no", None) == "fp32" and precision_label("tf32", None) == "tf32"
    assert precision_label("bf16", None) == "bf16"


def test_matmul_peak_reports_its_device_and_precision():
    from benchmarks.flops import matmul_peak

    before = torch.get_float32_matmul_precision()
    peak = matmul_peak("fp32", n=64, reps=2, warmup=1)
    assert peak["device"] == "cpu" and peak["dtype"] == "fp32" and peak["peak_flops_per_second"] > 0
    assert matmul_peak("tf32", n=64, reps=2, warmup=1)["dtype"] == "tf32"
    assert torch.get_float32_matmul_precision() == before  # the tf32 setting does not leak


def test_efficiency_plan_runs_every_row_once_before_more_seeds():
    from benchmarks.efficiency import parse_args, plan, trainable_parameters

    steps = plan(parse_args(["--seeds", "0,1,2"]))
    assert steps[:7] == [("full", 0), ("predict", 0), ("lora", 0), ("lora_plus", 0), ("adalora", 0), ("full_8bit", 0),
                         ("full", 1)]
    assert steps[7:] == [("lora", 1), ("full", 2), ("lora", 2)]
    line = "... | 1377 optimizer steps | peft lora: trainable 338,306 of 23,051,266 parameters (1.47%)"
    assert trainable_parameters(line) == {"trainable_params": 338306, "total_params": 23051266}


def test_efficiency_extra_rows_come_from_flags_and_run_on_the_first_seed():
    from benchmarks import efficiency

    args = efficiency.parse_args(["--rows", "lora,probe_r16", "--seeds", "0,1", "--no-predict",
                                  "--row", "probe_r16=--config lora --lora-rank 16 --lora-alpha 32"])
    assert args.train_rows["probe_r16"] == (["--config", "lora", "--lora-rank", "16", "--lora-alpha", "32"], "first")
    assert efficiency.plan(args) == [("lora", 0), ("probe_r16", 0), ("lora", 1)]  # named twice, run once
    assert "probe_r16" not in efficiency.TRAIN_ROWS  # nothing left behind for the next parse
    with pytest.raises(SystemExit):
        efficiency.parse_args(["--row", "lora=--lora-rank 4"])  # an existing name
    with pytest.raises(SystemExit):
        efficiency.parse_args(["--rows", "lora,nope"])
    assert efficiency.plan(efficiency.parse_args(["--predict-only", "some/model"])) == []  # no training at all


def _run(row, seed, acc, ok=True):
    return {"row": row, "seed": seed, "returncode": 0 if ok else 1, "dev": {"accuracy": acc}}


def test_fast_recipe_seed_table_means_sds_and_failed_seeds():
    from benchmarks.fast_recipe import seed_table

    runs = [_run("a", 3, 0.80), _run("a", 4, 0.82), _run("i", 3, 0.83), _run("i", 4, 0.0, ok=False)]
    table, stats = seed_table(runs, ["a", "i"], [3, 4])
    assert stats["a"]["mean"] == pytest.approx(0.81) and stats["a"]["sd"] == pytest.approx(0.0141421, rel=1e-4)
    assert stats["i"] == {"accuracy": {3: 0.83}, "mean": 0.83, "sd": None}  # a failed seed is not a zero
    lines = table.splitlines()
    assert lines[0] == "| row | seed 3 | seed 4 | mean | sd |"
    assert lines[2] == "| a: course loop (reference) | 0.800 | 0.820 | 0.810 | 0.014 |"
    assert lines[3] == "| i: tuneloop, default recipe, fp32 | 0.830 | failed | 0.830 |  |"


def test_fast_recipe_targets_from_summaries():
    from benchmarks.fast_recipe import FP32_TARGETS, accuracy_targets, ratio_lines, rows_for, speed_ratios

    summary = {"a": {"runs_ok": 1, "samples_per_second": 10.0, "wall_seconds": 100.0},
               "h": {"runs_ok": 1, "samples_per_second": 21.0, "wall_seconds": 60.0},
               "i": {"runs_ok": 1, "samples_per_second": 40.0, "wall_seconds": 40.0}}
    ratios = speed_ratios(summary)
    assert ratios == {"h_over_a_samples_per_second": 2.1, "i_over_a_wall_seconds": 0.4}
    assert ratio_lines(ratios, FP32_TARGETS) == [
        "- PASS  fp32: course hparams samples/s >= 2.0x course loop: 2.100 (target >= 2.0)",
        "- FAIL  fp32: --config fast wall <= 35% of course loop: 0.400 (target <= 0.35)"]
    stats = {"a": {"mean": 0.80, "sd": 0.02}, "i": {"mean": 0.815, "sd": 0.01}}
    assert [line[:6] for line in accuracy_targets(stats, "i")] == ["- PASS", "- PASS"]
    stats["i"]["mean"] = 0.805  # only half a point better
    assert accuracy_targets(stats, "i")[0].startswith("- FAIL")
    assert rows_for("fp32") == ["a", "h", "i"] and rows_for("bf16") == ["a", "h", "i", "c", "d"]


def test_fast_recipe_tiny_mode_defaults_to_one_checking_seed():
    from benchmarks.fast_recipe import parse_args

    tiny = parse_args(["--tiny"])
    assert (tiny.seeds, tiny.epochs, tiny.max_train_samples) == ("3", 1, 256)
    assert parse_args(["--tiny", "--seeds", "0,1"]).seeds == "0,1"
    assert parse_args([]).seeds == "3,4,5,6,7"


def test_data_problems_hides_the_evidence_past_the_first_window_and_subsamples_positives():
    from benchmarks import data_problems as dp
    from tuneloop.model import build_tokenizer

    tok = build_tokenizer(None)
    docs = dp.long_documents(20, "dev", 0, tok)
    sst = dp.read_tsv(dp.GLUE / "SST-2" / "dev.tsv").sample(20, random_state=0)
    for text, sentence, label in zip(docs["text"], sst["sentence"], sst["label"]):
        before = text[: text.index(sentence.strip())]
        assert len(tok(before, add_special_tokens=False)["input_ids"]) >= 128  # truncation at 128 never sees it
        assert (label == "1") == (docs["label"][docs["text"] == text].item() == "positive")
    full, sub = dp.mrpc_frame("train"), dp.imbalanced_train(0)
    n_pos = (full["label"] == "equivalent").sum()
    assert (sub["label"] == "equivalent").sum() == round(0.1 * n_pos)
    assert (sub["label"] == "not_equivalent").sum() == (full["label"] == "not_equivalent").sum()
