"""torch.compile settings: modes, bounded padding, CUDA-graph step marks (the compiled GPU run: test_gpu.py)."""

import torch

from tuneloop.compiling import COMPILE_PAD_MULTIPLE, compile_padding, dynamo_kwargs, mark_cudagraph_steps
from tuneloop.config import load_config


def test_modes_reach_accelerate():
    assert dynamo_kwargs(False) == {"dynamo_backend": "no"}
    plugin = dynamo_kwargs(True)["dynamo_plugin"]
    assert (str(plugin.backend.value).lower(), plugin.mode) == ("inductor", "default")
    plugin = dynamo_kwargs("reduce-overhead")["dynamo_plugin"]
    assert (plugin.mode, plugin.dynamic) == ("reduce-overhead", False)
    assert load_config(None, {"train.compile": "reduce-overhead"}).train.compile == "reduce-overhead"
    assert load_config(None, {"train.compile": "true"}).train.compile is True


def test_cuda_graphs_get_a_bounded_set_of_lengths():
    assert compile_padding(False, None) is None and compile_padding(False, 8) == 8
    assert compile_padding(True, None) == 8 and compile_padding(True, 16) == 16
    assert compile_padding("reduce-overhead", 8) == COMPILE_PAD_MULTIPLE == 32
    assert compile_padding("reduce-overhead", 64) == 64
    lengths = {-(-n // 32) * 32 for n in range(1, 129)}
    assert lengths == {32, 64, 96, 128}


def test_each_forward_starts_a_cudagraph_step(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = torch.nn.Linear(2, 2)
    mark_cudagraph_steps(model, True)
    model(torch.zeros(1, 2))
    assert marks == []
    mark_cudagraph_steps(model, "reduce-overhead")
    model(torch.zeros(1, 2))
    model(torch.zeros(1, 2))
    assert marks == [1, 1]
