"""tuneloop: fine-tune Hugging Face sequence classifiers with one transparent, correct training loop.

Python API::

    from tuneloop import Config, train
    config = Config()
    config.data.data_dir = "glue_data/MRPC"
    metrics = train(config)
"""

from tuneloop.config import Config, load_config
from tuneloop.errors import ConfigError, DataError, TuneloopError


def train(config: Config) -> dict[str, float]:
    """Fine-tune and evaluate as configured; returns the final evaluation metrics."""
    from tuneloop.config import validate
    from tuneloop.recipe import train as _train

    validate(config)
    return _train(config)


__all__ = ["Config", "ConfigError", "DataError", "TuneloopError", "load_config", "train"]
