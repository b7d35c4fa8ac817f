"""tuneloop: fine-tune Hugging Face sequence classifiers with one transparent, correct training loop.

Python API (a notebook cell, a script)::

    import tuneloop
    metrics = tuneloop.train(task="mrpc", data_dir="glue_data/MRPC", epochs=1)       # settings named like the flags
    config = tuneloop.Config.from_dict({"data": {"task": "sst2"}, "train": {"epochs": 1}})
    metrics = tuneloop.train(config, learning_rate=3e-5)                              # a config plus overrides
    metrics = tuneloop.notebook_launch(config, num_processes=2)                       # several processes
"""

from typing import Any

from tuneloop.config import Config, load_config
from tuneloop.errors import ConfigError, DataError, TuneloopError


def configure(config: Config | None = None, **overrides: Any) -> Config:
    """The validated config of an API call: `config` (default: the defaults) with flag-named overrides."""
    from tuneloop.config import validate

    if config is None:
        return Config.from_flags(**overrides)
    if overrides:
        return config.replace(**overrides)
    validate(config)
    return config


def train(config: Config | None = None, **overrides: Any) -> dict[str, float]:
    """Fine-tune and evaluate in this process; returns the final evaluation metrics.

    `overrides` are named like the CLI flags (`task="sst2"`, `learning_rate=3e-5`, `output_dir=...`) and
    validated like them; unknown names are refused with the closest valid one.
    """
    from tuneloop.recipe import train as _train

    return _train(configure(config, **overrides))


def notebook_launch(config: Config | None = None, num_processes: int | None = None,
                    **overrides: Any) -> dict[str, float]:
    """Train on `num_processes` processes started from this notebook (GPUs, or CPU processes without GPUs);
    returns process 0's final evaluation metrics. See `tuneloop.notebook`."""
    from tuneloop.notebook import notebook_launch as _launch

    return _launch(configure(config, **overrides), num_processes)


__all__ = ["Config", "ConfigError", "DataError", "TuneloopError", "configure", "load_config", "notebook_launch",
           "train"]
