"""Multi-process scenarios for the finetuning step features (freezing, EMA, SCST) on a tiny OFA under DeepSpeed,
one process per rank, launched by tests/parallel/parallel_launch.launch with this file as the worker.

    python finetune_workers.py SCENARIO OUT_DIR PARAMS_JSON      (RANK, WORLD_SIZE, MASTER_* in the environment)

Every rank writes OUT_DIR/result{rank}.json (and scenarios may write tensors next to it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))

from parallel_workers import (GLOBAL_MICRO_BATCHES, ds_config, freeze_batchnorm_stats, init_dist,  # noqa: E402
                              micro_batch, tiny_config)

PAD = 1


def build_engine(p: dict, gas: int, prepare=None, groups: bool = False):
    """The seeded tiny OFA (identical on every rank), `prepare(model)` applied, under DeepSpeed ZeRO-`p["zero"]`;
    `groups`: wrapped in the trainer's GroupsForward (engine({group: inputs}) -> {group: logits})."""
    import deepspeed

    from ofa_scale.model import OFAModel
    from ofa_scale.training.step import GroupsForward

    torch.manual_seed(0)
    model = OFAModel(tiny_config())
    if prepare is not None:
        prepare(model)
    wrapped = GroupsForward(model) if groups else model
    layout = SimpleNamespace(zero_stage=p.get("zero", 3), pp=1)
    engine, *_ = deepspeed.initialize(model=wrapped, config=ds_config(layout, gas, p.get("partition_all", False)),
                                      model_parameters=[q for q in wrapped.parameters() if q.requires_grad])
    return model, engine


def train_steps(engine, steps: int, dp_rank: int, dp: int, after_step=None) -> list[float]:
    """`steps` optimizer steps over parallel_workers' fixed micro-batches (GLOBAL_MICRO_BATCHES per step, split
    over the data-parallel ranks); token-mean loss per micro-batch."""
    from ofa_scale.objectives.token_loss import SingleProcessTokenLoss

    loss_fn = SingleProcessTokenLoss(0.1, PAD)
    gas = GLOBAL_MICRO_BATCHES // dp
    losses = []
    engine.train()
    for step in range(steps):
        for i in range(dp_rank * gas, (dp_rank + 1) * gas):
            b = micro_batch(step, i)
            logits = engine(src_tokens=b["src_tokens"], patch_images=b["patch_images"], patch_masks=b["patch_masks"],
                            prev_output_tokens=b["prev_output_tokens"], code_masks=b["code_masks"])
            tl = loss_fn(logits, b["target"], conf=b["conf"], constraint_masks=b["constraint_masks"])
            loss = tl.loss.sum() / tl.valid.sum()
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        if after_step is not None:
            after_step(step + 1)
    return losses


def full_values(model) -> dict[str, torch.Tensor]:
    """Every parameter's full value (gathered under ZeRO-3; collective) and every buffer, as CPU copies."""
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        out = {n: q.detach().float().clone() for n, q in model.named_parameters()}
    out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


