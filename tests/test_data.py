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
    (lambda p: p.write_bytes(b"text,label\n\xe9t\xe9,1\n"), "cannot read train file .* not UTF-8 text"),  # Latin-1
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
    monkeypatch.setattr("tuneloop.hf_dataset.hub_reachable", lambda timeout=3.0: False)
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


# ---------------------------------------------------------------------------------------------
# Any Hugging Face dataset (--dataset)


def _hub_layout_folder(root: Path, frames: dict, features) -> Path:
    """A dataset folder as the Hub lays one out: data/<split>-00000-of-00001.parquet, features in the schema."""
    from datasets import Dataset

    (root / "data").mkdir(parents=True)
    for split, df in frames.items():
        Dataset.from_pandas(df, features=features, preserve_index=False).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture
def sentiment_folder(tmp_path) -> Path:
    """SST-2's first lines, single sentences with ClassLabel labels; the test split unlabeled (-1) as on the Hub."""
    from datasets import ClassLabel, Features, Value

    raw = load_raw(DataConfig(task="sst2", data_dir=str(SST2), max_train_samples=40, max_eval_samples=24))
    frames = {s: pd.DataFrame({"sentence": df["text"], "label": df["label"] if "label" in df else -1})
              for s, df in raw.splits.items()}
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    return _hub_layout_folder(tmp_path / "sst2-copy", frames, features)


def _dataset_args(model_dir, dataset, out, *extra):
    return ["train", "--model", str(model_dir), "--dataset", str(dataset), "--output-dir", str(out), "--epochs", "1",
            "--batch-size", "8", "--learning-rate", "1e-3", "--mixed-precision", "no", *extra]


def test_dataset_folder_of_single_sentences_trains_and_evaluates(sentiment_folder, tiny_model_dir, tmp_path, capsys):
    from tuneloop.cli import main

    raw = load_raw(DataConfig(task=None, dataset=str(sentiment_folder)))
    assert {s: len(df) for s, df in raw.splits.items()} == {"train": 40, "validation": 24, "test": 24}
    assert raw.label_names == ["negative", "positive"] and not raw.is_pair and "label" not in raw.splits["test"]
    expected = load_raw(DataConfig(task="sst2", data_dir=str(SST2), max_train_samples=40)).splits["train"]
    assert raw.splits["train"]["label"].tolist() == expected["label"].tolist()
    assert raw.sources["validation"] == f"dataset {sentiment_folder}, split validation"

    assert main(["data", "--model", str(tiny_model_dir), "--dataset", str(sentiment_folder)]) == 0
    shown = capsys.readouterr().out
    assert "task: custom | single sentences | 2 labels ['negative', 'positive'] | metrics: accuracy, f1" in shown
    assert "labels: negative:" in shown and "(unlabeled)" in shown

    out = tmp_path / "run"
    assert main(_dataset_args(tiny_model_dir, sentiment_folder, out)) == 0  # no --task: the dataset's own labels
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_examples"] == 24 and 0 <= results["accuracy"] <= 1 and "f1" in results
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "negative", "1": "positive"}


def test_dataset_folder_of_pairs_with_class_label_names(tmp_path, tiny_model_dir):
    from datasets import ClassLabel, Features, Value

    from tuneloop.cli import main

    raw = load_raw(DataConfig(task="mrpc", data_dir=str(MRPC), max_train_samples=24, max_eval_samples=16))
    frames = {{"validation": "dev"}.get(s, s): pd.DataFrame({"first": df["text"], "second": df["text_pair"],
                                                              "same": df["label"]})
              for s, df in raw.splits.items() if s != "test"}
    # Names that look like numbers: ids must map through the names, not be read as labels themselves.
    features = Features({"first": Value("string"), "second": Value("string"), "same": ClassLabel(names=["1", "0"])})
    folder = _hub_layout_folder(tmp_path / "pairs", frames, features)
    out = tmp_path / "run"
    assert main(_dataset_args(tiny_model_dir, folder, out, "--text-columns", "first,second", "--label-column", "same",
                              "--validation-split", "dev")) == 0
    assert json.loads((out / "eval_results.json").read_text())["num_examples"] == 16
    assert json.loads((out / "model" / "config.json").read_text())["id2label"] == {"0": "1", "1": "0"}
    loaded = load_raw(DataConfig(task=None, dataset=str(folder), text_columns=["first", "second"],
                                 label_column="same", validation_split="dev"))
    assert loaded.is_pair and loaded.splits["validation"]["label"].tolist() == raw.splits["validation"]["label"].tolist()


