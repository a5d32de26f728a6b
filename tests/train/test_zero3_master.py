"""ZeRO-3 in fp32 keeps one copy of the weights: the optimizer's master partitions are the parameter partitions
(ofa_scale/training/zero3_master.py), and training gives bit-identical weights to DeepSpeed's own two copies, through
a DeepSpeed checkpoint save and load as well."""

import json
import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent("""
    import json, os, sys, torch, deepspeed
    from torch import nn
    from ofa_scale.training.zero3_master import share_fp32_master

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    ckpt = sys.argv[1]

    def engine(share):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
               "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "sub_group_size": 1500},
               "steps_per_print": 10**9}
        eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        freed = share_fp32_master(eng) if share else 0
        return eng, freed

    def train(eng, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randn(4, 16, generator=g)
            loss = eng(x).square().mean()
            eng.backward(loss)
            eng.step()

    def weights(eng):
        out = []
        for p in eng.module.parameters():
            with deepspeed.zero.GatheredParameters([p]):
                out.append(p.detach().clone())
        return out

    out = {}
    results = {}
    for share in (False, True):
        eng, freed = engine(share)
        opt = eng.optimizer
        shared = [m.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                  for m, p in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat)]
        train(eng, 3, 1)
        eng.save_checkpoint(os.path.join(ckpt, str(share)), tag="t")
        train(eng, 2, 2)
        after = weights(eng)
        eng2, _ = engine(share)
        eng2.load_checkpoint(os.path.join(ckpt, str(share)), tag="t")
        train(eng2, 2, 2)
        results[share] = (after, weights(eng2))
        out[str(share)] = {"freed": freed, "groups": len(shared), "shared": all(shared)}
    ref, ref_resumed = results[False]
    got, got_resumed = results[True]
    out["same"] = all(torch.equal(a, b) for a, b in zip(ref, got))
    out["same_resumed"] = all(torch.equal(a, b) for a, b in zip(ref_resumed, got_resumed))
    out["resume_exact"] = all(torch.equal(a, b) for a, b in zip(got, got_resumed))
    print("RESULT " + json.dumps(out))
""")


def test_shared_masters_train_and_resume_bit_identically(tmp_path):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29000 + os.getpid() % 1000), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["False"]["shared"] is False and out["False"]["freed"] == 0  # DeepSpeed alone keeps two copies
    assert out["True"]["shared"] is True and out["True"]["groups"] > 1
    assert out["True"]["freed"] == 4 * (16 * 64 + 64 + 64 * 64 + 64 + 64 * 4 + 4)  # one fp32 copy of the weights
    assert out["same"] and out["same_resumed"] and out["resume_exact"]
