"""ZeRO-3 needs to know every parameter a module's forward touches that the module does not own.

ZeRO-3 gathers a module's own parameters just before its forward. OFA's model reads several parameters
directly from their holders instead of calling them: relative-position tables (`F.embedding(bucket,
table.weight)`), `type_embedding.weight[0]`, position tables sliced by length, and the shared token embedding used
as the output projection. Under ZeRO-3 those arrive partitioned (empty) and the backward fails with a shape error.

Rather than keeping a hand-written list in sync with the model, `find_external_parameters` runs one forward on a
real micro-batch (before DeepSpeed partitions anything) and records, with a TorchFunctionMode, every parameter an
op receives while a module that does not own it is the innermost running module.

The parameters found are registered as external parameters of the *whole model*, not of the innermost module
that used them: ZeRO-3 re-gathers a module's parameters for backward through hooks on the tensors the module
returns, and the encoder returns a dataclass (EncoderOut) whose tensors those hooks cannot see, so registering on
the encoder would leave its parameters partitioned during backward. The model returns a plain logits tensor. The
cost is that these parameters (small tables, and the shared token embedding) stay gathered for the whole
forward/backward of a micro-batch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class _ParameterUseRecorder(TorchFunctionMode):
    def __init__(self, owner: dict[int, nn.Module]):
        super().__init__()
        self.owner = owner
        self.stack: list[nn.Module] = []
        self.found: dict[tuple[int, int], tuple[nn.Module, nn.Parameter]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack:
            current = self.stack[-1]
            for value in _flat(args, kwargs):
                if isinstance(value, nn.Parameter) and self.owner.get(id(value)) is not current:
                    self.found[(id(current), id(value))] = (current, value)
        return func(*args, **kwargs)


def _flat(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


def find_external_parameters(model: nn.Module, run_forward: Callable[[], object]) -> list[tuple[nn.Module, nn.Parameter]]:
    """(module, parameter) pairs where the module's own forward code uses a parameter it does not register."""
    owner: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
    recorder = _ParameterUseRecorder(owner)
    def enter(module, _args):
        recorder.stack.append(module)  # hooks must return None: a returned value would replace args/outputs

    def leave(_module, _args, _out):
        recorder.stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), recorder:
            run_forward()
    finally:
        for h in handles:
            h.remove()
    return list(recorder.found.values())


def register_external_parameters(model: nn.Module, pairs: list[tuple[nn.Module, nn.Parameter]]) -> int:
    """Register each parameter found once, on `model` (see the module docstring); returns how many."""
    from deepspeed.runtime.zero import register_external_parameter

    seen: set[int] = set()
    for _module, param in pairs:
        if id(param) not in seen:
            seen.add(id(param))
            register_external_parameter(model, param)
    return len(seen)
