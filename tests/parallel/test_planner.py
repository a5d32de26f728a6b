"""ofa-plan: parameter counts, FLOPs, stage balancing, memory against what the layouts really hold, the CLI."""

import itertools
import random
import subprocess
import sys

import pytest
import torch

from ofa_scale.errors import ConfigError
from ofa_scale.model import OFAModel
from ofa_scale.model.config import OFAConfig
from ofa_scale.model.flops import step_flops
from ofa_scale.parallel import planner
from ofa_scale.parallel.planner import ARCHS, Hardware, Workload, enumerate_plans, rank_memory, total_params
from ofa_scale.parallel.planner_cli import main
from ofa_scale.parallel.stage_balance import balanced_split, block_costs, forward_flops

# spec §4.1, "verified param counts"
SPEC_PARAMS = {"ofa_tiny": 33_488_336, "ofa_medium": 92_892_000, "ofa_base": 182_238_536,
               "ofa_large": 472_977_152, "ofa_huge": 929_486_848}


@pytest.mark.parametrize("arch", sorted(SPEC_PARAMS))
def test_parameter_count_of_every_preset_matches_the_spec(arch):
    assert total_params(ARCHS[arch]) == SPEC_PARAMS[arch]


def test_parameter_count_of_a_custom_size_matches_the_built_model():
    cfg = OFAConfig(d_model=96, ffn_dim=200, heads=6, encoder_layers=3, decoder_layers=2, vocab_size=1000,
                    resnet="resnet101", max_source_positions=100, max_target_positions=50)
    with torch.device("meta"):
        model = OFAModel(cfg)
    assert total_params(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,image,src,tgt", [("ofa_tiny", 256, 40, 20), ("ofa_huge", 480, 128, 64),
                                                  ("ofa_base", 384, 80, 30)])
def test_per_block_flops_add_up_to_the_model_flop_count(arch, image, src, tgt):
    cfg = OFAConfig.preset(arch)
    assert forward_flops(cfg, image, src, tgt).total(cfg) == step_flops(cfg, 1, src, tgt, image).forward


def test_flop_balance_reflects_ofa_costs():
    cfg = ARCHS["ofa_base"]
    fb = forward_flops(cfg, 384, 80, 30)
    assert 2.5 < fb.encoder_layer / fb.decoder_layer < 8  # long image sequence: encoder layers cost more
    assert 0.25 < fb.resnet / fb.total(cfg) < 0.4  # the stem is about a third of ofa_base's compute


def test_presets_are_the_models_own():
    for name in ("ofa_tiny", "ofa_medium", "ofa_base", "ofa_large", "ofa_huge"):
        assert ARCHS[name] == OFAConfig.preset(name)
    assert total_params(ARCHS["ofa_10b"]) == pytest.approx(11.17e9, rel=1e-3)  # the README's planning-only size


@pytest.mark.parametrize("arch,pp,tp", [("ofa_base", 2, 1), ("ofa_large", 4, 2), ("ofa_huge", 3, 1)])
def test_planned_stages_are_the_pipeline_modules_stages(arch, pp, tp):
    """The planner predicts with the split the pipeline module makes at run time (one implementation)."""
    from types import SimpleNamespace

    from ofa_scale.parallel.pipeline import stage_blocks

    cfg, w = ARCHS[arch], Workload(64, 384, 80, 30)
    plan = planner.plan_layout(cfg, w, Hardware(pp * tp * 2), tp, pp, 1, False, 4)
    layout = SimpleNamespace(partition="flops", pp=pp, tp=tp)
    assert plan.stage_layers == stage_blocks(layout, cfg, 384, 80, 30)
    assert len(plan.stage_layers) == pp and sum(plan.stage_layers) == cfg.encoder_layers + cfg.decoder_layers + 3


def test_block_costs_by_parameters_and_uniform():
    cfg = ARCHS["ofa_base"]
    costs = block_costs(cfg, "parameters")
    assert len(costs) == len(block_costs(cfg, "uniform")) == cfg.encoder_layers + cfg.decoder_layers + 3
    # the tied embedding is held (and counted) by both the first and the last block
    assert sum(costs) == total_params(cfg) + cfg.vocab_size * cfg.d_model
    with pytest.raises(ConfigError, match="unknown pipeline partition method 'layers'"):
        block_costs(cfg, "layers")


