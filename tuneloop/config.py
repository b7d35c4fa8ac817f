"""One typed configuration: the dataclasses below are the YAML schema, the CLI flags and the defaults.

Every field's docstring-like `help` metadata becomes its `--help` text. Defaults live here and
nowhere else. `load_config` merges YAML and flag overrides, rejects unknown keys with a suggestion
and validates values before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tuneloop.errors import ConfigError, one_line
from tuneloop.naming import did_you_mean


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (the CLI's, the YAML reference's); extra metadata such as `metavar`."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    task: str | None = setting("mrpc", "GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli); null for your own data (the "
                                      "default with --train-file, --validation-file, --test-file or --dataset)")
    data_dir: str | None = setting(None, "local GLUE folder in the original glue_data TSV layout (e.g. glue_data/MRPC)")
    train_file: str | None = setting(None, "your training file: .csv, .tsv, .jsonl/.json or .parquet")
    validation_file: str | None = setting(None, "your validation file (same formats)")
    test_file: str | None = setting(None, "your test file (labels optional)")
    text_columns: list[str] | None = setting(None, "one column (single sentences) or two (pairs) holding the text")
    label_column: str | None = setting(None, "column holding the label (strings, integers or floats for regression; "
                                        "lists of labels for multi-label)")
    label_separator: str | None = setting(None, "multi-label: split each label cell at this string (e.g. ',') into a list "
                                           "of labels")
    label_columns: list[str] | None = setting(None, "multi-label: several 0/1 columns, one per label, named for it "
                                               "(instead of label_column)")
    drop_unlabeled: bool = setting(False, "leave out rows whose label cell is empty or NaN (counted in the start line) "
                                     "instead of stopping with their row numbers")
    max_length: int = setting(128, "truncate tokenised inputs to this many tokens")
    max_train_samples: int | None = setting(None, "use only the first N training examples")
    max_eval_samples: int | None = setting(None, "use only the first N examples of each evaluation split")
    padding: Literal["longest", "max_length"] = setting("longest", "pad each batch to its longest sequence, or always to max_length")
    # Measured: every new padded length costs oneDNN (bf16 on CPU) a cached kernel; rounding to 8 bounds the
    # number of shapes, which cut peak RSS by a quarter at the same speed. GPUs' tensor cores want 8 too.
    pad_to_multiple_of: int | None = setting(8, "round padded lengths up to a multiple of this (fewer shapes: less memory for "
                                           "kernel caches, compilers, tensor cores; null: exact longest)")
    long_text: Literal["truncate", "head-tail", "chunk"] = setting("truncate", "texts longer than max_length: truncate (keep "
                                                                        "the start), head-tail (keep start and end), "
                                                                        "or chunk (overlapping windows, aggregated "
                                                                        "per document)")
    stride: int = setting(32, "chunk: tokens shared by neighbouring windows (below max_length)")
    chunk_aggregation: Literal["mean", "max"] = setting("mean", "chunk: a document's logits are the mean or max of its windows'")
    group_by_length: bool = setting(True, "batch examples of similar length together (less padding, same samples per epoch)")
    cache_dir: str | None = setting(None, "where tokenised datasets are cached (default: $TUNELOOP_CACHE or ~/.cache/tuneloop)")
    dataset: str | None = setting(None, "any Hugging Face dataset, loaded with datasets.load_dataset: a Hub name (imdb, "
                                   "user/reviews), a local dataset folder or a `datasets` cache entry (data.task "
                                   "becomes null unless given)")
    dataset_config: str | None = setting(None, "the dataset's configuration (subset) name, e.g. sst2 for nyu-mll/glue")
    train_split: str | None = setting(None, "the dataset's split to train on (null: train)")
    validation_split: str | None = setting(None, "the dataset's split to evaluate on (null: the first of validation, "
                                            "valid, dev, val that it has)")
    test_split: str | None = setting(None, "the dataset's split to predict on (null: test, if it has one)")


@dataclass
class ModelConfig:
    name_or_path: str | None = setting(None, "Hugging Face model id or local folder (default: the bundled all-MiniLM-L6-v2)")
    # Measured on CPU (MiniLM, bf16, batch 32 x 128 tokens): attention dropout adds ~680 MB of peak memory,
    # because attention with dropout keeps every batch x heads x length x length probability for backward.
    attention_dropout: float | None = setting(None, "override the checkpoint's dropout on attention probabilities "
                                               "(null: keep it; 0 saves much memory on long batches)")
    # Neither of these two changes a hyperparameter, so they resolve per device for every run (tuneloop.devices);
    # `torch` / `sdpa` pin the previous behaviour.
    dropout_masks: Literal["torch", "fast", "auto"] = setting("auto", "how dropout draws masks on CPU: torch (one random "
                                                                 "number per element), fast (16 random bits per "
                                                                 "element, ~2.6x faster; p rounded to 1/65536), or "
                                                                 "auto (fast on CPU); GPUs keep torch's")
    attn_implementation: str = setting("auto", "attention kernel: sdpa (PyTorch's fused attention), eager, lean (keeps "
                                          "probabilities in bf16: less memory and faster on CPU), auto (lean on CPU, "
                                          "sdpa elsewhere), or any name transformers knows (flash_attention_2, ...)")
    # Zhang et al. 2021 ("Revisiting few-sample BERT fine-tuning"): the top layers specialise to the
    # pretraining task; fresh ones steady small-data runs. The head starts random anyway.
    reinit_layers: int = setting(0, "re-initialise the top N encoder layers (and the pooler, if the model has one) with the "
                               "model's own initialisation before training (0: every layer keeps its pretrained weights)")


@dataclass
class OptimConfig:
    learning_rate: float = setting(5e-5, "peak learning rate of AdamW")
    weight_decay: float = setting(0.01, "decoupled weight decay (not applied to biases and LayerNorm weights)")
    adam_beta1: float = setting(0.9, "AdamW beta1")
    adam_beta2: float = setting(0.999, "AdamW beta2")
    adam_epsilon: float = setting(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = setting(1.0, "clip gradients to this global norm (null: no clipping)")
    lr_scheduler: str = setting("linear", "schedule name for transformers.get_scheduler (linear, cosine, constant_with_warmup, ...)")
    warmup_ratio: float = setting(0.0, "warmup as a fraction of all optimizer steps")
    warmup_steps: int = setting(0, "warmup in optimizer steps (overrides warmup_ratio when > 0)")
    name: Literal["adamw", "adamw_8bit"] = setting("adamw", "optimizer: adamw (torch, fp32 states) or adamw_8bit (bitsandbytes, "
                                                       "8-bit states: a quarter of the optimizer memory)")
    head_learning_rate: float | None = setting(None, "learning rate of the classifier head (null: learning_rate)")
    loraplus_lr_ratio: float | None = setting(None, "LoRA+: adapters' B matrices learn at learning_rate x this ratio "
                                               "(null: off; the LoRA+ paper uses 16)")
    layer_decay: float | None = setting(None, "layer-wise learning-rate decay: with L encoder layers, layer i (1..L) learns at "
                                         "learning_rate x decay^(L + 1 - i), the embeddings at decay^(L + 1), the head "
                                         "and pooler at learning_rate (null: one rate for every layer)")
    # The word-embedding matrix is about half of a small encoder's parameters (MiniLM: 11.7 M of 22.7 M):
    # frozen, backward computes no dense gradient for it and AdamW keeps no state for it.
    embeddings: Literal["train", "freeze"] = setting("train", "train the word embeddings, or freeze them (no gradient, no "
                                                         "optimizer state; position and type embeddings still train)")
    # Below the lowest trainable layer nothing needs a gradient, so backward stops there: freezing the bottom
    # N of L layers skips N/L of the encoder's backward, not only their weight gradients (Lee et al. 2019,
    # "What would Elsa do?": the bottom layers change least in fine-tuning).
    freeze_layers: int = setting(0, "freeze every embedding and the bottom N encoder layers (no gradient, no optimizer "
                                 "state; backward stops at layer N + 1); 0: every layer trains")


@dataclass
class TrainConfig:
    epochs: int = setting(3, "number of passes over the training data")
    batch_size: int = setting(8, "examples per device per micro-batch")
    gradient_accumulation_steps: int = setting(1, "micro-batches accumulated into one optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16", "auto", "tf32"] = setting("auto", "autocast precision: no, bf16, fp16, tf32 (fp32 with TF32 matmuls on GPUs; no elsewhere), or auto (from device and model size: docs/precision.md)")
    gradient_checkpointing: bool | Literal["auto"] = setting(False, "recompute each layer's activations in backward instead "
                                                               "of keeping them (less memory, one more forward per "
                                                               "step); auto: only on CPUs with fast bf16, where it pays")
    compile: bool | Literal["reduce-overhead", "max-autotune"] = setting(False, "torch.compile the model: true, reduce-overhead (CUDA graphs: one launch per step on GPUs; pads lengths to a multiple of 32) or max-autotune (pads to a multiple of 8 unless pad_to_multiple_of is set, to limit recompiles)")
    seed: int = setting(0, "seed for weights of new heads, dropout and data order")
    log_every: int = setting(10, "log loss and learning rate every N optimizer steps")
    nan_policy: Literal["stop", "skip"] = setting("stop", "on a NaN/infinite loss: stop with a message, or skip that update and count it")
    class_weights: str = setting("none", "weight each class's loss: none, balanced (inverse frequency in the training "
                                    "split, scikit-learn's n / (classes x count)) or one weight per class, w1,w2,...")


@dataclass
class EvalConfig:
    eval_every: int = setting(0, "also evaluate every N optimizer steps (0: only at each epoch end)")
    eval_batch_size: int = setting(32, "examples per device per evaluation batch")
    early_stopping_patience: int | None = setting(None, "stop after N evaluations in a row without a new best main metric (null: never)")
    load_best_model: bool = setting(False, "save the weights of the best evaluation (by the main metric) as the model, not the last")
    calibrate: bool = setting(False, "after training, fit temperature scaling on the validation split and fold it into the "
                                "classifier's last layer (every loader gets calibrated probabilities); ECE and Brier "
                                "score before and after go to eval_results.json and calibration.json")
    tune_thresholds: bool = setting(False, "multi-label: after training, pick each label's score threshold on the validation "
                                      "split to maximise its F1 (default 0.5), stored in the model's config.json")


@dataclass
class OutputConfig:
    output_dir: str = setting("runs/latest", "folder for config, metrics, model and plots of this run")
    overwrite: bool = setting(False, "allow writing into an output folder that already holds a finished run")
    report_to: list[str] = setting(["auto"], "trackers besides metrics.jsonl: tensorboard, mlflow, wandb, none, or auto "
                                        "(TensorBoard when installed); comma-separated")
    push_to_hub: str | None = setting(None, "after training, upload model, tokenizer and model card to this Hub repo id")


@dataclass
class CheckpointConfig:
    checkpoint_every: int = setting(0, "save a checkpoint every N optimizer steps (0: off)")
    checkpoint_every_epoch: bool = setting(True, "save a checkpoint at the end of every epoch")
    keep_last: int = setting(2, "keep the newest N checkpoints (plus the best one)")
    keep_best: bool = setting(True, "also keep the checkpoint with the best evaluation metric")
    resume: str | None = setting(None, "resume from the newest complete checkpoint in the output folder (--resume) or from a given checkpoint folder (--resume PATH)", const="latest")
    resume_force: bool = setting(False, "resume even if settings or data changed since the checkpoint (the changes are logged)")


@dataclass
class LaunchConfig:
    num_processes: int | None = setting(None, "processes to start on this machine, one per GPU (null: one, or what torchrun / accelerate launch started)")
    num_machines: int = setting(1, "machines taking part in the job (run the same command on each, with its --machine-rank)")
    machine_rank: int = setting(0, "this machine's number, 0 to num_machines - 1; machine 0 hosts the rendezvous")
    main_process_ip: str | None = setting(None, "address of machine 0 that every machine can reach (needed with several machines)")
    main_process_port: int | None = setting(None, "free port on machine 0 (default 29500 with several machines; a free one is picked on one)")
    timeout: int = setting(1800, "seconds a process waits for the others (to join, in a collective) before the job fails instead of hanging")
    accelerate_config: str | None = setting(None, "an `accelerate config` file (FSDP, DeepSpeed): with --num-processes the job starts with `accelerate launch`; its precision is checked against train.mixed_precision")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning through PEFT (tuneloop.adapters): the base model frozen, adapters and head trained."""

    method: Literal["none", "lora", "adalora"] = setting("none", "none (every weight trains), lora or adalora")
    lora_rank: int = setting(8, "rank r of each LoRA update (AdaLoRA: see adalora_init_rank)")
    lora_alpha: float = setting(16.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = setting(0.1, "dropout on the adapters' input")
    lora_target_modules: list[str] | None = setting(None, "Linear layers to adapt, by name (null: found from the model: "
                                                     "BERT/ELECTRA query,key,value,dense; DistilBERT q_lin,...,lin2; "
                                                     "else every Linear layer outside the head)")
    adalora_init_rank: int = setting(8, "AdaLoRA: rank every adapted layer starts with")
    adalora_target_rank: int = setting(4, "AdaLoRA: average rank left per layer once the budget has shrunk")
    adalora_warmup_fraction: float = setting(0.1, "AdaLoRA: share of optimizer steps trained at the initial budget")
    adalora_final_fraction: float = setting(0.2, "AdaLoRA: share of optimizer steps trained at the final budget")
    adalora_update_every: int = setting(10, "AdaLoRA: reallocate ranks every N optimizer steps while the budget shrinks")
    adalora_orth_reg_weight: float = setting(0.5, "AdaLoRA: weight of the orthogonality penalty on its singular vectors, "
                                             "added to the loss (PEFT's default 0.5; the AdaLoRA paper's GLUE runs: 0.1)")
    merge_adapter: bool = setting(False, "also write OUT/model-merged/: adapters merged into the weights, loadable by "
                                    "plain transformers.pipeline")


@dataclass
class Config:
    """The whole configuration, one dataclass per section: each field is a YAML key, a CLI flag and its default."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    # The `section.field`s the user set (flags, their own YAML file, the dict or flags given in code); not the
    # built-in recipes' values. A later step that would change one of them (a search space, a device) must
    # either keep it or say in one line why it cannot. Not a field: it is not part of the saved config.
    given: typing.ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Nested sections as in a YAML file, validated: `Config.from_dict({"train": {"epochs": 1}})`."""
        return config_from_dict(raw)

    @classmethod
    def from_flags(cls, config_file: str | Path | None = None, **flags: Any) -> Config:
        """Settings named like the CLI flags, validated: `Config.from_flags(task="sst2", learning_rate=3e-5)`;
        `config_file` is a YAML file or recipe name (`"fast"`) that they override."""
        return load_config(config_file, flags, prefix="")

    def replace(self, **flags: Any) -> Config:
        """A validated copy with settings named like the CLI flags changed: `config.replace(epochs=1)`."""
        overrides = overrides_from_flags(flags, prefix="")
        config = config_from_dict(merge(self.to_dict(), overrides))
        config.given = self.given | paths_in(overrides)
        return config

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}
SECTIONS = {name: globals()[t] if isinstance(t, str) else t for name, t in SECTIONS.items()}

