"""The model is ZeRO-3-clean: every parameter an op reads belongs to the module whose forward is running.

ZeRO-3 gathers a module's own (direct) parameters just before that module's forward and may release them right
after; a parameter read by any other module's code arrives partitioned (empty). So the property checked here, with
a TorchFunctionMode that sees every torch op, is: whenever an op receives an nn.Parameter, the innermost module
whose forward is running registers that parameter itself. Attribute reads that need no data (`.dtype`, `.shape`)
are not ops on the parameter's values and are allowed. The 2-rank ZeRO-3 training run that matches the single
process is in tests/parallel (test_equivalence.py, layout "dp2z3", every parameter partitioned).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.generate import GenerationConfig, generate

_DATA_FREE = {"dtype", "shape", "device", "requires_grad", "is_floating_point", "dim", "size", "ndim"}


class _ForeignParameterUse(TorchFunctionMode):
    """Records (running module, parameter name, op) for every op that receives a parameter the innermost running
    module does not register directly."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.stack: list[nn.Module] = []
        self.violations: set[tuple[str, str, str]] = set()
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name == "__get__":  # property read (e.g. weight.dtype): no values touched
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if self.stack and name not in _DATA_FREE:
            current = self.stack[-1]
            own = {id(p) for p in current.parameters(recurse=False)}
            for value in _flat(args, kwargs):
                if isinstance(value, nn.Parameter):
                    self.checked += 1
                    if id(value) not in own:
                        self.violations.add((self.module_names.get(id(current), type(current).__name__),
                                             self.names.get(id(value), "?"), name))
        return func(*args, **kwargs)


def _flat(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, (list, tuple)):
            yield from _flat(value, {})
        else:
            yield value


def foreign_parameter_uses(model: nn.Module, run) -> tuple[set, int]:
    recorder = _ForeignParameterUse(model)

    def enter(module, _args):
        recorder.stack.append(module)

    def leave(_module, _args, _out):
        recorder.stack.pop()

    handles = [h for m in model.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with recorder:
            run()
    finally:
        for h in handles:
            h.remove()
    return recorder.violations, recorder.checked


CFG = OFAConfig.preset("ofa_tiny", d_model=32, ffn_dim=64, heads=2, encoder_layers=2, decoder_layers=2,
                       vocab_size=300, attention_impl="math")


def _batch(b: int = 3):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 300, (b, 9), generator=g)
    src[0, -2:] = CFG.pad_token_id
    return dict(src_tokens=src, patch_images=torch.randn(b, 3, 64, 64, generator=g),
                patch_masks=torch.tensor([True, False, True][:b]),
                prev_output_tokens=torch.randint(4, 300, (b, 7), generator=g))


def test_the_recorder_catches_a_table_read_through_weight():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(5, 3)
            self.proj = nn.Linear(3, 3)

        def forward(self, ids):
            return self.proj(nn.functional.embedding(ids, self.table.weight)) + self.proj.bias

    model = Holder()
    violations, _ = foreign_parameter_uses(model, lambda: model(torch.tensor([1, 2])))
    assert {(v[0], v[1]) for v in violations} == {("", "table.weight"), ("", "proj.bias")}


def test_training_forward_uses_every_parameter_inside_its_owner():
    torch.manual_seed(0)
    model = OFAModel(CFG).train()
    batch = _batch()
    logits = []

    def run():
        logits.append(model(**batch))
        logits.append(model(**batch, code_masks=torch.tensor([False, True, False])))
        logits.append(model(**batch, sample_patch_num=5, patch_generator=torch.Generator().manual_seed(3)))

    violations, checked = foreign_parameter_uses(model, run)
    assert violations == set()
    # every parameter was seen by some op (the recorder is not vacuous)
    assert checked >= len(list(model.parameters()))
    # the tied weight reached the loss through the module that owns it under OFA's name
    assert model.decoder.output_projection.weight is model.encoder.embed_tokens.weight
    logits[1].logsumexp(-1).mean().backward()
    assert model.encoder.embed_tokens.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_generation_uses_every_parameter_inside_its_owner():
    torch.manual_seed(0)
    model = OFAModel(CFG).eval()
    batch = _batch(2)
    del batch["prev_output_tokens"]
    violations, _ = foreign_parameter_uses(
        model, lambda: generate(model, batch, GenerationConfig(beam_size=2, max_len_b=4)))
    assert violations == set()


def test_encoder_out_is_a_tuple_zero3_hooks_walk():
    torch.manual_seed(0)
    model = OFAModel(CFG).eval()
    batch = _batch()
    out = model.encoder(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
    assert isinstance(out, tuple) and out.states.shape[0] == 3
    # DeepSpeed rebuilds a namedtuple from its elements after wrapping each tensor; the decoder reads it the same
    rebuilt = type(out)(*[t.clone() if isinstance(t, torch.Tensor) else t for t in out])
    assert torch.equal(model.decoder(batch["prev_output_tokens"], rebuilt),
                       model.decoder(batch["prev_output_tokens"], out))
    picked = out.index_select(torch.tensor([2, 0]))
    assert torch.equal(picked.states, out.states[[2, 0]]) and picked.num_image_tokens == out.num_image_tokens
