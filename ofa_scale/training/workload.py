"""What the trainer trains: OFA multitask pretraining assembled from the data, objectives and model packages.

Everything here is built from the config without process groups (tokenizer, model config, checks on data.root),
except the loader, which needs this rank's data-parallel coordinates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.objectives.config import GROUPS, TASKS


# Dense peak TFLOP/s per GPU for MFU (bf16/fp16 tensor cores, no sparsity); matched on the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "V100": 125.0}


class OFAPretraining:
    """OFA multitask pretraining for one TrainingConfig: tokenizer, model config, loader, model inputs, MFU."""

    def __init__(self, cfg):
        self.cfg = cfg
        root = Path(cfg.data.root)
        if not (root / "manifest.json").is_file():
            raise UserError(f"data.root {root} holds no manifest.json; point it at the output of "
                            f"`ofa-preprocess shards`")
        self.tokenizer, self.model_config = tokenizer_and_model_config(cfg)
        self.pad = int(self.tokenizer.pad)
        self.tasks = list(TASKS)
        self.groups = list(GROUPS)
        self.negatives_dir = Path(cfg.data.negatives) if cfg.data.negatives else root / "negatives"
        self.objectives = cfg.objectives  # a finetuning workload builds its own (one "vl" group)
        self._flops: Optional[int] = None
        self.composition()  # ratio/micro-batch mismatches fail here, before any process group

    # ---- model ---------------------------------------------------------------------------------------------
    def load_pretrained_into(self, model: torch.nn.Module, ctx=None) -> None:
        """Continued pretraining: start from a released OFA checkpoint (fairseq .pt) or an ofa-scale model dir."""
        if self.cfg.model.pretrained:
            load_pretrained_weights(model, self.cfg.model.pretrained, self.model_config, ctx)

    def pipeline_shapes(self) -> dict:
        """What the pipeline builder balances stages for: the image-text group's shapes. With two groups (vl, aux)
        micro-batches differ in shape, so every send carries its shape (DeepSpeed's dynamic_shape)."""
        vl = self.objectives.vl
        return dict(seed=self.cfg.train.seed, image_size=vl.image_size, src_len=vl.source_length,
                    tgt_len=vl.target_length, dynamic_shape=len(self.composition().group_sizes()) > 1)

    # ---- data ----------------------------------------------------------------------------------------------
    def composition(self):
        from ofa_scale.objectives.batching import Composition

        return Composition.from_config(self.objectives, self.cfg.train.micro_batch_size)

    def loader_config(self):
        from ofa_scale.data.loader_config import LoaderConfig

        cfg, obj = self.cfg, self.cfg.objectives
        counts = {s: n for s, n in self.composition().counts.items() if n > 0}
        # Decode JPEGs no larger than the objectives can use: the random resize of image-text rows tops out at
        # resize_max, detection's scale jitter at 1.5x the aux size, image infilling uses the aux size.
        k = obj.scaled
        decode = {"vl": k.resize_max, "detection": -(-3 * obj.aux.image_size // 2), "image": obj.aux.image_size}
        decode = {s: v for s, v in decode.items() if s in counts}
        decode.update(cfg.data.decode_min_size)
        return LoaderConfig(root=cfg.data.root, composition=counts, num_streams=cfg.micro_batches_per_step(),
                            seed=cfg.train.seed, mode="resampled", shuffle_buffer=cfg.data.shuffle_buffer,
                            num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                            decode_min_size=decode, on_corrupt=cfg.data.on_corrupt,
                            verify_shards=cfg.data.verify_shards)

    def build_loader(self, dp_rank: int, dp_size: int):
        from ofa_scale.data.loader import ShardLoader
        from ofa_scale.objectives.batching import Collator
        from ofa_scale.objectives.example_builder import ExampleBuilder

        obj = self.cfg.objectives
        negatives = self.negatives_dir if obj.enabled("itm") else None
        record_fn = ExampleBuilder(obj, tokenizer_kind=self.cfg.data.tokenizer.kind,
                                   tokenizer_dir=self.cfg.data.tokenizer.path, negatives_dir=negatives)
        collate_fn = Collator(obj, self.composition(), vocab_size=len(self.tokenizer))
        return ShardLoader(self.loader_config(), rank=dp_rank, world_size=dp_size, record_fn=record_fn,
                           collate_fn=collate_fn)

    def input_builder(self, step: int, dp_rank: int, dp_size: int, device, dtype) -> Callable[[str, dict, int], dict]:
        """Model kwargs for micro-batch m of this rank at `step`.

        Patch sampling draws from a generator seeded by (seed, step, canonical stream): rank r's m-th micro-batch
        is stream r + m·dp_size (the loader's assignment), so the sampled patches are the same at any world size.
        """
        from ofa_scale.objectives.batching import to_model_inputs

        seed = self.cfg.train.seed

        def build(group: str, batch: dict, m: int) -> dict:
            inputs = to_model_inputs(batch, device, dtype)
            if inputs.get("sample_patch_num"):
                stream = dp_rank + m * dp_size
                gen = torch.Generator(device=device)
                gen.manual_seed(_mix(seed, step, stream, GROUPS.index(group)))
                inputs["patch_generator"] = gen
            return inputs

        return build

    # ---- throughput ----------------------------------------------------------------------------------------
    def step_flops(self) -> int:
        """Model FLOPs of one optimizer step (all micro-batches of all ranks; fixed shapes make it a constant)."""
        from ofa_scale.model.flops import step_flops

        obj = self.objectives
        sizes = self.composition().group_sizes()
        spn = obj.scaled.sample_patch_num if "aux" in sizes else 0
        total = 0
        for group, batch in sizes.items():
            shape = getattr(obj, group)
            total += step_flops(self.model_config, batch, shape.source_length, shape.target_length,
                                shape.image_size, spn if group == "vl" else None).train_step
        return total * self.cfg.micro_batches_per_step()

    def mfu(self, seconds: float, world_size: int) -> Optional[float]:
        """Model FLOPs utilisation on GPUs with a known peak; None on CPU or an unknown card."""
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak is None:
            return None
        if self._flops is None:
            self._flops = self.step_flops()
        return self._flops / seconds / (peak * 1e12 * world_size)


def tokenizer_and_model_config(cfg):
    """The run's tokenizer and the model config it sizes (vocabulary = len(tokenizer)); checks model.pretrained."""
    from ofa_scale.data.tokenizer import load_tokenizer
    from ofa_scale.model.config import OFAConfig

    if cfg.model.pretrained and not Path(cfg.model.pretrained).exists():
        raise UserError(f"model.pretrained {cfg.model.pretrained} does not exist; point it at an OFA .pt "
                        f"checkpoint, an ofa-scale model directory or an ofa-train run directory, or set it to null "
                        f"to train from scratch")
    tokenizer = load_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path, num_bins=cfg.objectives.num_bins)
    overrides = dict(cfg.model.overrides)
    if "vocab_size" in overrides:
        raise ConfigError("model.overrides.vocab_size is set by the tokenizer (len(tokenizer)); remove it")
    if cfg.model.prompt_tuning.enabled:  # prompt tuning's parameters (finetune/prompt_config.py)
        overrides.update(cfg.model.prompt_tuning.model_overrides())
    try:
        model_config = OFAConfig.preset(cfg.model.arch, vocab_size=len(tokenizer), **overrides)
    except TypeError as e:
        raise ConfigError(f"model.overrides: {e}; use OFAConfig field names such as encoder_layers") from None
    return tokenizer, model_config


def load_pretrained_weights(model: torch.nn.Module, path: str, model_config, ctx=None, seed: int = 0) -> None:
    """Copy a checkpoint's weights (and BatchNorm statistics) into `model`, sharded for this rank under TP.

    The checkpoint must have the configured architecture's shape; its vocabulary is resized to ours by
    `load_pretrained` (rows appended or, never silently, refused), so a checkpoint trained with OFA's GPT-2 BPE
    can continue under the same tokenizer plus new tokens.
    """
    from ofa_scale.model import load_pretrained
    from ofa_scale.parallel.canonical import load_model_weights

    if not Path(path).exists():
        raise UserError(f"model.pretrained {path} does not exist; point it at an OFA .pt checkpoint, an "
                        f"ofa-scale model directory or an ofa-train run directory, or set it to null to train from "
                        f"scratch")
    from ofa_scale.training.run_dir import locate_run_checkpoint

    if locate_run_checkpoint(path) is not None:
        # an ofa-train run (e.g. caption stage 1 feeding stage 2): its best checkpoint, EMA weights when stored
        from ofa_scale.finetune.weights import load_run_model

        source = load_run_model(path)
        if source.config.vocab_size != model_config.vocab_size:
            raise ConfigError(f"model.pretrained {path} has {source.config.vocab_size} token embeddings but this "
                              f"run's tokenizer gives {model_config.vocab_size}; use the tokenizer that run used")
    else:
        source = load_pretrained(path, vocab_size=model_config.vocab_size)
    theirs = source.config
    resnet = ("resnet",) if model_config.image_stem == "resnet" else ()  # a ViT-stem model has no ResNet depth
    for name in ("d_model", "ffn_dim", "heads", "encoder_layers", "decoder_layers", "image_stem") + resnet:
        if getattr(theirs, name) != getattr(model_config, name):
            raise ConfigError(f"model.pretrained {path} has {name}={getattr(theirs, name)} but model.arch "
                              f"{model_config.arch} has {getattr(model_config, name)}; use the checkpoint's "
                              f"architecture (model.arch / model.overrides)")
    state = source.state_dict()
    # prompt tuning: the base has no prefix/adapter parameters; they keep their initial values (seed: the run's)
    from ofa_scale.model.init import InitialWeights
    from ofa_scale.model.prompt_tuning import WithAddedParameters

    state = WithAddedParameters(state, InitialWeights(model_config, seed))
    load_model_weights(ctx, model, state)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in state and state[name].shape == buf.shape and buf.dtype == state[name].dtype:
                buf.copy_(state[name])


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix-style), stable across processes and Python versions."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF
