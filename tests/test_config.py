import pytest
import yaml

from tuneloop.cli import main
from tuneloop.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_are_the_classic_recipe():
    c = Config()
    assert (c.data.task, c.train.epochs, c.train.batch_size, c.optim.learning_rate) == ("mrpc", 3, 8, 5e-5)
    assert c.optim.lr_scheduler == "linear" and c.optim.weight_decay == 0.01 and c.optim.max_grad_norm == 1.0


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  learning_rate: 3.0e-5\ntrain:\n  epochs: 2\n  batch_size: 16\n")
    c = load_config(path, {"epochs": "5", "data.task": "sst2", "text_columns": "a,b"})
    assert c.optim.learning_rate == 3e-5
    assert c.train.epochs == 5 and c.train.batch_size == 16
    assert c.data.task == "sst2" and c.data.text_columns == ["a", "b"]


def test_null_flag_and_booleans():
    c = load_config(None, {"max_grad_norm": "null", "group_by_length": "true", "overwrite": "yes"})
    assert c.optim.max_grad_norm is None and c.data.group_by_length is True and c.output.overwrite is True


@pytest.mark.parametrize("raw, message", [
    ({"optim": {"learning_rat": 1e-4}}, "unknown config key 'optim.learning_rat' (did you mean 'learning_rate'?)"),
    ({"optimizer": {}}, "unknown config section 'optimizer' (did you mean 'optim'?)"),
    ({"epochs": 3}, "unknown config section 'epochs' (did you mean 'train.epochs'?)"),
    ({"optim": {"learning_rate": -1}}, "optim.learning_rate: must be positive"),
    ({"train": {"batch_size": 0}}, "train.batch_size: must be at least 1, got 0"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size: expected an integer"),
    ({"data": {"task": "mrcp"}}, "data.task: unknown task 'mrcp' (did you mean 'mrpc'?)"),
    ({"optim": {"warmup_ratio": 1.5}}, "warmup longer than training"),
    ({"train": {"mixed_precision": "bf61"}}, "train.mixed_precision: 'bf61' is not one of no, bf16, fp16"),
    ({"optim": {"lr_scheduler": "cosnie"}}, "did you mean 'cosine'?"),
    ({"model": {"attn_implementation": "laen"}}, "model.attn_implementation: unknown attention 'laen' (did you mean 'lean'?)"),
    ({"optim": {"layer_decay": 0}}, "optim.layer_decay: must be in (0, 1] or null, got 0.0"),
    ({"optim": {"layer_decay": 1.2}}, "optim.layer_decay: must be in (0, 1] or null, got 1.2"),
    ({"optim": {"embeddings": "frozen"}}, "optim.embeddings: 'frozen' is not one of train, freeze (did you mean 'freeze'?)"),
    ({"model": {"reinit_layers": -1}}, "model.reinit_layers: must not be negative, got -1"),
    ({"model": {"reinit_layers": 1}, "peft": {"method": "lora"}}, "model.reinit_layers: re-initialised layers must train"),
    ({"optim": {"freeze_layers": -2}}, "optim.freeze_layers: must not be negative, got -2"),
    ({"optim": {"freeze_layers": 1}, "peft": {"method": "lora"}}, "optim.freeze_layers: --peft lora already freezes"),
])
def test_invalid_config_names_the_key(raw, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert message in str(e.value)


def test_corrupt_yaml_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: [1e-4\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not valid YAML" in err[0] and "Traceback" not in err[0]


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_unknown_flag_suggests(capsys):
    assert main(["train", "--learning_rat", "1e-4"]) == 2
    assert "did you mean '--learning-rate'?" in capsys.readouterr().err


def test_print_config_round_trips(tmp_path, capsys):
    assert main(["train", "--print-config", "--learning-rate", "2e-5", "--optim.warmup_ratio", "0.1",
                 "--model", "some/model"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["learning_rate"] == 2e-5 and printed["optim"]["warmup_ratio"] == 0.1
    assert printed["model"]["name_or_path"] == "some/model"
    assert config_from_dict(printed).to_dict() == printed


def test_every_short_flag_of_the_issue_exists(capsys):
    from tuneloop.config import short_names

    wanted = ["task", "data_dir", "train_file", "validation_file", "test_file", "text_columns", "label_column",
              "model", "output_dir", "epochs", "batch_size", "learning_rate", "weight_decay", "warmup_ratio",
              "max_length", "seed", "max_train_samples", "max_eval_samples", "mixed_precision",
              "gradient_accumulation_steps"]
    assert not [w for w in wanted if w not in short_names()]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--gradient-accumulation-steps" in help_text and "peak learning rate of AdamW" in help_text


def test_every_shipped_recipe_is_a_valid_config_and_loads_by_name():
    from tuneloop.config import RECIPES_DIR, recipe_names

    assert recipe_names() == ["adalora", "classic", "fast", "lora"]
    for name in recipe_names():
        assert load_config(name) == load_config(RECIPES_DIR / f"{name}.yaml")
    assert load_config("fast").train.batch_size == 32
    assert load_config("classic") == load_config(None)  # the classic recipe is exactly the defaults
    assert load_config("fast", {"batch_size": "16"}).train.batch_size == 16  # flags still override a recipe


def test_the_fast_recipes_frozen_layer_gives_way_to_adapters_but_a_named_one_does_not(tmp_path):
    assert load_config("fast").optim.freeze_layers == 1
    for method in ("lora", "adalora"):  # adapters freeze every base weight already; the recipe stays usable with them
        config = load_config("fast", {"peft": method})
        assert (config.peft.method, config.optim.freeze_layers, config.train.batch_size) == (method, 0, 32)
    assert load_config("fast", {"peft": "none"}).optim.freeze_layers == 1
    with pytest.raises(ConfigError, match="^optim.freeze_layers: --peft lora already freezes every base layer"):
        load_config("fast", {"peft": "lora", "freeze_layers": "1"})
    own = tmp_path / "own.yaml"  # a user's own file is what they asked for: still an error
    own.write_text("optim:\n  freeze_layers: 1\npeft:\n  method: lora\n")
    with pytest.raises(ConfigError, match="^optim.freeze_layers: --peft lora already freezes"):
        load_config(own)


def test_unknown_recipe_name_lists_the_built_in_ones():
    with pytest.raises(ConfigError, match=r"built-in recipes: adalora, classic, fast, lora.*did you mean 'fast'"):
        load_config("fsat")


def test_attention_dropout_must_be_a_probability():
    assert load_config(None, {"model.attention_dropout": "0"}).model.attention_dropout == 0.0
    with pytest.raises(ConfigError, match=r"model.attention_dropout: must be in \[0, 1\) or null, got 1.0"):
        load_config(None, {"model.attention_dropout": "1"})


def test_lora_recipe_trains_adapters_with_a_larger_learning_rate():
    config = load_config("lora")
    assert config.peft.method == "lora" and config.optim.learning_rate > load_config(None).optim.learning_rate

def test_config_in_code_is_short_and_checked_like_the_flags():
    from tuneloop.config import Config

    config = Config.from_flags(task="sst2", learning_rate=3e-5, **{"train.epochs": 1})
    assert (config.data.task, config.optim.learning_rate, config.train.epochs) == ("sst2", 3e-5, 1)
    assert Config.from_dict({"train": {"epochs": 2}, "optim": {"learning_rate": "1e-4"}}).optim.learning_rate == 1e-4
    fast = Config.from_flags("fast", epochs=1)  # a recipe, then overrides
    assert (fast.train.batch_size, fast.train.epochs) == (32, 1)
    copy = config.replace(batch_size=4)
    assert copy.train.batch_size == 4 and config.train.batch_size == 8 and copy.data.task == "sst2"
    with pytest.raises(ConfigError, match=r"^unknown option 'learning_rat' \(did you mean 'learning_rate'\?\)$"):
        Config.from_flags(learning_rat=3e-5)
    with pytest.raises(ConfigError, match=r"^unknown config key 'train.epoch' \(did you mean 'epochs'\?\)$"):
        Config.from_dict({"train": {"epoch": 1}})
    with pytest.raises(ConfigError, match="train.batch_size: must be at least 1"):
        config.replace(batch_size=0)


def test_an_empty_config_file_is_an_error_not_the_default_recipe(tmp_path, capsys):
    empty = tmp_path / "best_config.yaml"
    empty.write_text("")  # e.g. a search killed while writing it (before writes were atomic)
    assert main(["train", "--config", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tuneloop: error: config file {empty} is empty; give the settings it should hold (or leave out --config)"


@pytest.mark.parametrize("text, path, expected", [
    ("checkpoint:\n  resume: false\n", "checkpoint.resume", None),  # before: the string "False"
    ("checkpoint:\n  resume: true\n", "checkpoint.resume", "latest"),
    ("checkpoint:\n  resume: null\n", "checkpoint.resume", None),
    ("output:\n  overwrite: false\n", "output.overwrite", False),
    ("optim:\n  max_grad_norm: null\n", "optim.max_grad_norm", None),
    ("train:\n  gradient_checkpointing: true\n", "train.gradient_checkpointing", True),
    ("train:\n  compile: false\n", "train.compile", False),
])
def test_yaml_booleans_and_nulls_are_read_as_such(tmp_path, text, path, expected):
    (tmp_path / "c.yaml").write_text(text)
    section, name = path.split(".")
    assert getattr(getattr(load_config(tmp_path / "c.yaml"), section), name) == expected


@pytest.mark.parametrize("raw, message", [
    ({"output": {"push_to_hub": False}}, "output.push_to_hub: expected a string, got false"),
    ({"data": {"task": True}}, "data.task: expected a string, got true"),
    ({"data": {"text_columns": [None]}}, "data.text_columns: expected a string, got null"),
    ({"model": {"attn_implementation": None}}, "model.attn_implementation: expected a string, got null"),
    ({"optim": {"learning_rate": float("nan")}}, "optim.learning_rate: expected a finite number, got nan"),
    ({"optim": {"max_grad_norm": float("inf")}}, "optim.max_grad_norm: expected a finite number"),
    ({"train": {"epochs": True}}, "train.epochs: expected an integer, got true"),
    ({"train": {"mixed_precision": False}}, "train.mixed_precision: false is not one of"),
    ({"data": {1: 2}}, "unknown config key 'data.1'"),
])
def test_yaml_booleans_and_nulls_never_become_strings(raw, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert message in str(e.value)


def test_own_files_without_task_are_a_task_of_ones_own(tmp_path):
    assert Config.from_flags(train_file="reviews.csv").data.task is None  # before: mrpc
    assert Config.from_flags(validation_file="dev.csv").data.task is None
    assert Config.from_flags(train_file="reviews.csv", task="sst2").data.task == "sst2"
    assert Config.from_flags(data_dir="glue/MRPC").data.task == "mrpc"


def test_given_records_what_the_user_set_not_the_recipe(tmp_path):
    c = Config.from_flags("fast", learning_rate=3e-5)
    assert c.optim.learning_rate == 3e-5 and c.train.batch_size == 32
    assert c.given == {"optim.learning_rate"}
    (tmp_path / "mine.yaml").write_text("train:\n  epochs: 1\n")
    assert load_config(tmp_path / "mine.yaml", {"seed": "3"}).given == {"train.epochs", "train.seed"}
    assert c.replace(epochs=1).given == {"optim.learning_rate", "train.epochs"}


def test_yaml_with_a_control_character_is_one_line(tmp_path):
    """Found by tests/test_fuzz.py: PyYAML's reader error spans two lines."""
    (tmp_path / "c.yaml").write_bytes(b"\x1f")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(e.value) and "not valid YAML: special characters are not allowed" in str(e.value)


@pytest.mark.parametrize("path", sorted(__import__("tuneloop.config", fromlist=["field_paths"]).field_paths()))
@pytest.mark.parametrize("value", [True, False, None])
def test_every_field_reads_yaml_booleans_and_nulls_as_such(path, value):
    """For each field: a YAML true/false/null is kept as the boolean or null (or its flag's meaning), or refused;
    it never becomes the text 'True', 'False' or 'None'."""
    section, name = path.split(".")
    try:
        config = config_from_dict({section: {name: value}})
    except ConfigError:
        return
    got = getattr(getattr(config, section), name)
    assert got not in ("True", "False", "None", "true", "false", "null")
    assert got == value or (path == "checkpoint.resume" and got == "latest" and value is True) \
        or (path == "checkpoint.resume" and got is None and value is False) \
        or (path == "data.task" and value is None and got is None)
