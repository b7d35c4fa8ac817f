"""ONNX export and ONNX Runtime inference: `export --format onnx`, `predict/serve --runtime onnx`.

The exporter is PyTorch's own `torch.onnx.export` (the dynamo exporter, torch's default since 2.9), not
Optimum's: in Optimum 2.x the ONNX exporter moved to the separate `optimum-onnx` package, one more
dependency pinned to its own transformers range, while torch's exporter comes with the torch tuneloop
already runs on and traces the very model `predict` runs (adapters merged, the same attention code).
The graph has dynamic batch and sequence axes and one output, `logits`. int8 is ONNX Runtime's own
dynamic quantisation (`onnxruntime.quantization.quantize_dynamic`: int8 weights, one scale per output
channel as in `predict --quantize int8`, activations quantised per batch) of every linear layer and of the
fused attention's Q|K|V projection, after the attention's padding mask is moved to the input ONNX Runtime's
QAttention keeps (`attention_mask_as_index`).

An exported folder holds `model.onnx`, `config.json` (label names, problem type), the tokenizer files and
every other settings file of the source folder, so it predicts with onnxruntime, numpy and tokenizers alone.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

from tuneloop.errors import ConfigError, TuneloopError

ONNX_FILE = "model.onnx"
INFO_FILE = "onnx_export.json"  # label names, problem type; how it was written: exporter, opset, int8
OPSET = 18
FORMATS = ("onnx",)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".data")
NOT_COPIED = ("adapter_config.json",)  # the export is a merged, plain model


def require_onnxruntime(what: str = "the ONNX runtime", modules: tuple[str, ...] = ("onnxruntime",)):
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise TuneloopError(f"{what} needs {name}, which is not installed: pip install 'tuneloop[onnx]'") from None
    return importlib.import_module("onnxruntime")


def check_format(fmt: str | None) -> str | None:
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not supported; choose onnx (or leave it out for a "
                            f"transformers folder)")
    return fmt


def is_onnx_dir(path: str | Path) -> bool:
    return (Path(path) / ONNX_FILE).is_file()


def logits_module(model, input_names: list[str]):
    """The classifier as a function of its input tensors returning logits: the graph's one output."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(**{n: given[n] for n in input_names}).logits

    return LogitsOnly().eval()


def sample_inputs(tokenizer, input_names: list[str]):
    """Two padded pairs of different lengths: no axis of size 1, which the exporter would fix as a constant."""
    batch = tokenizer(["an example sentence to trace", "a second, longer example sentence to trace the graph"],
                      ["its pair", "and its pair too"], padding=True, return_tensors="pt")
    return tuple(batch[n] for n in input_names)


def traced_program(model, tokenizer, input_names: list[str]):
    """torch's ONNX program of the model, batch and sequence axes dynamic."""
    import logging

    import torch

    def export(axes):
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on axis names and pytree deprecations
            return torch.onnx.export(logits_module(model, input_names), sample_inputs(tokenizer, input_names),
                                     input_names=input_names, output_names=["logits"], opset_version=OPSET,
                                     dynamo=True, dynamic_shapes={n: dict(enumerate(axes)) for n in input_names},
                                     verbose=False)

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..."
    try:
        return export((torch.export.Dim("batch"), torch.export.Dim("sequence")))
    except Exception as e:
        # An older torch (2.6, tuneloop's lowest) refuses named axes over the range guards it derives itself
        # ("Constraints violated (batch, sequence)"); Dim.AUTO lets it keep them, with axes named s0, s1...
        if not any("Constraints violated" in str(c) for c in (e, e.__cause__, e.__context__)):
            raise
        return export((torch.export.Dim.AUTO, torch.export.Dim.AUTO))


def export_graph(model, tokenizer, target: Path) -> list[str]:
    """Write `target` (one file, weights inside); returns the graph's input names."""
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    program = traced_program(model, tokenizer, input_names)
    # ONNX Runtime's fused kernels (Attention, SkipLayerNormalization, BiasGelu: com.microsoft ops) in place of
    # the exporter's primitive ops: measured 1.33x fp32 predictions/s on MRPC dev (batch 32, 2-core CPU), logits
    # within 1.5e-5 of the unfused graph. The graph then needs ONNX Runtime, which is what it is exported for.
    from onnxscript import ir
    from onnxscript.rewriter import ort_fusions

    fused, _ = ort_fusions.optimize_for_ort(program.model)
    ir.save(quantizable_attention(add_and_layer_norm(fused)), str(target))
    return input_names


