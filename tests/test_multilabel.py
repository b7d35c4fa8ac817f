"""Multi-label classification: list-valued label columns, BCE, sigmoid scores, metrics recomputable from
predictions.jsonl."""

import json
import random

import numpy as np
import pytest
import torch

from tuneloop.cli import main

TAGS = ("sports", "politics", "tech")
WORDS = {"sports": "goal match team", "politics": "vote senate law", "tech": "chip code cloud"}


@pytest.fixture(scope="module")
def tiny3(tiny_model_dir, tmp_path_factory):
    """The tiny BERT with a 3-output head (a saved head of another size does not load)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-bert-3")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def write_multi_label(path, n: int, seed: int, layout: str = "list"):
    """`n` JSON lines whose text names the words of 0-3 tags; the label column as the layout says."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            tags = [t for t in TAGS if rng.random() < 0.4]
            text = " ".join(["news"] + [WORDS[t] for t in tags])
            if layout == "list":
                row = {"text": text, "labels": tags}
            elif layout == "separator":
                row = {"text": text, "labels": ",".join(tags)}
            else:
                row = {"text": text, **{t: int(t in tags) for t in TAGS}}
            fh.write(json.dumps(row) + "\n")
    return path


def multi_args(model_dir, tmp_path, out, *extra, layout="list"):
    train = write_multi_label(tmp_path / "train.jsonl", 48, 0, layout)
    dev = write_multi_label(tmp_path / "dev.jsonl", 24, 1, layout)
    return ["train", "--model", str(model_dir), "--train-file", str(train), "--validation-file", str(dev),
            "--output-dir", str(out), "--epochs", "2", "--batch-size", "8", "--learning-rate", "1e-3",
            "--mixed-precision", "no", "--report-to", "none", "--max-length", "16", *extra]


def recomputed_metrics(out, names):
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()[1:]]
    binarizer = MultiLabelBinarizer(classes=names)
    y = binarizer.fit_transform([r["label"] for r in rows])
    p = binarizer.transform([r["prediction"] for r in rows])
    by_scores = np.asarray([[r["scores"][n] >= 0.5 for n in names] for r in rows]).astype(int)
    assert (by_scores == p).all()  # the predictions follow from the stored scores at the 0.5 threshold
    per_label = f1_score(y, p, average=None, zero_division=0.0)
    return rows, {"f1_micro": f1_score(y, p, average="micro", zero_division=0.0),
                  "f1_macro": f1_score(y, p, average="macro", zero_division=0.0),
                  "subset_accuracy": accuracy_score(y, p),
                  **{f"f1_{n}": f for n, f in zip(names, per_label)}}


def test_list_labels_train_multi_label_and_metrics_match_sklearn(tiny3, tmp_path):
    out = tmp_path / "run"
    assert main(multi_args(tiny3, tmp_path, out, "--label-column", "labels")) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    assert sorted(names) == sorted(TAGS)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["main_metric"] == "f1_micro"
    rows, expected = recomputed_metrics(out, names)
    assert len(rows) == 24
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-9), key
    assert main(["report", str(out)]) == 0  # a report of sets: per-label scores, no confusion matrix
    html = (out / "report.html").read_text()
    assert all(f"f1_{n}" in html for n in names) and "confusion" not in html.lower()


