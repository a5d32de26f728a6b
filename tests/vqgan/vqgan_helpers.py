"""Small taming-format VQGAN checkpoints for the tests, synthesised from taming's key layout (spec §10.5.3)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

# A GumbelVQ with OFA's structure (f = 8, attention at the lowest resolution) but tiny channel counts.
SMALL_DD = {"double_z": False, "z_channels": 32, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
SMALL_YAML = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.GumbelVQ",
                        "params": {"kl_weight": 1.0e-8, "embed_dim": 32, "n_embed": 64, "monitor": "val/rec_loss",
                                   "temperature_scheduler_config": {
                                       "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                                       "params": {"warm_up_steps": 0, "max_decay_steps": 1000001}},
                                   "ddconfig": SMALL_DD,
                                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}


def _conv(shapes: dict, key: str, cout: int, cin: int, k: int) -> None:
    shapes[f"{key}.weight"] = (cout, cin, k, k)
    shapes[f"{key}.bias"] = (cout,)


def _norm(shapes: dict, key: str, c: int) -> None:
    shapes[f"{key}.weight"] = (c,)
    shapes[f"{key}.bias"] = (c,)


def _resblock(shapes: dict, key: str, cin: int, cout: int) -> None:
    _norm(shapes, f"{key}.norm1", cin)
    _conv(shapes, f"{key}.conv1", cout, cin, 3)
    _norm(shapes, f"{key}.norm2", cout)
    _conv(shapes, f"{key}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(shapes, f"{key}.nin_shortcut", cout, cin, 1)


def _attn(shapes: dict, key: str, c: int) -> None:
    _norm(shapes, f"{key}.norm", c)
    for m in ("q", "k", "v", "proj_out"):
        _conv(shapes, f"{key}.{m}", c, c, 1)


def taming_gumbel_shapes(dd: dict, n_embed: int, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """Every `state_dict` key of taming's GumbelVQ and its shape, written out from the layout of §10.5.2/§10.5.3
    (independently of ofa_scale.vqgan, so a naming slip there shows up as a missing/extra key)."""
    s: dict[str, tuple[int, ...]] = {}
    ch, mult, nrb = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
    levels, res = len(mult), dd["resolution"]
    _conv(s, "encoder.conv_in", ch, 3, 3)
    cin = ch
    for i in range(levels):
        cout = ch * mult[i]
        for b in range(nrb):
            _resblock(s, f"encoder.down.{i}.block.{b}", cin, cout)
            cin = cout
            if res in dd["attn_resolutions"]:
                _attn(s, f"encoder.down.{i}.attn.{b}", cout)
        if i != levels - 1:
            _conv(s, f"encoder.down.{i}.downsample.conv", cout, cout, 3)
            res //= 2
    for part in ("encoder", "decoder"):
        c = ch * mult[-1]
        _resblock(s, f"{part}.mid.block_1", c, c)
        _attn(s, f"{part}.mid.attn_1", c)
        _resblock(s, f"{part}.mid.block_2", c, c)
    _norm(s, "encoder.norm_out", cin)
    _conv(s, "encoder.conv_out", dd["z_channels"], cin, 3)
    _conv(s, "decoder.conv_in", ch * mult[-1], dd["z_channels"], 3)
    cin = ch * mult[-1]
    for i in reversed(range(levels)):
        cout = ch * mult[i]
        for b in range(nrb + 1):
            _resblock(s, f"decoder.up.{i}.block.{b}", cin, cout)
            cin = cout
            if res in dd["attn_resolutions"]:
                _attn(s, f"decoder.up.{i}.attn.{b}", cout)
        if i != 0:
            _conv(s, f"decoder.up.{i}.upsample.conv", cout, cout, 3)
            res *= 2
    _norm(s, "decoder.norm_out", cin)
    _conv(s, "decoder.conv_out", 3, cin, 3)
    _conv(s, "quantize.proj", n_embed, dd["z_channels"], 1)
    s["quantize.embed.weight"] = (n_embed, embed_dim)
    _conv(s, "quant_conv", embed_dim, dd["z_channels"], 1)
    _conv(s, "post_quant_conv", dd["z_channels"], embed_dim, 1)
    return s


def synthesised_state(seed: int = 0) -> dict[str, torch.Tensor]:
    p = SMALL_YAML["model"]["params"]
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in taming_gumbel_shapes(p["ddconfig"], p["n_embed"], p["embed_dim"]).items():
        t = torch.randn(shape, generator=gen)
        if k.endswith(".weight") and len(shape) == 4:  # keep activations O(1) through the stack
            t *= (shape[1] * shape[2] * shape[3]) ** -0.5
        elif "norm" in k and k.endswith(".weight"):
            t = 1.0 + 0.1 * t
        else:
            t *= 0.1
        state[k] = t
    return state


def write_taming_dir(directory: Path, state: dict[str, torch.Tensor] | None = None, *, extra: dict | None = None,
                     doc: dict | None = None) -> Path:
    """DIR/model.yaml + DIR/last.ckpt as a Lightning run leaves them (plus a discriminator under `loss.`)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = dict(synthesised_state() if state is None else state)
    state.setdefault("loss.discriminator.main.0.weight", torch.zeros(4, 3, 4, 4))
    ckpt = {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8", "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
            "lr_schedulers": []}
    ckpt.update(extra or {})
    torch.save(ckpt, directory / "last.ckpt")
    (directory / "model.yaml").write_text(yaml.safe_dump(doc or SMALL_YAML))
    return directory