# Short flags users type most that are not simply a field's own name.
ALIASES: dict[str, str] = {"model": "model.name_or_path", "model_dir": "model.name_or_path", "peft": "peft.method",
                           "optimizer": "optim.name"}


def field_paths() -> dict[str, dataclasses.Field]:
    """Every `section.field` of the config, with its dataclass field."""
    return {f"{s}.{f.name}": f for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def short_names() -> dict[str, str]:
    """`field` -> `section.field` for field names that are unique across sections, plus aliases."""
    paths = field_paths()
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.split(".")[1]] = counts.get(p.split(".")[1], 0) + 1
    names = {p.split(".")[1]: p for p in paths if counts[p.split(".")[1]] == 1}
    names.update(ALIASES)
    return names


def _resolve_type(tp: Any) -> Any:
    return typing.get_type_hints(tp) if isinstance(tp, type) else tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a YAML/flag value against a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {_shown(value)} is not one of {', '.join(map(str, choices))}{did_you_mean(str(value), map(str, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {_shown(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {_shown(value)}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {_shown(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {_shown(value)}") from None
        if not math.isfinite(number):  # NaN passes every `< 0` check below: refuse it here
            raise ConfigError(f"{key}: expected a finite number, got {_shown(value)}")
        return number
    if tp is str:
        # YAML reads `false`, `null`, `1.0` unquoted; a boolean or null never silently becomes "False"/"None".
        if value is None or isinstance(value, (bool, dict, list)):
            raise ConfigError(f"{key}: expected a string, got {_shown(value)}")
        return str(value)
    return value


def _shown(value: Any) -> str:
    """A value as the user wrote it in YAML (true, null), not as Python prints it (True, None)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() \
        if isinstance(value, (bool, type(None))) else repr(value)


def coerce_field(value: Any, f: dataclasses.Field, tp: Any, key: str) -> Any:
    """One field's value: a flag that may stand alone (`resume`) reads true as that flag and false as off."""
    if "const" in f.metadata and (value is True or value is False
                                  or isinstance(value, str) and value.lower() in ("true", "false")):
        return f.metadata["const"] if value is True or str(value).lower() == "true" else None
    return _coerce(value, tp, key)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from a nested dict, rejecting unknown sections and keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            hint = did_you_mean(str(section), SECTIONS)
            if section in short_names() and not hint:  # a section's own near-namesake first ('optimizer')
                hint = f" (did you mean '{short_names()[section]}'?)"
            raise ConfigError(f"unknown config section '{section}'{hint}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {values!r}")
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown config key '{section}.{key}'{did_you_mean(str(key), known)}")
            kwargs[key] = coerce_field(value, known[key], hints[key], f"{section}.{key}")
        own_data = any(kwargs.get(k) for k in ("dataset", "train_file", "validation_file", "test_file"))
        if section == "data" and own_data and "task" not in kwargs:
            kwargs["task"] = None  # data of one's own, not GLUE's MRPC (the default task)
        sections[section] = cls(**kwargs)
    config = Config(**sections)
    validate(config)
    config.given = paths_in(raw)
    return config


def paths_in(raw: dict[str, Any]) -> frozenset[str]:
    """The `section.field`s a nested dict sets."""
    return frozenset(f"{s}.{k}" for s, values in raw.items() if isinstance(values, dict) for k in values)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in overrides.items():
        if isinstance(out.get(section), dict) and isinstance(values, dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or the name of a recipe shipped with tuneloop (`--config fast`)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.suffix == "" and len(p.parts) == 1:
        if (RECIPES_DIR / f"{p.name}.yaml").is_file():
            return RECIPES_DIR / f"{p.name}.yaml"
        raise ConfigError(f"config file not found: {p} (built-in recipes: {', '.join(recipe_names())})"
                          f"{did_you_mean(p.name, recipe_names())}")
    raise ConfigError(f"config file not found: {p}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
        raise ConfigError(f"config file {p} is not valid YAML{where}: {one_line(str(problem))}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    if raw is None:  # an empty file (e.g. cut short by a kill) is not "all defaults": that would train another task
        raise ConfigError(f"config file {p} is empty; give the settings it should hold (or leave out --config)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (data:, model:, optim:, ...)")
    return raw


def overrides_from_flags(flags: dict[str, Any], prefix: str = "--") -> dict[str, Any]:
    """{'learning_rate': '3e-5', 'data.task': 'sst2'} -> nested overrides; unknown names rejected."""
    paths = field_paths()
    shorts = short_names()
    nested: dict[str, dict[str, Any]] = {}
    for name, value in flags.items():
        key = name.replace("-", "_")
        if "." not in key:
            if key not in shorts:
                raise ConfigError(f"unknown option '{prefix}{name}'{did_you_mean(key, list(shorts) + list(paths))}")
            key = shorts[key]
        elif key not in paths:
            raise ConfigError(f"unknown option '{prefix}{name}'{did_you_mean(key, paths)}")
        section, fname = key.split(".")
        nested.setdefault(section, {})[fname] = value
    return nested


def load_config(path: str | Path | None = None, flags: dict[str, Any] | None = None, prefix: str = "--") -> Config:
    """YAML file (optional) + flag overrides -> validated Config."""
    raw = read_yaml(path) if path else {}
    overrides = overrides_from_flags(flags or {}, prefix=prefix)
    recipe = path is not None and resolve_config_path(path).parent == RECIPES_DIR
    if recipe:
        raw = recipe_yields_to_adapters(raw, overrides)
    config = config_from_dict(merge(raw, overrides))
    config.given = paths_in(overrides) | (frozenset() if recipe else paths_in(raw))
    return config


def recipe_yields_to_adapters(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A recipe's frozen bottom layers give way to --peft (`--config fast --peft lora` stays valid): adapters
    freeze every base weight already, and frozen layers would keep their adapters from learning. Asked for by
    name, `--freeze-layers N --peft lora` is still an error."""
    method = overrides.get("peft", {}).get("method", raw.get("peft", {}).get("method", "none"))
    if str(method).lower() in ("none", "null") or "freeze_layers" not in raw.get("optim", {}):
        return raw
    return {**raw, "optim": {k: v for k, v in raw["optim"].items() if k != "freeze_layers"}}


def validate(config: Config) -> None:
    """Value checks that need no data, section by section; the first failure is raised and names its key."""
    from tuneloop.tracking import check_report_to

    validate_data(config.data)
    validate_model(config.model)
    validate_optim(config.optim)
    validate_train(config.train)
    validate_eval(config.eval)
    validate_checkpoint(config.checkpoint)
    check_report_to(config.output.report_to)
    validate_launch(config.launch)
    validate_peft(config)
    validate_problem(config)


def _check_at_least_one(values: dict[str, int | None], message: str = "must be at least 1") -> None:
    """Each `key: value` is at least 1; a None value is an unset option and passes."""
    for key, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}: {message}, got {value}")


def validate_data(d: DataConfig) -> None:
    """One data source, a known task (normalised in place: 'SST-2' -> 'sst2'), positive lengths and sample caps."""
    from tuneloop.tasks import TASKS

    if d.task is not None:
        d.task = d.task.lower().replace("-", "")
        if d.task not in TASKS:
            raise ConfigError(f"data.task: unknown task '{d.task}'{did_you_mean(d.task, TASKS)}; known: {', '.join(TASKS)}")
    elif not d.train_file and not d.validation_file and not d.test_file and not d.dataset:
        raise ConfigError("data.task is null, so give your own data with --train-file / --validation-file "
                          "or --dataset NAME")
    if d.dataset and (d.data_dir or d.train_file or d.validation_file or d.test_file):
        raise ConfigError("data.dataset: give one data source: --dataset, --data-dir or --train-file/--validation-file")
    if not d.dataset and (d.dataset_config or d.validation_split or d.test_split or d.train_split):
        raise ConfigError("data.dataset_config/train_split/validation_split/test_split: only apply with --dataset NAME")
    if d.text_columns is not None and not 1 <= len(d.text_columns) <= 2:
        raise ConfigError(f"data.text_columns: give one or two columns, got {d.text_columns}")
    if d.label_columns is not None and (d.label_column or d.label_separator):
        raise ConfigError("data.label_columns: several 0/1 label columns replace data.label_column and "
                          "data.label_separator; give one of them")
    if d.label_columns is not None and len(set(d.label_columns)) < 2:
        raise ConfigError(f"data.label_columns: name two or more distinct 0/1 columns, got {d.label_columns}")
    if d.label_separator is not None and not d.label_separator:
        raise ConfigError("data.label_separator: give a non-empty string, e.g. ','")
    if d.text_columns and set(d.text_columns) & set(d.label_columns or []):
        raise ConfigError(f"data.label_columns: {sorted(set(d.text_columns) & set(d.label_columns))} are also text "
                          f"columns (data.text_columns), so the model would read the answer")
    if d.text_columns and d.label_column in d.text_columns:
        raise ConfigError(f"data.label_column: '{d.label_column}' is also a text column (data.text_columns), so the "
                          f"model would read the answer; name another column")
    _check_at_least_one({"data.max_length": d.max_length})
    _check_at_least_one({"data.max_train_samples": d.max_train_samples, "data.max_eval_samples": d.max_eval_samples,
                         "data.pad_to_multiple_of": d.pad_to_multiple_of}, "must be at least 1 (or null)")


def validate_model(m: ModelConfig) -> None:
    """Attention dropout in [0, 1) and an attention kernel that transformers (or tuneloop) provides."""
    from transformers import AttentionInterface

    from tuneloop.model import LEAN_ATTENTION

    if m.reinit_layers < 0:  # more layers than the model has is checked at setup, with the model
        raise ConfigError(f"model.reinit_layers: must not be negative, got {m.reinit_layers}")
    if m.attention_dropout is not None and not 0 <= m.attention_dropout < 1:
        raise ConfigError(f"model.attention_dropout: must be in [0, 1) or null, got {m.attention_dropout}")
    named = ("sdpa", LEAN_ATTENTION)
    kernels = ["sdpa", "eager", "lean", "auto", *(k for k in AttentionInterface._global_mapping if k not in named)]
    if m.attn_implementation not in kernels:
        raise ConfigError(f"model.attn_implementation: unknown attention '{m.attn_implementation}'"
                          f"{did_you_mean(m.attn_implementation, kernels)}; one of {', '.join(kernels)}")


def validate_optim(o: OptimConfig) -> None:
    """AdamW's settings in range, warmup shorter than training, and a schedule transformers knows."""
    from transformers.trainer_utils import SchedulerType

    if o.learning_rate <= 0:
        raise ConfigError(f"optim.learning_rate: must be positive, got {o.learning_rate}")
    if o.freeze_layers < 0:  # more layers than the model has is checked at setup, with the model
        raise ConfigError(f"optim.freeze_layers: must not be negative, got {o.freeze_layers}")
    if o.layer_decay is not None and not 0 < o.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay: must be in (0, 1] or null, got {o.layer_decay}")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay: must not be negative, got {o.weight_decay}")
    if not 0 <= o.adam_beta1 < 1 or not 0 <= o.adam_beta2 < 1:
        raise ConfigError("optim.adam_beta1/adam_beta2: must be in [0, 1)")
    if o.adam_epsilon <= 0:
        raise ConfigError(f"optim.adam_epsilon: must be positive, got {o.adam_epsilon}")
    if o.max_grad_norm is not None and o.max_grad_norm <= 0:
        raise ConfigError(f"optim.max_grad_norm: must be positive or null, got {o.max_grad_norm}")
    if not 0 <= o.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio: must be in [0, 1) (warmup longer than training), got {o.warmup_ratio}")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps: must not be negative, got {o.warmup_steps}")
    schedules = [s.value for s in SchedulerType]
    if o.lr_scheduler not in schedules:
        raise ConfigError(f"optim.lr_scheduler: unknown schedule '{o.lr_scheduler}'{did_you_mean(o.lr_scheduler, schedules)}")


def validate_train(t: TrainConfig) -> None:
    _check_at_least_one({"train.epochs": t.epochs, "train.batch_size": t.batch_size,
                         "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
                         "train.log_every": t.log_every})


def validate_eval(e: EvalConfig) -> None:
    _check_at_least_one({"eval.eval_batch_size": e.eval_batch_size})
    if e.eval_every < 0:
        raise ConfigError(f"eval.eval_every: must not be negative, got {e.eval_every}")
    _check_at_least_one({"eval.early_stopping_patience": e.early_stopping_patience}, "must be at least 1 (or null)")


def validate_checkpoint(c: CheckpointConfig) -> None:
    if c.checkpoint_every < 0:
        raise ConfigError(f"checkpoint.checkpoint_every: must not be negative, got {c.checkpoint_every}")
    _check_at_least_one({"checkpoint.keep_last": c.keep_last})


def validate_launch(la: LaunchConfig) -> None:
    """Process and machine counts, this machine's rank among them, and where machine 0 listens."""
    _check_at_least_one({"launch.num_processes": la.num_processes, "launch.num_machines": la.num_machines,
                         "launch.timeout": la.timeout})
    if not 0 <= la.machine_rank < la.num_machines:
        raise ConfigError(f"launch.machine_rank: must be in 0..{la.num_machines - 1} "
                          f"(launch.num_machines is {la.num_machines}), got {la.machine_rank}")
    if la.num_machines > 1 and not la.main_process_ip:
        raise ConfigError("launch.main_process_ip: several machines need the address of machine 0 (--main-process-ip)")
    if la.main_process_port is not None and not 0 < la.main_process_port < 65536:
        raise ConfigError(f"launch.main_process_port: must be a port number (1-65535), got {la.main_process_port}")


def validate_problem(config: Config) -> None:
    """Settings about the kind of problem: class weights, calibration, long documents."""
    from tuneloop.problems import parse_class_weights

    parse_class_weights(config.train.class_weights)
    from tuneloop.tasks import TASKS

    d = config.data
    if config.eval.calibrate and d.task in TASKS and TASKS[d.task].is_regression:
        raise ConfigError(f"eval.calibrate: temperature scaling calibrates class probabilities; {d.task} is a "
                          f"regression task (drop --calibrate)")
    if d.stride < 0 or (d.long_text == "chunk" and d.stride >= d.max_length):
        raise ConfigError(f"data.stride: must be in 0..max_length - 1 ({d.max_length - 1}), got {d.stride}")


def validate_peft(config: Config) -> None:
    p, o = config.peft, config.optim
    if o.head_learning_rate is not None and o.head_learning_rate <= 0:
        raise ConfigError(f"optim.head_learning_rate: must be positive or null, got {o.head_learning_rate}")
    if o.loraplus_lr_ratio is not None and o.loraplus_lr_ratio <= 0:
        raise ConfigError(f"optim.loraplus_lr_ratio: must be positive or null, got {o.loraplus_lr_ratio}")
    if config.model.reinit_layers and p.method != "none":
        raise ConfigError(f"model.reinit_layers: re-initialised layers must train, but --peft {p.method} "
                          "freezes them; use 0 with adapters")
    if o.freeze_layers and p.method != "none":
        raise ConfigError(f"optim.freeze_layers: --peft {p.method} already freezes every base layer; use 0 with adapters")
    if p.method == "none":
        if p.merge_adapter:
            raise ConfigError("peft.merge_adapter: there is no adapter to merge; add --peft lora (or adalora)")
        if o.loraplus_lr_ratio is not None:
            raise ConfigError("optim.loraplus_lr_ratio: applies to LoRA adapters; add --peft lora (or adalora)")
        return
    for key, value in {"peft.lora_rank": p.lora_rank, "peft.adalora_init_rank": p.adalora_init_rank,
                       "peft.adalora_target_rank": p.adalora_target_rank,
                       "peft.adalora_update_every": p.adalora_update_every}.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if p.lora_alpha <= 0:
        raise ConfigError(f"peft.lora_alpha: must be positive, got {p.lora_alpha}")
    if not 0 <= p.lora_dropout < 1:
        raise ConfigError(f"peft.lora_dropout: must be in [0, 1), got {p.lora_dropout}")
    if p.lora_target_modules is not None and not p.lora_target_modules:
        raise ConfigError("peft.lora_target_modules: give at least one module name, or null to find them from the model")
    if p.adalora_orth_reg_weight <= 0:  # older PEFT releases refuse 0 on the first forward
        raise ConfigError(f"peft.adalora_orth_reg_weight: must be > 0, got {p.adalora_orth_reg_weight}")
    if p.adalora_target_rank > p.adalora_init_rank:
        raise ConfigError(f"peft.adalora_target_rank: must not exceed adalora_init_rank ({p.adalora_init_rank}), "
                          f"got {p.adalora_target_rank}")
    if not (0 <= p.adalora_warmup_fraction and 0 <= p.adalora_final_fraction
            and p.adalora_warmup_fraction + p.adalora_final_fraction < 1):
        raise ConfigError("peft.adalora_warmup_fraction/adalora_final_fraction: must be non-negative with a sum below 1, "
                          f"got {p.adalora_warmup_fraction} and {p.adalora_final_fraction}")

