"""CLIP-SCST (text-to-image stage 2, extensions §10.6.3) on 2 ranks under ZeRO-3 with a random-weight CLIP and a
tiny model: in each micro-batch one rank samples codes while the other holds only padding rows, so that rank's
placeholder forwards must run the same (code-mode) modules or ZeRO-3's per-module gathers hang; and the sampled
codes must not depend on the layout (a per-micro-batch generator), so the step equals one process running all
four micro-batches."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
import parallel_launch  # noqa: E402
from image_gen_helpers import train_tokenizer  # noqa: E402

WORKER = Path(__file__).with_name("image_gen_scst_workers.py")


@pytest.mark.slow
def test_clip_scst_zero3_two_ranks_finish_and_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel_launch, "WORKER", WORKER)
    tok = str(train_tokenizer(tmp_path / "tok"))
    one = parallel_launch.launch("image_gen_scst", 1, tmp_path / "one", timeout=240, tokenizer=tok)
    two = parallel_launch.launch("image_gen_scst", 2, tmp_path / "two", timeout=240, tokenizer=tok)
    assert two[0]["stats"] == two[1]["stats"]  # global values, the same on every rank
    s1, s2 = one[0]["stats"], two[0]["stats"]
    # 2 captions x 2 micro-batches x 3 samples of 64 codes + eos
    assert s2["hypotheses"] == s1["hypotheses"] == 12 and s2["tokens"] == s1["tokens"] == 12 * 65
    assert s2["reward"] == pytest.approx(s1["reward"], rel=1e-6)
    assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-4, abs=1e-6) and math.isfinite(s2["loss"])
    assert one[0]["changed"] and two[0]["changed"]
    a, b = torch.load(tmp_path / "one" / "delta.pt"), torch.load(tmp_path / "two" / "delta.pt")
    for n, d in a.items():  # the update of every parameter
        torch.testing.assert_close(b[n], d, rtol=1e-3, atol=1e-7, msg=n)
