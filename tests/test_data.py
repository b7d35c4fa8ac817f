import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import MRPC, SST2
from tuneloop.config import DataConfig
from tuneloop.data import Collator, load_raw, read_glue_tsv, tokenize_splits
from tuneloop.errors import DataError
from tuneloop.tasks import TASKS


def test_real_mrpc_files_bom_quotes_and_unlabeled_test():
    raw = load_raw(DataConfig(task="mrpc", data_dir=str(MRPC)))
    assert {k: len(v) for k, v in raw.splits.items()} == {"train": 3668 - 1, "validation": 408, "test": 1725}
    train = raw.splits["train"]
    # The header's BOM is gone and the label column was found; quotes stay part of the sentence.
    assert train["label"].tolist()[:2] == [1, 0]
    assert train["text"][0].startswith("Amrozi accused his brother , whom he called \" the witness \"")
    assert "label" not in raw.splits["test"].columns
    assert raw.label_names == ["not_equivalent", "equivalent"] and raw.metrics == ("accuracy", "f1")


def test_real_sst2_single_sentences():
    raw = load_raw(DataConfig(task="sst2", data_dir=str(SST2), max_train_samples=100))
    assert len(raw.splits["train"]) == 100 and len(raw.splits["validation"]) == 872
    assert "text_pair" not in raw.splits["train"].columns and not raw.is_pair
    assert set(raw.splits["validation"]["label"]) == {0, 1}


def test_cola_without_header(tmp_path):
    rows = ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tOne more pseudo generalization."]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.tsv").write_text("index\tsentence\n0\tBill whistled past the house.\n")
    raw = load_raw(DataConfig(task="cola", data_dir=str(tmp_path)))
    assert raw.splits["train"]["text"].tolist()[0] == "Our friends won't buy this analysis."
    assert raw.splits["train"]["label"].tolist() == [1, 0]
    assert raw.main_metric == "matthews_correlation"


def test_stsb_float_labels_regression(tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n" \
           "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays a flute.\tA man plays guitar.\t1.600\n"
    for f in ("train.tsv", "dev.tsv"):
        (tmp_path / f).write_text(head + rows)
    raw = load_raw(DataConfig(task="stsb", data_dir=str(tmp_path)))
    assert raw.is_regression and raw.num_labels == 1
    assert raw.splits["train"]["label"].tolist() == pytest.approx([5.0, 1.6])
    assert raw.metrics == ("pearson", "spearman")


def test_mnli_matched_and_mismatched(tmp_path):
    cols = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2",
            "label1", "gold_label"]
    def write(name, labels):
        lines = ["\t".join(cols)] + [
            "\t".join([str(i), "1", "1", "fiction", "", "", "", "", f"premise {i}", f"hypothesis {i}", lab, lab])
            for i, lab in enumerate(labels)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    write("train.tsv", ["entailment", "neutral", "contradiction"])
    write("dev_matched.tsv", ["neutral", "entailment"])
    write("dev_mismatched.tsv", ["contradiction"])
    raw = load_raw(DataConfig(task="mnli", data_dir=str(tmp_path)))
    assert raw.eval_splits == ["validation_matched", "validation_mismatched"]
    assert raw.splits["train"]["label"].tolist() == [0, 1, 2]
    assert raw.splits["validation_mismatched"]["label"].tolist() == [2]


def _frame():
    return pd.DataFrame({"q": ["good film", "bad film", "fine film", "awful"],
                         "sentiment": ["pos", "neg", "pos", "neg"]})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_user_files_every_format_with_string_labels(tmp_path, suffix):
    df = _frame()
    path = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    raw = load_raw(DataConfig(task=None, train_file=str(path), validation_file=str(path),
                              text_columns=["q"], label_column="sentiment"))
    assert raw.label_names == ["neg", "pos"]
    assert raw.splits["train"]["label"].tolist() == [1, 0, 1, 0]
    assert raw.splits["train"]["text"].tolist() == df["q"].tolist()


def test_user_pairs_and_regression_inferred(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"sentence1": f"a{i}", "sentence2": f"b{i}", "label": i / 4}) for i in range(4)))
    raw = load_raw(DataConfig(task=None, train_file=str(path)))
    assert raw.is_pair and raw.is_regression and raw.metrics == ("pearson", "spearman")


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "train file not found"),
    (lambda p: p.write_text("q,other\nx,1\n"), "missing label column 'sentiment'"),
    (lambda p: p.write_text("text,sentiment\n"), "train split is empty"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00bad,\x00"), "cannot read train file"),
])
def test_bad_user_files(tmp_path, make, message):
    path = tmp_path / "train.csv"
    make(path)
    with pytest.raises(DataError, match=message):
        load_raw(DataConfig(task=None, train_file=str(path), text_columns=["q"] if "q," in (path.read_text(errors="ignore") if path.exists() else "") else None,
                            label_column="sentiment"))


def test_missing_text_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("a,label\nx,1\ny,0\n")
    with pytest.raises(DataError, match=r"missing text column\(s\) \['sentence'\]"):
        load_raw(DataConfig(task=None, train_file=str(path), text_columns=["sentence"]))


