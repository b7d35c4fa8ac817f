"""The GLUE task registry: text columns, labels, metrics and the original TSV layout of each task."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TsvLayout:
    """Where the fields sit in one `glue_data` TSV file: column names (header) or indices (no header)."""

    file: str
    text: tuple[str | int, ...]
    label: str | int | None  # None: unlabeled split (GLUE test files)
    header: bool = True


@dataclass(frozen=True)
class Task:
    name: str
    hub_text_columns: tuple[str, ...]  # column names in the Hub's nyu-mll/glue config
    label_names: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    main_metric: str
    hub_splits: dict[str, str] = field(default_factory=dict)  # our split name -> Hub split name
    tsv: dict[str, TsvLayout] = field(default_factory=dict)  # our split name -> layout in glue_data

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in self.tsv if s.startswith("validation")]

    @property
    def test_splits(self) -> list[str]:
        return [s for s in self.tsv if s.startswith("test")]


_STD = {"train": "train", "validation": "validation", "test": "test"}


def _pair_task(name, a, b, label, labels, metrics=("accuracy",), main="accuracy", test_cols=None) -> Task:
    return Task(
        name=name,
        hub_text_columns=("sentence1", "sentence2"),
        label_names=labels,
        metrics=metrics,
        main_metric=main,
        hub_splits=_STD,
        tsv={
            "train": TsvLayout("train.tsv", (a, b), label),
            "validation": TsvLayout("dev.tsv", (a, b), label),
            "test": TsvLayout("test.tsv", test_cols or (a, b), None),
        },
    )


TASKS: dict[str, Task] = {
    # CoLA's train/dev files have no header: source, label, original label, sentence.
    "cola": Task(
        "cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), "matthews_correlation",
        _STD,
        {
            "train": TsvLayout("train.tsv", (3,), 1, header=False),
            "validation": TsvLayout("dev.tsv", (3,), 1, header=False),
            "test": TsvLayout("test.tsv", ("sentence",), None),
        },
    ),
    "sst2": Task(
        "sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy", _STD,
        {
            "train": TsvLayout("train.tsv", ("sentence",), "label"),
            "validation": TsvLayout("dev.tsv", ("sentence",), "label"),
            "test": TsvLayout("test.tsv", ("sentence",), None),
        },
    ),
    "mrpc": _pair_task("mrpc", "#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent"),
                       ("accuracy", "f1"), "f1"),
    "qqp": Task(
        "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), "f1", _STD,
        {
            "train": TsvLayout("train.tsv", ("question1", "question2"), "is_duplicate"),
            "validation": TsvLayout("dev.tsv", ("question1", "question2"), "is_duplicate"),
            "test": TsvLayout("test.tsv", ("question1", "question2"), None),
        },
    ),
    "stsb": _pair_task("stsb", "sentence1", "sentence2", "score", None, ("pearson", "spearman"), "pearson"),
    "mnli": Task(
        "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
        {"train": "train", "validation_matched": "validation_matched",
         "validation_mismatched": "validation_mismatched", "test_matched": "test_matched",
         "test_mismatched": "test_mismatched"},
        {
            "train": TsvLayout("train.tsv", ("sentence1", "sentence2"), "gold_label"),
            "validation_matched": TsvLayout("dev_matched.tsv", ("sentence1", "sentence2"), "gold_label"),
            "validation_mismatched": TsvLayout("dev_mismatched.tsv", ("sentence1", "sentence2"), "gold_label"),
            "test_matched": TsvLayout("test_matched.tsv", ("sentence1", "sentence2"), None),
            "test_mismatched": TsvLayout("test_mismatched.tsv", ("sentence1", "sentence2"), None),
        },
    ),
    "qnli": Task(
        "qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "accuracy", _STD,
        {
            "train": TsvLayout("train.tsv", ("question", "sentence"), "label"),
            "validation": TsvLayout("dev.tsv", ("question", "sentence"), "label"),
            "test": TsvLayout("test.tsv", ("question", "sentence"), None),
        },
    ),
    "rte": _pair_task("rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "wnli": _pair_task("wnli", "sentence1", "sentence2", "label", ("not_entailment", "entailment")),
}
