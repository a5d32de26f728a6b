"""The collective policy (docs/interfaces.md §7): one module issues every collective, the default group has a backend
for CPU tensors and for the accelerator's, and every tensor the trainer reduces is on a device its group serves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ofa_scale.parallel import collectives

PACKAGE = Path(__file__).resolve().parents[2] / "ofa_scale"
OWNER = PACKAGE / "parallel" / "collectives.py"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "barrier", "broadcast", "broadcast_object_list", "gather", "gather_object", "irecv", "isend", "recv", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send", "monitored_barrier",
    "batch_isend_irecv", "all_reduce_coalesced",
}


def _distributed_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to torch.distributed (modules) and to its collective functions in one file."""
    modules, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed":
                    modules.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if node.module == "torch" and a.name == "distributed":
                    modules.add(a.asname or "distributed")
                elif node.module.startswith("torch.distributed") and a.name in COLLECTIVES:
                    functions.add(a.asname or a.name)
                elif node.module == "deepspeed" and a.name == "comm":
                    modules.add(a.asname or "comm")
    return modules, functions


def _collective_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, functions = _distributed_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in functions:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {f.id}")
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            base = ast.unparse(f.value)
            if base in modules or base in ("torch.distributed", "dist", "deepspeed.comm"):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {base}.{f.attr}")
    return found


def test_every_collective_goes_through_the_collectives_module():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != OWNER for hit in _collective_calls(path)]
    assert offenders == [], "collectives outside ofa_scale/parallel/collectives.py:\n" + "\n".join(offenders)


def test_the_scan_finds_direct_calls(tmp_path):
    """The scanner itself: each way of reaching a torch.distributed collective is caught."""
    sample = PACKAGE / "_scan_probe_tmp.py"
    sample.write_text("import torch.distributed as dist\nfrom torch.distributed import all_gather as ag\n"
                      "import torch\n\ndef f(t):\n    dist.all_reduce(t)\n    ag([t], t)\n"
                      "    torch.distributed.barrier()\n")
    try:
        hits = _collective_calls(sample)
    finally:
        sample.unlink()
    assert [h.split(" ")[1] for h in hits] == ["dist.all_reduce", "ag", "torch.distributed.barrier"]


@pytest.mark.parametrize("device_type,backend,served", [
    ("cpu", "gloo", {"cpu"}),
    ("cuda", "cpu:gloo,cuda:nccl", {"cpu", "cuda"}),
    ("xpu", "cpu:gloo,xpu:xccl", {"cpu", "xpu"}),
])
def test_backend_choice_per_device_type(device_type, backend, served):
    assert collectives.backend_for(device_type) == backend
    assert collectives.device_types(backend) == served
    assert collectives.device_types("nccl") == {"cuda"}  # what DeepSpeed alone would create on a GPU node


def test_unknown_device_type_is_refused():
    with pytest.raises(ValueError, match="no collective backend"):
        collectives.backend_for("tpu")


def test_a_tensor_the_group_cannot_serve_fails_with_the_device_named(monkeypatch):
    """Under an NCCL-only group (DeepSpeed's default on GPUs) a CPU tensor is refused here, on any machine."""
    monkeypatch.setattr(collectives, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(RuntimeError, match="cpu tensor.*'nccl'"):
        collectives.all_reduce(torch.zeros(2))


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group(collectives.backend_for("cpu"), init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_trainer_reductions_use_cpu_tensors(one_process_group):
    """The trainer's own reductions (stop flag, loss denominators, metric sums, memory peaks) are CPU tensors,
    which the cpu:gloo entry serves on every machine; recording shows each call's device."""
    from ofa_scale.training.memory import MemoryMeter
    from ofa_scale.training.metrics import TaskAccumulator
    from ofa_scale.training.stop import StopRequest

    collectives.start_recording()
    try:
        stop = StopRequest()
        stop.after_step()
        stop.restore()
        acc = TaskAccumulator(["caption"])
        acc.add(torch.zeros(1, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool),
                torch.ones(1, 3, dtype=torch.bool), rows=1, input_tokens=3)
        acc.all_reduce()
        MemoryMeter().step_record()
        collectives.reduce_sum_list([1.0, 2.0])
    finally:
        calls = collectives.stop_recording()
    ops = [op for _, op in calls]
    assert "all_reduce(max)" in ops and "all_reduce(sum)" in ops
    assert {device for device, _ in calls} == {"cpu"}
    assert {device for device, _ in calls} <= collectives.device_types(collectives.backend_for("cuda"))