def scenario_freeze(out: Path, p: dict) -> dict:
    """Embedding + ResNet frozen before deepspeed.initialize; 3 steps with the model in train mode."""
    from ofa_scale.finetune.freeze import apply_freezing

    rank, world = init_dist()
    frozen_names: list[str] = []

    def prepare(model):
        apply_freezing(model, encoder_embedding=True, decoder_embedding=True, resnet=True)
        frozen_names.extend(n for n, q in model.named_parameters() if not q.requires_grad)

    model, engine = build_engine(p, GLOBAL_MICRO_BATCHES // world, prepare)
    before = full_values(model)
    train_steps(engine, 3, rank, world)
    after = full_values(model)
    stats = [n for n in before if n.startswith("encoder.embed_images.") and ("running" in n or "num_batches" in n)]
    trainable = [n for n, _ in model.named_parameters() if n not in frozen_names]
    return {
        "frozen": frozen_names,
        "frozen_identical": [n for n in frozen_names if torch.equal(before[n], after[n])],
        "bn_stats": stats,
        "bn_stats_identical": [n for n in stats if torch.equal(before[n], after[n])],
        "trainable_changed": [n for n in trainable if not torch.equal(before[n], after[n])],
        "trainable": trainable,
        "bn_training": [m.training for m in model.encoder.embed_images.modules()
                        if isinstance(m, torch.nn.BatchNorm2d)],
    }


def scenario_ema(out: Path, p: dict) -> dict:
    """EMA over `steps` steps (decay, start from params); rank 0 saves the gathered EMA weights and what the model
    holds inside and after `swapped()`."""
    from ofa_scale.finetune.ema import EMA, _gathered, full_ema_state_dict

    rank, world = init_dist()
    model, engine = build_engine(p, GLOBAL_MICRO_BATCHES // world, freeze_batchnorm_stats)
    ema = EMA(model, decay=p["decay"], start=p.get("start", 0))
    losses = train_steps(engine, p["steps"], rank, world, after_step=ema.update)
    full = full_ema_state_dict(ema)
    live_before = full_values(model)
    trainable = list(ema.params.values())
    persistent = [q for q in trainable if getattr(q, "ds_persist", False)]
    if persistent:  # GatheredParameters released them; after engine.step() ZeRO-3 holds them gathered
        persistent[0].all_gather(persistent)
    kept_gathered = len(_gathered(trainable))
    with ema.swapped():
        # a forward inside the block runs with the EMA weights: the persistent parameters' gathered data and the
        # partitions ZeRO-3 gathers on the way
        b = micro_batch(0, 0)
        model.eval()
        with torch.no_grad():
            logits = engine(src_tokens=b["src_tokens"], patch_images=b["patch_images"], patch_masks=b["patch_masks"],
                            prev_output_tokens=b["prev_output_tokens"], code_masks=b["code_masks"])
        model.train()
        inside = full_values(model)
    live_after = full_values(model)
    # training continues from the live weights
    more = train_steps(engine, 1, rank, world)
    state = ema.state_dict()
    if rank == 0:
        torch.save({"ema": full, "inside": inside, "live": live_before, "logits": logits.detach()},
                   out / "ema.pt")
    return {
        "losses": losses + more,
        "inside_is_ema": all(torch.equal(inside[n], full[n]) for n in ema.shadow) if rank == 0 else None,
        "kept_gathered": kept_gathered, "trainable": len(trainable),
        "restored": all(torch.equal(live_before[n], live_after[n]) for n in live_before),
        "shadow_numel": sum(t.numel() for t in state["shadow"].values()),
        "full_numel": sum(q.ds_numel if hasattr(q, "ds_numel") else q.numel() for q in ema.params.values()),
    }


def scst_micro_batch(index: int, with_images: bool) -> dict:
    """A collated caption group of 2 rows: two images with references, or two padding rows (no references)."""
    b = micro_batch(0, index)
    b["patch_images"] = ((b["patch_images"].clamp(-1, 1) * 0.5 + 0.5) * 255).to(torch.uint8)  # collated: uint8
    b["patch_masks"] = torch.tensor([True, True])
    b["code_masks"] = torch.tensor([False, False])
    b["task_ids"] = torch.tensor([0, 0]) if with_images else torch.tensor([-1, -1])
    b["references"] = [["w5 w6", "w7"], ["w8 w9 w10"]] if with_images else [[], []]
    if not with_images:
        b["src_tokens"] = torch.full_like(b["src_tokens"], PAD)
        b["patch_masks"] = torch.tensor([False, False])
    return b


def scst_reward(texts, refs):
    """Deterministic reward (the tests of the real CIDEr-D reward are elsewhere): tokens with an even id."""
    return [float(sum(int(w[1:]) % 2 == 0 for w in t.split())) for t in texts]


def scenario_scst(out: Path, p: dict) -> dict:
    """One SCST step under ZeRO-3 over the global batch [images on micro-batch 0, padding on 1] for rank 0 and the
    reverse for rank 1 (one process: all four micro-batches, in rank order): the ranks decode different numbers of
    steps and one of them has nothing to generate in each micro-batch."""
    from ofa_scale.finetune.freeze import freeze_batchnorm
    from ofa_scale.finetune.scst import ScstSettings, run_scst_step
    from ofa_scale.model import OFAModel
    from ofa_scale.model.generate import EOS, GenerationConfig
    from ofa_scale.objectives.batching import to_model_inputs

    rank, world = init_dist()
    # rank r's micro-batches; the one-process run holds both ranks' in rank order
    plan = {0: [(0, True), (1, False)], 1: [(2, False), (3, True)]}
    mine = plan[rank] if world == 2 else plan[0] + plan[1]
    gas = len(mine)

    # BatchNorm statistics of 2-row batches would differ between the layouts: eval mode, as --freeze-resnet keeps it
    model, engine = build_engine(dict(zero=3, partition_all=True), gas, freeze_batchnorm, groups=True)
    ctx = SimpleNamespace(dp_size=world, dp_group=None, tp_size=1, tp_rank=0,
                          layout=SimpleNamespace(vocab_size=tiny_config().vocab_size))
    settings = ScstSettings(generation=GenerationConfig(beam_size=5, max_len_b=5, no_repeat_ngram_size=3,
                                                        nbest=5))
    batches = [{"vl": scst_micro_batch(i, imgs)} for i, imgs in mine]
    stats = run_scst_step(engine, ctx, batches, model=model, to_inputs=lambda g, gb, m: to_model_inputs(gb, "cpu"),
                          settings=settings, reward=scst_reward,
                          decode=lambda t: " ".join(f"w{i}" for i in t.tolist() if i != EOS))
    after = full_values(model)
    torch.manual_seed(0)
    initial = OFAModel(tiny_config()).state_dict()
    delta = {n: after[n] - initial[n].float() for n, _ in model.named_parameters()}
    if rank == 0:
        torch.save(delta, out / "delta.pt")
    return {"stats": vars(stats), "changed": any(bool(d.abs().max() > 0) for d in delta.values())}


if __name__ == "__main__":
    import parallel_workers

    # parallel_workers' entry point runs `scenario_<name>` from its own module namespace: add ours to it
    for _name, _fn in list(globals().items()):
        if _name.startswith("scenario_"):
            setattr(parallel_workers, _name, _fn)
    parallel_workers.main()
