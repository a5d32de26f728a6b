"""Issue 8 §4, pipelines: OFA's patch sampling under pp = 2 trains like the single process, and a pp = 2 run resumed
from DeepSpeed's own checkpoint (engine.save_checkpoint / load_checkpoint, same layout) continues with exactly the
losses of the uninterrupted run: the tied embedding is in DeepSpeed's files."""

from pathlib import Path

import pytest
import torch

from parallel_launch import launch

pytestmark = pytest.mark.slow  # three multi-process DeepSpeed runs

STEPS = 4
SAVE_AT = 2
SPN = 3  # of the 2×2 patches of a 32 px image
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    init = root / "init"
    launch("write_init", 1, root / "write_init", dir=str(init))
    common = dict(init=str(init), spn=SPN)
    ckpt = root / "ds-ckpt"
    out = {
        "ref": launch("train", 1, root / "ref", steps=STEPS, **common),
        "pp2": launch("train", 2, root / "pp2", steps=STEPS, pp=2, partition="parameters", ds_save_at=SAVE_AT,
                      ds_save_dir=str(ckpt), **common),
    }
    out["pp2-resumed"] = launch("train", 2, root / "pp2-resumed", steps=STEPS - SAVE_AT, pp=2,
                                partition="parameters", ds_load=str(ckpt), **common)
    out["ckpt"] = ckpt
    return out


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def test_pipeline_with_patch_sampling_matches_the_single_process(runs):
    ref = runs["ref"][0]["losses"]
    assert len(ref) == STEPS and ref[0] != pytest.approx(ref[-1], rel=1e-3)
    for r in runs["pp2"]:
        for step, (got, want) in enumerate(zip(r["losses"], ref), 1):
            assert rel(got, want) < LOSS_RTOL, f"step {step}: pp=2 loss {got} vs {want}"


def test_same_layout_resume_from_deepspeed_checkpoint_is_exact(runs):
    uninterrupted = runs["pp2"][0]["losses"][SAVE_AT:]
    for r in runs["pp2-resumed"]:
        assert r["losses"] == uninterrupted  # bit-identical, not just close
    # both ends of the pipeline saved the tied embedding as a layer of their own (layers: tied embedding, encoder
    # embedding, 2 encoder layers, decoder embedding, 2 decoder layers, decoder norm, tied embedding)
    for index in (0, 8):
        (path,) = Path(runs["ckpt"], "saved").glob(f"layer_{index:02d}-*model_states.pt")
        assert list(torch.load(path, weights_only=True)) == ["embedding.weight"]
