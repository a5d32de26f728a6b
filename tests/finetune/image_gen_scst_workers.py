"""Multi-process scenario of CLIP-SCST (text-to-image stage 2) under DeepSpeed ZeRO-3, one process per rank,
launched by tests/parallel/parallel_launch.launch with this file as the worker (see finetune_workers.py).

    python image_gen_scst_workers.py image_gen_scst OUT_DIR PARAMS_JSON   (RANK, WORLD_SIZE, MASTER_* set)
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))

from finetune_workers import full_values  # noqa: E402
from parallel_workers import ds_config, init_dist  # noqa: E402

CAPTIONS = ["a red circle on a plain background", "two blue squares", "a green star", "a yellow triangle"]
CODE_SIZE = 64  # an 8x8 code grid: 64 codes + eos per sample (the recipe's 1024 only lengthen the loop)


def micro_batch(task, tok, index: int, real: bool) -> dict:
    """A collated image_gen group of 2 rows: two captions, or the Collator's padding rows (no references, text
    mode, task id -1), which is all a rank holds at the end of an epoch that does not fill its batch."""
    from closed_set_helpers import collate

    records = [{"key": f"c{index}{i}", "image": None,
                "meta": {"uniq_id": f"c{index}{i}", "caption": CAPTIONS[(2 * index + i) % len(CAPTIONS)],
                         "codes": [0] * task.codes_per_image}} for i in range(2)]
    examples = [ex for r in records for ex in task.train_examples(r)]
    gb = collate(examples, "image_gen", task.lengths(), 16, len(tok))
    if not real:
        for key in ("src_tokens", "prev_output_tokens", "target"):
            gb[key] = torch.full_like(gb[key], 1)
        gb["code_masks"] = torch.zeros_like(gb["code_masks"])
        gb["task_ids"] = torch.full_like(gb["task_ids"], -1)
        gb["references"] = [[], []]
    return gb


def scenario_image_gen_scst(out: Path, p: dict) -> dict:
    """One CLIP-SCST step over the global batch [captions on micro-batch 0, padding on 1] for rank 0 and the
    reverse for rank 1 (one process: all four, in rank order): in each micro-batch one rank samples codes while
    the other has nothing to generate and must still run the same ZeRO-3 forwards (in code mode)."""
    import deepspeed

    from image_gen_helpers import image_gen_task, tiny_model
    from ofa_scale.data.tokenizer import load_tokenizer
    from ofa_scale.evaluation.clip_model import ClipScorer
    from ofa_scale.finetune.freeze import freeze_batchnorm
    from ofa_scale.finetune.image_gen import ClipReward
    from ofa_scale.finetune.scst import run_scst_step
    from ofa_scale.objectives.batching import to_model_inputs
    from ofa_scale.training.step import GroupsForward

    rank, world = init_dist()
    plan = {0: [(0, True), (1, False)], 1: [(2, False), (3, True)]}
    mine = plan[rank] if world == 2 else plan[0] + plan[1]
    tok = load_tokenizer("sentencepiece", p["tokenizer"], num_bins=2)
    task = image_gen_task(tok, samples=3, criterion="scst", extra={"code_image_size": CODE_SIZE})
    reward = ClipReward(ClipScorer.random("tiny", seed=1, device="cpu"))
    settings, reward, decode = task.scst_parts("cpu", reward=reward)
    model = tiny_model(len(tok), code_image_size=CODE_SIZE)
    freeze_batchnorm(model)  # BatchNorm statistics of 2-row batches would differ between the layouts
    initial = {n: q.detach().float().clone() for n, q in model.named_parameters()}
    wrapped = GroupsForward(model)
    layout = SimpleNamespace(zero_stage=3, pp=1)
    engine, *_ = deepspeed.initialize(model=wrapped, config=ds_config(layout, len(mine), partition_all=True),
                                      model_parameters=[q for q in wrapped.parameters() if q.requires_grad])
    ctx = SimpleNamespace(dp_size=world, dp_group=None, tp_size=1, tp_rank=0,
                          layout=SimpleNamespace(vocab_size=len(tok)))
    batches = [{"vl": micro_batch(task, tok, i, real)} for i, real in mine]
    stats = run_scst_step(engine, ctx, batches, model=model, to_inputs=lambda g, gb, m: to_model_inputs(gb, "cpu"),
                          settings=settings, reward=reward, decode=decode)
    after = full_values(model)
    delta = {n: after[n] - initial[n] for n in initial}
    if rank == 0:
        torch.save(delta, out / "delta.pt")
    return {"stats": vars(stats), "changed": any(bool(d.abs().max() > 0) for d in delta.values())}


if __name__ == "__main__":
    import parallel_workers

    parallel_workers.scenario_image_gen_scst = scenario_image_gen_scst
    parallel_workers.main()