def add_and_layer_norm(model):
    """Each fused SkipLayerNormalization (x + skip + bias, then LayerNorm) back to Add, Add, LayerNormalization.

    ONNX Runtime's LayerNormalization kernel is the faster here: on the default model's MRPC run (408 dev pairs,
    batch 32, 2-core Xeon) 1.09x the fp32 graph's pairs/s and 1.26x the int8 graph's, side by side, with the
    same logits (within 1e-5 of torch). Only nodes whose mean and variance outputs are unused are rewritten."""
    from onnxscript import ir

    for node in list(model.graph):
        if node.op_type != "SkipLayerNormalization" or any(out.uses() for out in node.outputs[1:]):
            continue
        x, skip, gamma, beta, *bias = node.inputs
        total = ir.node("Add", [x, skip])
        steps = [total] + ([ir.node("Add", [total.outputs[0], bias[0]])] if bias and bias[0] is not None else [])
        epsilon = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-12
        norm = ir.node("LayerNormalization", [steps[-1].outputs[0], gamma, beta], {"axis": -1, "epsilon": epsilon})
        model.graph.insert_before(node, steps + [norm])
        node.outputs[0].replace_all_uses_with(norm.outputs[0], replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
    return model


def quantizable_attention(model):
    """Each fused Attention with its packed Q|K|V weight as one initializer and no `qkv_hidden_sizes`: ONNX
    Runtime's quantiser makes a QAttention only of such nodes, and leaves the others in fp32. Both changes keep
    the model's arithmetic: the weight is a Concat of initializers, and equal sizes are the attribute's default."""
    from onnxscript import optimizer

    optimizer.fold_constants(model, input_size_limit=2**31, output_size_limit=2**31)
    optimizer.remove_unused_nodes(model)
    for node in model.graph:
        sizes = node.attributes.get("qkv_hidden_sizes")
        if node.op_type == "Attention" and sizes is not None and len(set(sizes.as_ints())) == 1:
            del node.attributes["qkv_hidden_sizes"]
    return model


def biased_attention(model) -> list:
    """The fused Attention nodes that take their mask as an additive `attention_bias`."""
    return [n for n in model.graph if n.op_type == "Attention" and len(n.inputs) > 5 and n.inputs[5] is not None]


def attention_mask_as_index(model) -> list[str]:
    """Each fused Attention's padding mask read from the graph's `attention_mask` (as int32 `mask_index`)
    instead of the additive `attention_bias` the exporter builds from it; returns the rewritten nodes' names.

    ONNX Runtime's quantiser keeps `mask_index` when it turns an Attention into a QAttention but drops
    `attention_bias` (QAttention has no such input), so without this the int8 attention attended to padding:
    a pair's prediction depended on the longest pair in its batch (on the default model's MRPC run it agreed
    with fp32 on 90.7% of dev pairs, against 97.1% with the mask kept). Whether the bias really was only the
    padding mask is not assumed: `same_logits` checks the rewritten graph against the original."""
    from onnxscript import ir, optimizer

    mask = next((v for v in model.graph.inputs if v.name == "attention_mask"), None)
    nodes = biased_attention(model)
    if mask is None or not nodes:
        return []
    cast = ir.node("Cast", [mask], {"to": ir.DataType.INT32}, name="attention_mask_int32")
    model.graph.insert_before(next(iter(model.graph)), cast)
    for node in nodes:
        node.resize_inputs(4)
        node.replace_input_with(3, cast.outputs[0])
    optimizer.remove_unused_nodes(model)
    return [n.name for n in nodes]


def padded_feed(session) -> dict:
    """Two rows of token ids, the second padded after 5 of its 9 tokens: enough to tell a masked graph apart."""
    import numpy as np

    rng = np.random.default_rng(0)
    mask = np.ones((2, 9), dtype=np.int64)
    mask[1, 5:] = 0
    values = {"input_ids": rng.integers(1, 100, size=(2, 9)), "attention_mask": mask,
              "token_type_ids": np.zeros((2, 9), dtype=np.int64)}
    return {i.name: values[i.name] for i in session.get_inputs()}


def same_logits(a: bytes, b: bytes, tolerance: float = 1e-4) -> bool:
    import numpy as np

    ort = require_onnxruntime()
    first, second = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for m in (a, b))
    feed = padded_feed(first)
    return bool(np.abs(first.run(None, feed)[0] - second.run(None, feed)[0]).max() <= tolerance)


