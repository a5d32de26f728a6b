"""ZeRO-1/2 in fp32 keep one copy of the weights: the optimizer's fp32 partition (`single_partition_of_fp32_groups`,
which DeepSpeed always clones) becomes a view of the parameters' own flat buffer (training/zero3_master.py). Training
gives bit-identical weights to DeepSpeed's own two copies, on one process and on two data-parallel ranks, through a
DeepSpeed checkpoint save and load, and `safe_get_full_fp32_param` (the per-parameter views DeepSpeed re-links) reads
the trained values."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent("""
    import json, os, sys, torch, deepspeed
    from torch import nn
    from deepspeed.utils import safe_get_full_fp32_param
    from ofa_scale.training.zero3_master import share_fp32_master

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank = int(os.environ["RANK"])
    ckpt, stages = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]

    def engine(stage, share):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
               "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
        eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        freed = share_fp32_master(eng) if share else 0
        return eng, freed

    def train(eng, steps, seed):
        g = torch.Generator().manual_seed(seed + 100 * rank)  # different data per rank: the reduction matters
        for _ in range(steps):
            loss = eng(torch.randn(4, 16, generator=g)).square().mean()
            eng.backward(loss)
            eng.step()

    def weights(eng):
        return [p.detach().clone() for p in eng.module.parameters()]

    out = {}
    for stage in stages:
        results = {}
        for share in (False, True):
            eng, freed = engine(stage, share)
            initial = weights(eng)
            opt = eng.optimizer
            part = torch.distributed.get_rank()
            shared = [m.untyped_storage().data_ptr() == parts[part].untyped_storage().data_ptr()
                      for m, parts in zip(opt.single_partition_of_fp32_groups, opt.parallel_partitioned_bit16_groups)]
            master_bytes = sum(m.numel() * m.element_size() for m in opt.single_partition_of_fp32_groups)
            train(eng, 3, 1)
            path = os.path.join(ckpt, f"{stage}-{share}")
            eng.save_checkpoint(path, tag="t")
            train(eng, 2, 2)
            after = weights(eng)
            full_fp32 = all(torch.equal(safe_get_full_fp32_param(p), p.detach()) for p in eng.module.parameters())
            eng2, _ = engine(stage, share)
            eng2.load_checkpoint(path, tag="t")
            train(eng2, 2, 2)
            results[share] = (after, weights(eng2))
            out[f"{stage}-{share}"] = {"freed": freed, "master_bytes": master_bytes, "shared": all(shared),
                                       "full_fp32": full_fp32,
                                       "moved": not any(torch.equal(a, b) for a, b in zip(initial, after))}
        ref, ref_resumed = results[False]
        got, got_resumed = results[True]
        out[f"{stage}-same"] = all(torch.equal(a, b) for a, b in zip(ref, got))
        out[f"{stage}-same_resumed"] = all(torch.equal(a, b) for a, b in zip(ref_resumed, got_resumed))
        out[f"{stage}-resume_exact"] = all(torch.equal(a, b) for a, b in zip(got, got_resumed))
    print("RESULT " + json.dumps(out))
""")

PARAMS = 16 * 64 + 64 + 64 * 64 + 64 + 64 * 4 + 4


def _run(world: int, stages: str, tmp_path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "DS_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), stages], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
        outs.append(json.loads(line[len("RESULT "):]))
    return outs


# both stages on one process; on two ranks (where each rank's partition is a different slice) stage 2 only, as
# stages 1 and 2 share the code that finds the partition
@pytest.mark.parametrize("world,stages", [(1, (1, 2)), (2, (2,))])
def test_shared_fp32_partition_trains_and_resumes_bit_identically(world, stages, tmp_path):
    for out in _run(world, ",".join(map(str, stages)), tmp_path):
        for stage in stages:
            alone, shared = out[f"{stage}-False"], out[f"{stage}-True"]
            assert alone["shared"] is False and alone["freed"] == 0  # DeepSpeed alone keeps two copies
            assert shared["shared"] is True and shared["freed"] == shared["master_bytes"]
            # this rank's partition of one fp32 copy of the weights (DeepSpeed pads the flat buffer for alignment)
            assert 4 * PARAMS / world <= shared["freed"] < 4 * PARAMS / world + 64
            assert alone["full_fp32"] and shared["full_fp32"]
            assert shared["moved"]  # training changed every weight, so the comparisons below mean something
            assert out[f"{stage}-same"] and out[f"{stage}-same_resumed"] and out[f"{stage}-resume_exact"]