def test_pipeline_gives_independent_sigmoid_scores(tiny3, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    out = tmp_path / "run"
    assert main(multi_args(tiny3, tmp_path, out, "--label-column", "labels", "--epochs", "1")) == 0
    classifier = pipeline("text-classification", model=str(out / "model"), device="cpu")
    text = "news vote senate law chip code cloud"
    scores = {r["label"]: r["score"] for r in classifier(text, top_k=None)}
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    with torch.no_grad():
        sigmoid = model(**tok(text, return_tensors="pt")).logits.sigmoid()[0]
    assert scores == pytest.approx({model.config.id2label[i]: float(s) for i, s in enumerate(sigmoid)}, abs=1e-6)
    assert sum(scores.values()) != pytest.approx(1.0, abs=1e-3)  # not a softmax


def test_balanced_class_weights_are_pos_weights(tiny3, tmp_path):
    out = tmp_path / "run"
    assert main(multi_args(tiny3, tmp_path, out, "--label-column", "labels", "--epochs", "1",
                           "--class-weights", "balanced")) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    for tag in TAGS:
        positives = sum(tag in r["labels"] for r in rows)
        assert summary["class_weights"][tag] == pytest.approx((len(rows) - positives) / positives)


def test_pos_weighted_loss_equals_hand_computed_bce(tiny3):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneloop.problems import pos_weighted_loss

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny3, problem_type="multi_label_classification").eval()
    tok = AutoTokenizer.from_pretrained(tiny3)
    batch = dict(tok(["a cat", "the dog sat down"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    weights = [2.0, 0.5, 3.0]
    with torch.no_grad():
        loss = pos_weighted_loss(weights, "cpu")(model, batch).item()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    p = logits.sigmoid()
    y, w = batch["labels"], torch.tensor(weights)
    by_hand = -(w * y * p.log() + (1 - y) * (1 - p).log()).mean().item()
    assert loss == pytest.approx(by_hand, rel=1e-5)


def test_list_labels_mixed_with_scalars_is_one_line(tiny3, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": f"t{i}", "labels": ["a"] if i % 3 else "a"}) for i in range(9)) + "\n")
    code = main(["train", "--model", str(tiny3), "--train-file", str(train), "--label-column", "labels",
                 "--output-dir", str(tmp_path / "run"), "--report-to", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert err[0].startswith("tuneloop: error:") and "mixes lists" in err[0] and "rows 1, 4, 7" in err[0]


@pytest.mark.parametrize("layout,flags", [("separator", ["--label-column", "labels", "--label-separator", ","]),
                                          ("columns", ["--label-columns", "sports,politics,tech"])])
def test_separator_and_label_columns_train_multi_label(tiny3, tmp_path, layout, flags):
    out = tmp_path / "run"
    assert main(multi_args(tiny3, tmp_path, out, *flags, "--epochs", "1", layout=layout)) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    names = [config["id2label"][str(i)] for i in range(3)]
    # --label-columns keeps the columns' order; a separated column's labels are sorted
    assert names == (["sports", "politics", "tech"] if layout == "columns" else sorted(TAGS))
    results = json.loads((out / "eval_results.json").read_text())
    rows, expected = recomputed_metrics(out, names)
    truth = [json.loads(line) for line in (tmp_path / "dev.jsonl").read_text().splitlines()]
    for row in rows:  # the stored true labels are the file's
        cell = truth[row["index"]]
        assert set(row["label"]) == ({t for t in TAGS if cell[t]} if layout == "columns" else
                                     set(filter(None, cell["labels"].split(","))))
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("flags,message", [
    (["--label-columns", "sports,weather"], "missing label column(s) ['weather']"),
    (["--label-columns", "sports,politics", "--label-column", "labels"], "give one of them"),
])
def test_bad_label_columns_are_one_line(tiny3, tmp_path, capsys, flags, message):
    code = main(multi_args(tiny3, tmp_path, tmp_path / "run", *flags, layout="columns"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("tuneloop: error:") and message in err[0], err


def test_best_threshold_maximises_f1():
    from sklearn.metrics import f1_score

    from tuneloop.thresholds import best_threshold

    rng = np.random.default_rng(0)
    truth = rng.random(60) < 0.3
    scores = np.clip(truth * 0.2 + rng.random(60) * 0.5, 0, 1).astype(np.float32)
    t = best_threshold(scores, truth)
    best = max(f1_score(truth, scores >= c) for c in np.unique(scores))
    assert f1_score(truth, scores >= t) == pytest.approx(best)
    assert not np.isclose(scores, t).any()  # midway between two scores, never on one
    assert best_threshold(scores, np.zeros(60, dtype=bool)) == 0.5


def test_tuned_thresholds_are_stored_and_change_predict(tiny3, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    assert main(multi_args(tiny3, tmp_path, out, "--label-column", "labels", "--tune-thresholds")) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(3)]
    stored = dict(zip(names, config["tuneloop_thresholds"]))
    record = json.loads((out / "thresholds.json").read_text())
    assert record["thresholds"] == pytest.approx(stored) and stored != pytest.approx(dict.fromkeys(names, 0.5))
    results = json.loads((out / "eval_results.json").read_text())
    # predictions.jsonl cuts at the tuned thresholds; its metrics are the *_tuned ones
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()[1:]]
    for r in rows:
        assert set(r["prediction"]) == {n for n in names if r["scores"][n] >= stored[n]}
    mlb = MultiLabelBinarizer(classes=names)
    y, p = mlb.fit_transform([r["label"] for r in rows]), mlb.transform([r["prediction"] for r in rows])
    assert results["f1_micro_tuned"] == pytest.approx(f1_score(y, p, average="micro", zero_division=0.0))
    assert results["f1_micro_tuned"] >= results["f1_micro_before"]
    card = (out / "model" / "README.md").read_text()
    assert f"Multi-label: each label ({', '.join(names)}) has its own sigmoid score" in card
    assert f"f1_micro {results['f1_micro_tuned']:.4f} there, {results['f1_micro_before']:.4f} at 0.5" in card
    assert f"| {names[0]} | {results['precision_' + names[0]]:.4f} | {results['recall_' + names[0]]:.4f} | " \
           f"{results['f1_' + names[0]]:.4f} |" in card

    untuned = tmp_path / "untuned"
    shutil.copytree(out / "model", untuned)
    plain = {k: v for k, v in config.items() if k != "tuneloop_thresholds"}
    (untuned / "config.json").write_text(json.dumps(plain))
    outputs = {}
    for name, model_dir in (("tuned", out / "model"), ("untuned", untuned)):
        target = tmp_path / f"{name}.jsonl"
        assert main(["predict", "--model-dir", str(model_dir), "--input", str(tmp_path / "dev.jsonl"),
                     "--output", str(target)]) == 0
        outputs[name] = [json.loads(line) for line in target.read_text().splitlines()]
    for tuned, plain_row in zip(outputs["tuned"], outputs["untuned"]):
        assert tuned["scores"] == pytest.approx(plain_row["scores"])  # same model, same scores
        assert set(tuned["scores"]) == set(names)
        assert tuned["labels"] == [n for n in names if tuned["scores"][n] >= stored[n]]
        assert plain_row["labels"] == [n for n in names if plain_row["scores"][n] >= 0.5]
    assert [r["labels"] for r in outputs["tuned"]] != [r["labels"] for r in outputs["untuned"]]


def test_tune_thresholds_on_single_label_is_one_line(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    from conftest import tiny_args

    assert main(tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "run", "--tune-thresholds", "--report-to", "none")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tuneloop: error: eval.tune_thresholds") and "multi-label" in err[0]


def test_data_preview_counts_each_label(tiny3, tmp_path, capsys):
    train = write_multi_label(tmp_path / "train.jsonl", 48, 0)
    assert main(["data", "--model", str(tiny3), "--train-file", str(train), "--label-column", "labels"]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert "(multi-label) | metrics: f1_micro, f1_macro, subset_accuracy" in printed
    for tag in TAGS:
        count = sum(tag in r["labels"] for r in rows)
        assert f"{tag}: {count} ({count / len(rows):.1%})" in printed


def test_parquet_lists_and_sequence_of_class_label_are_multi_label(tmp_path):
    import pandas as pd
    import datasets
    from datasets import ClassLabel, Dataset, Features, Value

    List = getattr(datasets, "List", None) or datasets.Sequence  # datasets 3.x (the lowest supported) has no List

    from tuneloop.config import DataConfig
    from tuneloop.data import load_raw

    frame = pd.DataFrame({"text": ["a", "b", "c", "d"], "tags": [["x", "y"], [], ["y"], ["x"]]})
    frame.to_parquet(tmp_path / "train.parquet")
    raw = load_raw(DataConfig(task=None, train_file=str(tmp_path / "train.parquet"), label_column="tags"))
    assert raw.multi_label and raw.label_names == ["x", "y"] and raw.main_metric == "f1_micro"
    assert raw.splits["train"]["label"].tolist() == [(1.0, 1.0), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0)]

    # A datasets folder whose label is Sequence(ClassLabel): the feature's names, in its order, even one never used.
    features = Features({"text": Value("string"), "tags": List(ClassLabel(names=["z", "y", "x"]))})
    (tmp_path / "ds" / "data").mkdir(parents=True)
    Dataset.from_dict({"text": ["a", "b", "c"], "tags": [[2, 1], [], [1]]}, features=features).to_parquet(
        str(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet"))
    raw = load_raw(DataConfig(task=None, dataset=str(tmp_path / "ds"), label_column="tags"))
    assert raw.multi_label and raw.label_names == ["z", "y", "x"]
    assert raw.splits["train"]["label"].tolist() == [(0.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0)]


@pytest.mark.parametrize("flags,message", [
    (["--folds", "2"], "train.folds: k-fold cross-validation does not support multi-label tasks yet"),
    (["--calibrate"], "eval.calibrate: temperature scaling calibrates a softmax over classes; this is a multi-label"),
    (["--long-text", "chunk", "--stride", "4"], "data.long_text chunk: not supported for multi-label tasks yet"),
])
def test_not_yet_multi_label_is_one_line(tiny3, tmp_path, capsys, flags, message):
    code = main(multi_args(tiny3, tmp_path, tmp_path / "run", "--label-column", "labels", *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("tuneloop: error:") and message in err[0], err