def int8_ready(source: Path, target: Path) -> list[str]:
    """`source` with every Attention's mask where a QAttention keeps it, written to `target`; returns the
    Attention nodes that still take an `attention_bias` (left out of int8, so their mask is never lost)."""
    from onnxscript import ir

    original = source.read_bytes()
    model = ir.load(str(source))
    biased = [n.name for n in biased_attention(model)]
    if attention_mask_as_index(model):
        rewritten = ir.to_proto(model).SerializeToString()
        if same_logits(original, rewritten):
            target.write_bytes(rewritten)
            return []  # every one rewritten
    target.write_bytes(original)
    return biased


def quantize_int8(source: Path, target: Path) -> None:
    """int8 weights (one scale per output channel) and per-batch int8 activations, by ONNX Runtime."""
    require_onnxruntime("int8 ONNX quantisation")
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)  # its advice to run pre-processing first, on every call
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / ONNX_FILE
        keep = int8_ready(source, ready)
        quantize_dynamic(str(ready), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=keep)


def copy_settings(source: Path, target: Path) -> None:
    """Every settings file of the saved folder (label thresholds, long-text settings...), never weights."""
    for f in Path(source).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in NOT_COPIED:
            shutil.copy2(f, target / f.name)


def export_onnx(model_dir: str, output_dir: str, quantize: str | None = None, overwrite: bool = False) -> Path:
    """`OUT/model.onnx` from any saved folder (adapters merged), with its tokenizer, config and settings."""
    from tuneloop.export import check_quantize, load_saved_model
    from tuneloop.model import build_tokenizer, resolve_model_path

    check_quantize(quantize)
    require_onnxruntime("ONNX export", ("onnx", "onnxscript", "onnxruntime"))
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TuneloopError(f"output folder {out} is not empty; pass --overwrite or choose another --output-dir")
    path = resolve_model_path(model_dir)
    model = load_saved_model(path).eval()
    tokenizer = build_tokenizer(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        copy_settings(Path(path), tmp)
        input_names = export_graph(model, tokenizer, tmp / ONNX_FILE)
        if quantize == "int8":
            (tmp / ONNX_FILE).rename(tmp / "model-fp32.onnx")
            quantize_int8(tmp / "model-fp32.onnx", tmp / ONNX_FILE)
            (tmp / "model-fp32.onnx").unlink()
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import torch

        config = model.config
        regression = config.problem_type == "regression"
        # Label names spelled out: config.json leaves out transformers' default LABEL_i names.
        info = {"labels": [config.id2label[i] for i in range(1 if regression else config.num_labels)],
                "problem_type": config.problem_type or "single_label_classification",
                "exporter": f"torch.onnx.export (dynamo), torch {torch.__version__}, onnxscript ort_fusions",
                "opset": OPSET,
                "inputs": input_names, "outputs": ["logits"], "dynamic_axes": {"0": "batch", "1": "sequence"},
                "quantize": quantize}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class OnnxModel:
    """An ONNX Runtime session called like a transformers classifier: `model(**batch).logits`, `model.config`."""

    def __init__(self, session, config, quantize: str | None):
        self.session = session
        self.config = config
        self.quantize = quantize
        self.input_names = [i.name for i in session.get_inputs()]

    def eval(self):
        return self

    def __call__(self, **batch):
        import numpy as np
        import torch

        feed = {n: np.asarray(batch[n], dtype=np.int64) for n in self.input_names}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def saved_quantize(model_dir: str | Path) -> str | None:
    info = Path(model_dir) / INFO_FILE
    return json.loads(info.read_text(encoding="utf-8")).get("quantize") if info.is_file() else None


def load_onnx_model(model_dir: str, quantize: str | None = None, threads: int | None = None,
                    spin: bool = True) -> OnnxModel:
    """The folder's ONNX model in an ONNX Runtime session; `quantize="int8"` quantises an fp32 one on loading."""
    ort = require_onnxruntime()
    from transformers import AutoConfig

    folder = Path(model_dir)
    if not is_onnx_dir(folder):
        raise TuneloopError(f"--runtime onnx: {folder} holds no {ONNX_FILE}; write one with "
                            f"tuneloop export --model-dir {folder} --output-dir DIR --format onnx")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = folder / ONNX_FILE
    if quantize == "int8" and saved_quantize(folder) != "int8":
        with tempfile.TemporaryDirectory() as tmp:
            quantize_int8(source, Path(tmp) / ONNX_FILE)
            session = ort.InferenceSession(str(Path(tmp) / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    else:
        session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return OnnxModel(session, AutoConfig.from_pretrained(folder), saved_quantize(folder) or quantize)