@pytest.mark.parametrize("flags, message", [
    (["--validation-split", "dev"],
     "dataset '{d}' has no split 'dev' (data.validation_split); its splits: train, validation, test"),
    (["--text-columns", "review"],
     "dataset '{d}' split 'train' has no column 'review' (data.text_columns); its columns: sentence, label"),
    (["--label-column", "stars"],
     "dataset '{d}' split 'train' has no label column 'stars' (data.label_column); its columns: sentence, label"),
])
def test_dataset_bad_split_or_column_is_one_line(sentiment_folder, tiny_model_dir, tmp_path, capsys, flags, message):
    from tuneloop.cli import main

    assert main(_dataset_args(tiny_model_dir, sentiment_folder, tmp_path / "run", *flags)) == 1
    err = capsys.readouterr().err.strip()
    assert err == "tuneloop: error: " + message.format(d=sentiment_folder)


def test_dataset_from_the_datasets_cache_offline(tmp_path, monkeypatch):
    """A Hub dataset by name (`someone/reviews`) that a download left in the datasets cache, read offline."""
    import datasets
    from datasets import ClassLabel, Features, Value
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache, src = tmp_path / "hf", tmp_path / "src"
    src.mkdir()
    rows = {"train": (["great", "awful", "fine", "bad"], [2, 0, 1, 0]), "test": (["superb", "dull"], [2, 0])}
    files = {}
    for split, (texts, labels) in rows.items():
        files[split] = str(src / f"{split}.parquet")
        pd.DataFrame({"text": texts, "label": labels}).to_parquet(files[split])
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "neutral", "pos"])})
    builder = Parquet(cache_dir=str(cache), dataset_name="reviews", config_name="default", data_files=files,
                      features=features)
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # <cache>/reviews/default-<hash>/0.0.0: move it where a Hub download lands
    target = cache / "someone___reviews" / "default" / "0.0.0" / built.parent.name.split("-")[-1]
    target.parent.mkdir(parents=True)
    built.rename(target)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr("tuneloop.hf_dataset.hub_reachable", lambda timeout=3.0: False)

    raw = load_raw(DataConfig(task=None, dataset="someone/reviews", validation_split="test"))
    assert raw.label_names == ["neg", "neutral", "pos"] and raw.metrics == ("accuracy", "f1_macro")
    assert raw.splits["train"]["label"].tolist() == [2, 0, 1, 0] and list(raw.splits) == ["train", "validation"]
    with pytest.raises(DataError, match="'someone/other': no connection to the Hugging Face Hub and not in the local"):
        load_raw(DataConfig(task=None, dataset="someone/other"))


def test_dataset_settings_are_checked_with_the_config():
    from tuneloop.config import Config, ConfigError

    assert Config.from_flags(dataset="imdb").data.task is None  # not the default GLUE task
    assert Config.from_flags(dataset="nyu-mll/glue", dataset_config="sst2", task="sst2").data.task == "sst2"
    with pytest.raises(ConfigError, match="data.dataset: give one data source"):
        Config.from_flags(dataset="imdb", train_file="train.csv")
    with pytest.raises(ConfigError, match="only apply with --dataset NAME"):
        Config.from_flags(validation_split="test")


def test_dataset_split_choice():
    from tuneloop.hf_dataset import pick_splits

    cfg = DataConfig(task=None, dataset="x")
    assert pick_splits(cfg, ["train", "test", "unsupervised"]) == {"train": "train", "test": "test"}  # imdb
    assert pick_splits(cfg, ["train", "dev", "test"]) == {"train": "train", "validation": "dev", "test": "test"}
    on_test = DataConfig(task=None, dataset="x", validation_split="test")
    assert pick_splits(on_test, ["train", "test"]) == {"train": "train", "validation": "test"}
    with pytest.raises(DataError, match=r"^dataset 'x' has no split 'train'; its splits: test \(choose one with "
                                        r"--train-split\)$"):
        pick_splits(cfg, ["test"])
    assert pick_splits(cfg, ["test"], need_train=False) == {"test": "test"}  # tuneloop eval / data


def test_tokenisation_cache_key_depends_on_row_order(tiny_model_dir, tmp_path):
    # Before: the key summed row hashes, so a reordered validation file reused the old order's tokens.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [("a short one", "neg"), ("a somewhat longer sentence here", "pos"), ("mid length text", "neg")]
    cfg = DataConfig(task=None, cache_dir=str(tmp_path / "cache"), max_length=32,
                     train_file=str(tmp_path / "t.csv"), validation_file=str(tmp_path / "v.csv"))
    for name, order in (("first", rows), ("reversed", rows[::-1])):
        text = "text,label\n" + "".join(f"{t},{y}\n" for t, y in order)
        (tmp_path / "t.csv").write_text(text)
        (tmp_path / "v.csv").write_text(text)
        raw = load_raw(cfg)
        got = tokenize_splits(raw, tok, cfg)["validation"]
        assert [tok.decode(ids, skip_special_tokens=True) for ids in got["input_ids"]] == [t for t, _ in order]
        assert got["labels"] == [1 if y == "pos" else 0 for _, y in order]


