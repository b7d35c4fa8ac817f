"""Fast inference over a saved model, outside training: int8 quantisation and `tuneloop export`.

Two int8 paths, chosen by measurement on this CPU (MiniLM-L6, batch 32 x 64 tokens, eager mode):
- `predict --quantize int8` swaps every Linear layer for PyTorch's dynamic int8 Linear
  (`torch.ao.quantization.quantize_dynamic`, fbgemm/oneDNN int8 GEMMs): 0.14 s vs 0.25 s per batch in fp32.
  Weights get one scale per output channel: with one scale per matrix (quantize_dynamic's default) the
  default command's MiniLM lost 2.7 points of MRPC dev accuracy (0.821 -> 0.794), per channel 0.7 (0.814).
  On CPUs with AMX the layers are packed for oneDNN, whose AMX int8 kernels were 1.16-1.36x the default
  engine's speed on the whole model here (`int8_engine`).
  PyTorch has deprecated that module in favour of torchao, but torchao's int8 dynamic-activation config
  ran at 0.27 s per batch in eager mode here (no faster than fp32; it needs torch.compile, 80 s of
  compilation per run on 2 cores, to get ahead). Where torch.ao.quantization is gone, torchao is used.
- `export --quantize int8` must write a model that loads without tuneloop, which a module swap cannot
  give: the weights are quantised with torchao through transformers' `TorchAoConfig`, saved as
  safetensors, and load with plain `AutoModelForSequenceClassification.from_pretrained` (or `pipeline`)
  once `torchao` is installed.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from tuneloop import atomic
from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.precision import cpu_has_amx

QUANTIZE_CHOICES = ("int8",)
# Written into every export: `--overwrite` replaces a folder only when this says an earlier export made it.
EXPORT_MARKER = ".tuneloop-export.json"


def check_quantize(quantize: str | None) -> str | None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize: {quantize!r} is not supported; the one choice is int8 (dynamic int8 Linear "
                          f"layers on CPU); int4 and float8 have no fast CPU kernels here")
    return quantize


def int8_engine() -> str:
    """oneDNN where the CPU has AMX tiles, else PyTorch's default quantized engine (x86: fbgemm + oneDNN).

    On the 2-core Xeon with AMX, MRPC dev prediction with oneDNN's int8 Linear ran at 1.16x the default engine's
    pairs/s in the efficiency benchmark (233.5 vs 200.9; fp32 126.6) and 1.36x in a first side-by-side run
    (382 vs 281), with the same predictions; on a CPU without AMX it is unmeasured, so the default stays there."""
    if cpu_has_amx() and "onednn" in torch.backends.quantized.supported_engines:
        return "onednn"
    return torch.backends.quantized.engine


def quantize_dynamic_int8(model: torch.nn.Module, engine: str | None = None) -> torch.nn.Module:
    """Linear layers with int8 weights and per-batch int8 activations, for CPU inference (a copy: the input stays).

    The weights are packed for `engine` (default `int8_engine()`); the packed layers run with that engine's kernels
    whatever the global engine is later, so the global setting is restored once they are packed. (The torchao
    fallback, where torch.ao.quantization is gone, has no engine to choose.)"""
    import copy

    model = copy.deepcopy(model).eval()
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        return _torchao_int8(model)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine or int8_engine()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice: see the module docstring for why it is used
            return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    finally:
        torch.backends.quantized.engine = previous


def _torchao_config():
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    except ImportError:
        raise TuneloopError("int8 export needs torchao, which is not installed: pip install 'tuneloop[int8]' "
                            "(or pip install torchao)") from None
    return Int8DynamicActivationInt8WeightConfig()


def _torchao_int8(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import quantize_

    quantize_(model, _torchao_config())
    return model


def load_saved_model(model_dir: str):
    """A folder written by `tuneloop train` (OUT/model with an adapter, OUT/model-merged, a full model) or `export`."""
    from transformers import AutoModelForSequenceClassification

    from tuneloop.adapters import is_adapter_dir, load_adapter_model
    from tuneloop.model import resolve_model_path, saved_label_names

    path = resolve_model_path(model_dir)
    if is_adapter_dir(path):
        return load_adapter_model(path, saved_label_names(path))
    try:
        return AutoModelForSequenceClassification.from_pretrained(path)
    except ImportError as e:  # an int8 export read without torchao
        raise TuneloopError(f"cannot load {path}: {str(e).splitlines()[0]}") from None


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_export_dir(out: Path, overwrite: bool) -> Path:
    """An empty or new folder, or (with --overwrite) an earlier export; anything else is refused, never removed."""
    if out.exists() and not out.is_dir():
        raise TuneloopError(f"output path {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise TuneloopError(f"output folder {out} is not empty; pass --overwrite or choose another --output-dir")
    if not (out / EXPORT_MARKER).is_file():
        what = "a training run" if any((out / m).exists() for m in ("config.yaml", "metrics.jsonl", "checkpoints")) \
            else "not an earlier export"
        raise TuneloopError(f"output folder {out} is {what} (no {EXPORT_MARKER}): --overwrite replaces only an "
                            f"earlier export, nothing in it was touched; choose an empty --output-dir")
    return out


def export(model_dir: str, output_dir: str, quantize: str | None = None, overwrite: bool = False) -> Path:
    """Write a standalone model folder: adapters merged, optionally int8 weights (torchao), tokenizer included."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_quantize(quantize)
    out = check_export_dir(Path(output_dir), overwrite)
    config = _torchao_config() if quantize == "int8" else None  # fail on a missing torchao before any work
    model = load_saved_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if config is not None:
            from transformers import TorchAoConfig

            # Reloaded through transformers so config.json records the quantisation and from_pretrained restores it.
            quantized = AutoModelForSequenceClassification.from_pretrained(tmp, quantization_config=TorchAoConfig(config))
            for f in tmp.glob("*.safetensors"):
                f.unlink()
            quantized.save_pretrained(tmp, safe_serialization=True)
        atomic.write_json(tmp / EXPORT_MARKER, {"source": str(model_dir), "quantize": quantize})
        if out.exists():  # an earlier export (check_export_dir made sure): moved aside first, so a crash loses neither
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