def test_runtime_stage_balancing_does_not_import_the_planner():
    code = ("import sys; from types import SimpleNamespace as NS; from ofa_scale.model.config import OFAConfig; "
            "from ofa_scale.parallel.pipeline import stage_blocks; "
            "cfg = OFAConfig.preset('ofa_base'); "
            "blocks = [stage_blocks(NS(partition=m, pp=3, tp=1), cfg) for m in ('flops', 'parameters', 'uniform')]; "
            "assert all(sum(b) == 15 for b in blocks), blocks; "
            "bad = sorted(m for m in sys.modules if m.startswith('ofa_scale.parallel.planner')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_balanced_split_minimises_the_slowest_stage():
    rng = random.Random(0)
    for _ in range(60):
        costs = [rng.uniform(0.1, 5.0) for _ in range(rng.randint(3, 9))]
        parts = rng.randint(1, len(costs))
        runs = balanced_split(costs, parts)
        assert len(runs) == parts and sum(runs) == len(costs) and min(runs) >= 1
        best = min(_bottleneck(costs, cut) for cut in _cuts(len(costs), parts))
        assert _bottleneck(costs, runs) == pytest.approx(best)


def _bottleneck(costs, runs):
    out, start = [], 0
    for n in runs:
        out.append(sum(costs[start:start + n]))
        start += n
    return max(out)


def _cuts(n, parts):
    for points in itertools.combinations(range(1, n), parts - 1):
        edges = (0, *points, n)
        yield [b - a for a, b in zip(edges, edges[1:])]


def test_predicted_model_state_memory_matches_what_each_rank_holds(layout_runs):
    """fp32 runs on CPU: parameters held per rank and Adam's state per rank, measured vs predicted (10%)."""
    from parallel_launch import LAYOUTS
    from parallel_workers import tiny_config

    arch = tiny_config()
    for name in ("ref", "tp2", "pp2", "tp2pp2", "tp2dp2z3", "pp2dp2z1"):
        spec = LAYOUTS[name]
        tp, pp, zero = spec.get("tp", 1), spec.get("pp", 1), spec.get("zero", 1)
        dp = spec["world"] // (tp * pp)
        for r in layout_runs[name]["ranks"]:
            blocks = r["stage_blocks"] or [arch.encoder_layers + arch.decoder_layers + 3]
            mem = rank_memory(arch, tp, dp, zero, "fp32", blocks)[r["pp_rank"]]
            assert r["local_params"] == pytest.approx(mem.params_held, rel=0.01), name
            assert 4 * r["optimizer_numel"] == pytest.approx(mem.optimizer, rel=0.10), name
            if zero == 3:
                assert 4 * r["zero3_partition"] == pytest.approx(mem.params, rel=0.10), name


def test_plans_fit_in_memory_and_are_ranked_by_step_time():
    a, w, hw = ARCHS["ofa_huge"], Workload(4096, 480), Hardware(512, gpu_mem_gb=80)
    plans = enumerate_plans(a, w, hw)
    assert plans and all(p.mem_total_gb <= 80 for p in plans)
    times = [p.step_time for p in plans]
    assert times == sorted(times)
    for p in plans:
        assert p.tp * p.pp * p.dp == 512 and p.micro_batch * p.micro_batches * p.dp == 4096
        assert not (p.pp > 1 and p.zero > 1)
    # more GPU memory can only add layouts
    assert len(enumerate_plans(a, w, Hardware(512, gpu_mem_gb=16))) < len(plans)


def test_zero_stages_trade_memory_for_communication():
    a, w, hw = ARCHS["ofa_10b"], Workload(1024, 480), Hardware(64)
    z = {zero: planner.plan_layout(a, w, hw, 2, 1, zero, True, 4) for zero in (1, 2, 3)}
    assert z[1].mem_optimizer_gb == z[3].mem_optimizer_gb and z[1].mem_grads_gb > z[2].mem_grads_gb
    assert z[3].mem_params_gb < z[2].mem_params_gb
    assert z[3].t_dp > z[2].t_dp >= z[1].t_dp


def test_cli_prints_a_ranked_table(capsys):
    assert main(["--arch", "ofa_huge", "--gpus", "64", "--global-batch", "512", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "ofa_huge: 0.93B parameters" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert len(rows) == 3
    assert main(["--layers", "8", "--hidden", "512", "--heads", "8", "--gpus", "8", "--global-batch", "64",
                 "--image-size", "256"]) == 0
    assert "custom d=512 L=8+4" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--gpus", "8", "--global-batch", "8"], "name a preset with --arch"),
    (["--arch", "ofa_huge", "--hidden", "64", "--gpus", "8", "--global-batch", "8"], "not both"),
    (["--layers", "4", "--hidden", "100", "--heads", "3", "--gpus", "8", "--global-batch", "8"],
     "must be divisible by --heads"),
    (["--layers", "4", "--hidden", "64", "--heads", "0", "--gpus", "8", "--global-batch", "8"],
     "--heads must be a positive integer, not 0"),  # not a ZeroDivisionError
])
def test_cli_errors_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("ofa-plan: error:")


@pytest.mark.parametrize("flag,value,needle", [
    ("--tflops", "-400", "--tflops must be a positive finite number, not -400"),
    ("--tflops", "nan", "--tflops must be a positive finite number, not nan"),
    ("--gpu-mem-gb", "inf", "--gpu-mem-gb must be a positive finite number, not inf"),
    ("--inter-node-gbs", "0", "--inter-node-gbs must be a positive finite number"),
    ("--gpus", "-8", "--gpus must be a positive integer, not -8"),
    ("--image-size", "0", "--image-size must be a positive integer"),
    ("--top", "-1", "--top must be 0"),
])
def test_cli_refuses_negative_zero_and_nan_numbers(capsys, flag, value, needle):
    assert main(["--arch", "ofa_base", "--gpus", "8", "--global-batch", "64", flag, value]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert needle in err and "\n" not in err and err.startswith("ofa-plan: error:") and captured.out == ""


def test_cli_reports_when_nothing_fits(capsys):
    assert main(["--arch", "ofa_10b", "--gpus", "8", "--gpu-mem-gb", "16", "--global-batch", "8"]) == 1
    assert "no layout fits in 16 GB" in capsys.readouterr().err