def test_own_files_train_without_task_flag(tmp_path, tiny_model_dir, capsys):
    """The issue's command: pos/neg labels, --train-file without --task (before: 'label 'pos' is not in the
    label set ['not_equivalent', 'equivalent']')."""
    from tuneloop.cli import main

    rows = "".join(f"review number {i} was {'great' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}\n"
                   for i in range(12))
    (tmp_path / "reviews.csv").write_text("text,label\n" + rows)
    (tmp_path / "dev.csv").write_text("text,label\n" + rows)
    code = main(["train", "--model", str(tiny_model_dir), "--train-file", str(tmp_path / "reviews.csv"),
                 "--validation-file", str(tmp_path / "dev.csv"), "--text-columns", "text", "--label-column", "label",
                 "--epochs", "1", "--output-dir", str(tmp_path / "out"), "--mixed-precision", "no",
                 "--report-to", "none"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "pos"}


@pytest.mark.parametrize("pair, max_length, special", [(False, 2, 2), (True, 3, 3)])
def test_max_length_with_no_room_for_text_is_one_line(tiny_model_dir, tmp_path, pair, max_length, special):
    """Found by tests/test_fuzz.py: max_length 1 returned inputs longer than max_length (the special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (tmp_path / "t.csv").write_text("text,text_pair,label\na b,c d,x\ne f,g h,y\n")
    cfg = DataConfig(task=None, train_file=str(tmp_path / "t.csv"), text_columns=["text", "text_pair"][:1 + pair],
                     max_length=max_length, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=f"data.max_length {max_length} leaves no room for text: the tokenizer adds "
                                        f"{special} special tokens"):
        tokenize_splits(load_raw(cfg), tok, cfg)
    ok = DataConfig(**{**cfg.__dict__, "max_length": special + 1})
    assert max(tokenize_splits(load_raw(ok), tok, ok)["train"]["length"]) == special + 1


def test_null_text_in_json_lines_is_empty_text(tmp_path, tiny_model_dir):
    """Found by tests/test_fuzz.py: a JSON null (or a row without the key) reached the tokenizer as NaN."""
    from transformers import AutoTokenizer

    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": null, "label": "b"}\n{"label": "a"}\n')
    cfg = DataConfig(task=None, train_file=str(path), cache_dir=str(tmp_path / "cache"))
    raw = load_raw(cfg)
    assert raw.splits["train"]["text"].tolist() == ["fine", "", ""]
    tokenized = tokenize_splits(raw, AutoTokenizer.from_pretrained(tiny_model_dir), cfg)
    assert tokenized["train"]["length"] == [3, 2, 2]


@pytest.mark.parametrize("suffix, encoding", [(".tsv", "utf-16"), (".csv", "utf-8-sig"), (".jsonl", "utf-8-sig"),
                                              (".json", "utf-16")])
def test_byte_order_marks_and_utf16_are_read(tmp_path, suffix, encoding):
    """Found by tests/test_fuzz.py: a UTF-16 file (Excel's "Unicode text" export) and a JSON file with a UTF-8 BOM
    could not be read."""
    rows = [{"text": "café", "label": "pos"}, {"text": "naïve", "label": "neg"}]
    df = pd.DataFrame(rows)
    text = {".tsv": lambda: df.to_csv(sep="\t", index=False), ".csv": lambda: df.to_csv(index=False),
            ".jsonl": lambda: df.to_json(orient="records", lines=True, force_ascii=False),
            ".json": lambda: "\n " + df.to_json(orient="records", force_ascii=False)}[suffix]()
    path = tmp_path / f"train{suffix}"
    path.write_bytes(text.encode(encoding))
    raw = load_raw(DataConfig(task=None, train_file=str(path)))
    assert raw.splits["train"]["text"].tolist() == ["café", "naïve"] and raw.label_names == ["neg", "pos"]


def test_other_encodings_name_the_fix(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\ncafé,pos\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"is not UTF-8 text \(invalid continuation byte at byte 14\); save it as UTF-8"):
        load_raw(DataConfig(task=None, train_file=str(path)))
