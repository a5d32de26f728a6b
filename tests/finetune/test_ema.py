"""EMA of the weights (train.ema_decay / train.ema_start): fp32 shadows of the trainable parameters, fairseq's
update rule, the swap used for validation, checkpoint state, and under ZeRO-3 (each rank averages only its
partition) the same EMA as one process."""

import sys
from pathlib import Path

import pytest
import torch

from ofa_scale.errors import UserError
from ofa_scale.finetune.ema import EMA, full_ema_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
import parallel_launch  # noqa: E402

WORKER = Path(__file__).with_name("finetune_workers.py")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.bn = torch.nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.frozen(self.lin(x.to(torch.bfloat16)).float()))


def set_weights(net, value: float):
    with torch.no_grad():
        net.lin.weight.fill_(value)
        net.lin.bias.fill_(-value)


def test_update_rule_start_and_fp32_shadows():
    net = Net()
    w0 = net.lin.weight.detach().float().clone()
    ema = EMA(net, decay=0.75, start=0)
    assert set(ema.shadow) == {"lin.weight", "lin.bias", "bn.weight", "bn.bias"}  # frozen params are not averaged
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())  # bf16 weights, fp32 average
    set_weights(net, 1.0)
    ema.update(1)
    set_weights(net, 2.0)
    ema.update(2)
    want = 0.75 * (0.75 * w0 + 0.25 * 1.0) + 0.25 * 2.0
    torch.testing.assert_close(ema.shadow["lin.weight"], want, rtol=0, atol=1e-7)

    # before update `start` the average follows the weights (fairseq: decay 0 while updates < ema_start_update)
    late = EMA(net, decay=0.75, start=3)
    set_weights(net, 4.0)
    late.update(2)
    assert torch.equal(late.shadow["lin.weight"], torch.full((2, 3), 4.0))
    set_weights(net, 8.0)
    late.update(3)
    torch.testing.assert_close(late.shadow["lin.weight"], torch.full((2, 3), 0.75 * 4.0 + 0.25 * 8.0))


def test_swapped_computes_with_the_ema_and_restores_the_live_weights_exactly():
    net = Net()
    ema = EMA(net, decay=0.5)
    set_weights(net, 0.3)
    ema.update(1)  # shadow: halfway between the initial weights and 0.3
    live = {n: t.detach().clone() for n, t in net.state_dict().items()}
    x = torch.randn(4, 3)
    net.eval()
    with ema.swapped():
        inside = net(x)
        assert torch.equal(net.lin.weight, ema.shadow["lin.weight"].to(torch.bfloat16))
    reference = Net()
    reference.load_state_dict(live)
    with torch.no_grad():
        reference.lin.weight.copy_(ema.shadow["lin.weight"])
        reference.lin.bias.copy_(ema.shadow["lin.bias"])
    reference.eval()
    torch.testing.assert_close(inside, reference(x))
    for n, t in net.state_dict().items():
        assert torch.equal(t, live[n]), n

    with pytest.raises(RuntimeError, match="boom"), ema.swapped():  # restored on errors too
        raise RuntimeError("boom")
    assert torch.equal(net.lin.weight, live["lin.weight"])


def test_state_dict_round_trip_and_mismatch():
    net = Net()
    ema = EMA(net, decay=0.9)
    set_weights(net, 1.0)
    ema.update(5)
    other = EMA(Net(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 5
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])
    unfrozen = Net()
    unfrozen.frozen.requires_grad_(True)
    with pytest.raises(UserError, match="freeze"):
        EMA(unfrozen, decay=0.9).load_state_dict(ema.state_dict())
    with pytest.raises(UserError, match="ema_decay"):
        EMA(net, decay=1.0)


def test_full_state_dict_single_process():
    net = Net()
    ema = EMA(net, decay=0.5)
    set_weights(net, 1.0)
    ema.update(1)
    full = full_ema_state_dict(ema)
    assert set(full) == {n for n, _ in net.named_parameters()}
    assert torch.equal(full["lin.weight"], ema.shadow["lin.weight"])
    assert torch.equal(full["frozen.weight"], net.frozen.weight)


@pytest.mark.slow
def test_zero3_two_ranks_equal_one_process(tmp_path, monkeypatch):
    """ZeRO-3 over 2 ranks (each rank's shadow is its partition: half the model) gives the EMA of one process;
    inside swapped() the gathered weights are the EMA, afterwards the live weights are back bit for bit and
    training continues identically. Small parameters stay gathered between steps (ZeRO-3 persistence), large
    ones are partitioned: both paths are exercised."""
    monkeypatch.setattr(parallel_launch, "WORKER", WORKER)
    params = dict(zero=3, decay=0.6, start=2, steps=3)
    one = parallel_launch.launch("ema", 1, tmp_path / "one", **params)
    two = parallel_launch.launch("ema", 2, tmp_path / "two", **params)
    for r in one + two:
        assert r["restored"]
    assert one[0]["inside_is_ema"] and two[0]["inside_is_ema"]
    assert two[0]["shadow_numel"] < 0.6 * two[0]["full_numel"]  # each rank holds about half
    assert 0 < two[0]["kept_gathered"] < two[0]["trainable"]  # persistent and partitioned parameters both swapped
    assert one[0]["shadow_numel"] >= one[0]["full_numel"]
    # per step: one process runs micro-batches (0, 1), the two ranks one each; the step after the swap included
    by_rank = torch.stack([torch.tensor(two[0]["losses"]), torch.tensor(two[1]["losses"])], dim=1)
    torch.testing.assert_close(by_rank, torch.tensor(one[0]["losses"]).view(-1, 2), rtol=1e-4, atol=1e-6)
    a = torch.load(tmp_path / "one" / "ema.pt")
    b = torch.load(tmp_path / "two" / "ema.pt")
    for n, t in a["ema"].items():
        torch.testing.assert_close(b["ema"][n], t, rtol=1e-5, atol=1e-6, msg=n)
    # the EMA moved away from the live weights (3 steps, decay 0.6), so the comparison is not trivial
    assert any(not torch.allclose(a["ema"][n], a["live"][n]) for n in a["ema"])
    torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-4, atol=1e-5)