def test_validation_label_outside_training_set(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nx,pos\ny,neg\n")
    (tmp_path / "dev.csv").write_text("text,label\nz,meh\n")
    with pytest.raises(DataError, match=r"validation: label 'meh' is not in the label set \['neg', 'pos'\]"):
        load_raw(DataConfig(task=None, train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "dev.csv")))


def test_glue_label_outside_task_set(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nnice\t1\nodd\t7\n")
    with pytest.raises(DataError, match="label '7' is not in the label set"):
        load_raw(DataConfig(task="sst2", data_dir=str(tmp_path)))


def test_missing_data_dir_and_hub_offline(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        load_raw(DataConfig(task="mrpc", data_dir=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="--data-dir .*MRPC or --train-file"):
        load_raw(DataConfig(task="mrpc"))


def test_tokenisation_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(task="mrpc", data_dir=str(MRPC), max_train_samples=40, max_eval_samples=20, max_length=32,
                     cache_dir=str(tmp_path / "cache"))
    raw = load_raw(cfg)
    first = tokenize_splits(raw, tok, cfg)
    assert max(first["train"]["length"]) <= 32
    calls = []
    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    second = tokenize_splits(raw, tok, cfg)
    assert not calls and second["train"]["input_ids"] == first["train"]["input_ids"]
    # A different max_length is a different cache entry.
    monkeypatch.undo()
    third = tokenize_splits(raw, tok, DataConfig(**{**cfg.__dict__, "max_length": 16}))
    assert max(third["train"]["length"]) <= 16


def test_collator_pads_dynamically_and_to_multiple(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    feats = [{"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "labels": 0, "length": 3},
             {"input_ids": [101, 7, 8, 9, 102], "attention_mask": [1] * 5, "labels": 1, "length": 5}]
    assert Collator(tok, DataConfig(pad_to_multiple_of=None))(feats)["input_ids"].shape == (2, 5)
    assert Collator(tok, DataConfig())(feats)["input_ids"].shape == (2, 8)  # default: round up to a multiple of 8
    assert Collator(tok, DataConfig(pad_to_multiple_of=4))(feats)["input_ids"].shape == (2, 8)
    batch = Collator(tok, DataConfig(padding="max_length", max_length=12))(feats)
    assert batch["input_ids"].shape == (2, 12) and "length" not in batch


def test_task_registry_is_complete():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert TASKS["stsb"].is_regression and TASKS["mnli"].num_labels == 3
    assert TASKS["qqp"].metrics == ("accuracy", "f1") and TASKS["rte"].metrics == ("accuracy",)


def _fill_hub_cache(cache: Path, rows: int = 24) -> None:
    """Write `nyu-mll/glue` (mrpc) into a Hugging Face datasets cache exactly as a download leaves it:
    `<cache>/nyu-mll___glue/mrpc/0.0.0/<hash>/glue-<split>.arrow` + dataset_info.json."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    raw = load_raw(DataConfig(task="mrpc", data_dir=str(MRPC), max_train_samples=rows, max_eval_samples=rows))
    src = cache / "src"
    src.mkdir(parents=True)
    files = {}
    for split, df in raw.splits.items():  # our split names are the Hub's; load_raw already kept `rows` of each
        label = df["label"] if "label" in df else [-1] * len(df)  # the Hub marks unlabeled test rows with -1
        files[split] = str(src / f"{split}.parquet")
        pd.DataFrame({"sentence1": df["text"], "sentence2": df["text_pair"], "label": label,
                      "idx": range(len(df))}).to_parquet(files[split])
    builder = Parquet(cache_dir=str(cache), dataset_name="glue", config_name="mrpc", data_files=files)
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # <cache>/glue/mrpc-<hash>/0.0.0: move it to the Hub dataset's layout
    target = cache / "nyu-mll___glue" / "mrpc" / "0.0.0" / built.parent.name.split("-")[-1]
    target.parent.mkdir(parents=True)
    built.rename(target)


def test_hub_glue_offline_uses_the_local_hf_cache(tmp_path, monkeypatch, tiny_model_dir):
    import datasets

    from conftest import tiny_args
    from tuneloop.cli import main

    _fill_hub_cache(tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    # A user who is simply offline (no HF_HUB_OFFLINE set): the probe fails fast, datasets goes to its cache.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("tuneloop.data._hub_reachable", lambda timeout=3.0: False)
    raw = load_raw(DataConfig(task="mrpc"))  # no --data-dir: the Hub source
    assert {k: len(v) for k, v in raw.splits.items()} == {"train": 24, "validation": 24, "test": 24}
    expected = load_raw(DataConfig(task="mrpc", data_dir=str(MRPC), max_train_samples=24)).splits["train"]
    assert raw.splits["train"]["text"].tolist() == expected["text"].tolist()
    assert raw.splits["train"]["label"].tolist() == expected["label"].tolist()
    assert "label" not in raw.splits["test"].columns
    assert datasets.config.HF_HUB_OFFLINE is False  # the offline switch was only for that load
    # The main job, with no local data flags, trains from that cache.
    args = [a for a in tiny_args(tiny_model_dir, MRPC, tmp_path / "run") if a not in ("--data-dir", str(MRPC))]
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text())["num_examples"] == 24
