"""The training config tree: one YAML file → typed dataclasses, validated before any process group starts.

Sections: model, data, objectives, optim, schedule, train, precision (+ loss_scale), parallel, deepspeed,
logging, task. An empty `task.name` is OFA multitask pretraining (data.root); a named task is a finetuning recipe
(data.train / data.valid, train.epochs; ofa_scale/finetune/). `load_training_config(path, overrides)` reads the
YAML, applies `--set a.b=c` overrides and checks every value that can be checked without a process group;
`check_world(cfg, world_size)` adds the batch arithmetic that needs the launcher's world size
(ofa_scale.training.loop.prepare then checks data, model and parallel layout).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ofa_scale.errors import ConfigError
from ofa_scale.finetune.config import TaskSection
from ofa_scale.finetune.prompt_config import PromptTuningSection
from ofa_scale.objectives.config import ObjectivesConfig
from ofa_scale.parallel.layout import ParallelConfig
from ofa_scale.utils.config import apply_overrides, from_dict, load_yaml, to_dict

Precision = Literal["fp32", "bf16", "fp16"]
TokenizerKind = Literal["gpt2-bpe", "sentencepiece", "bert"]  # bert: OFA-CN (spec §10.1)

CONFIG_FORMAT_VERSION = 1


@dataclass
class ModelSection:
    arch: str = ""  # an OFAConfig preset name (ofa_tiny … ofa_huge)
    # Weights to start from: a released OFA .pt, an ofa-convert model dir or an ofa-train run dir (its best
    # checkpoint when it has one, else latest; EMA weights when stored). The optimizer and step count start fresh.
    pretrained: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)  # OFAConfig fields, e.g. {encoder_layers: 2}
    # prefix / adapter / BitFit tuning on a frozen model.pretrained (finetune/prompt_config.py)
    prompt_tuning: PromptTuningSection = field(default_factory=PromptTuningSection)


@dataclass
class TokenizerSection:
    kind: TokenizerKind = "gpt2-bpe"
    path: str = ""  # the BPE dir (encoder.json, vocab.bpe), the sentencepiece model dir or the bert vocab.txt dir


@dataclass
class DataSection:
    """Where the shards are and how they are streamed. The loader's composition, stream count and seed are not
    set here: the trainer derives them from objectives.mix, the batch sizes and train.seed (one source of truth)."""

    root: str = ""  # pretraining: an `ofa-preprocess shards` output directory (holds manifest.json)
    train: str = ""  # finetuning: the training shards (`ofa-preprocess shards --format <task source>` output)
    valid: str = ""  # finetuning: the validation shards (same format)
    negatives: Optional[str] = None  # ITM negative-sample files; default: <root>/negatives
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    num_workers: int = 1  # DataLoader worker processes per rank (decode + example building + collate)
    prefetch_factor: int = 2
    shuffle_buffer: int = 256  # per stream and source; 0 keeps the shard order (OFA reads files in order)
    decode_min_size: dict[str, int] = field(default_factory=dict)  # per source, see LoaderConfig
    on_corrupt: Literal["skip", "fail"] = "skip"
    verify_shards: bool = False  # check each shard's sha256 against manifest.json when it is opened


@dataclass
class OptimSection:
    """AdamW with decoupled weight decay, as fairseq's Adam applies it (spec §8)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 5.0  # 0 disables clipping


@dataclass
class ScheduleSection:
    """fairseq's polynomial_decay: linear warm-up to optim.lr, then (1 - progress)^power decay to end_lr."""

    warmup_ratio: float = 0.01
    warmup_steps: Optional[int] = None  # when set, wins over warmup_ratio
    end_lr: float = 0.0
    power: float = 1.0


HOST_HEAP_MODES = ("auto", "bounded", "dynamic")
COMPILE_SCOPES = ("all", "transformer", "stem")  # what train.compile compiles (parallel/compile.py)


@dataclass
class TrainSection:
    # Pretraining: the number of updates. Finetuning: a cap on the updates the epochs give (0 = no cap).
    steps: int = 0
    # Finetuning: passes over data.train; updates = epochs x (samples // global batch) (the loader's exact-epoch
    # mode drops the last partial global batch of each pass, counted in data/dropped_epoch_remainder).
    epochs: int = 0
    ema_decay: float = 0.0  # finetuning: fp32 EMA of the weights, used for validation and evaluation (0 = off)
    ema_start: int = 0  # the update from which the EMA is updated (OFA --ema-start-update)
    freeze_encoder_embedding: bool = False  # finetuning: keep the encoder token embedding fixed
    freeze_decoder_embedding: bool = False  # finetuning: keep the decoder token embedding fixed
    freeze_resnet: bool = False  # finetuning: keep the ResNet fixed, BatchNorm statistics included
    seed: int = 7  # OFA's --pretrain-seed
    global_batch_size: int = 0  # image-text rows per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 0  # image-text rows per forward pass on one rank
    log_interval: int = 1  # console line every N steps (metrics.jsonl always gets every step)
    ckpt_interval: int = 1000  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk; 0 keeps all
    compile: bool = False  # torch.compile each encoder/decoder layer and the ResNet stem (torchtitan-style)
    # what train.compile compiles: "all", or "transformer" (the layers only; the stem stays eager, the fastest CPU
    # step with channels_last) or "stem" (parallel/compile.py)
    compile_scope: str = "all"
    channels_last: bool = False  # run the ResNet stem in channels-last memory format
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row (each one is skipped)
    # glibc's heap: "bounded" returns every freed block of 128 KiB or more to the OS (less host memory, more page
    # faults: CPU steps cost more), "dynamic" is glibc's default, "auto" bounds it under ZeRO-3 (utils/malloc.py)
    host_heap: str = "auto"


@dataclass
class LossScaleSection:
    """fp16 dynamic loss scaling (ignored for fp32/bf16). OFA trains with --fp16-scale-window 128."""

    initial_scale_power: int = 7  # initial scale 2**7 = 128, fairseq's default
    loss_scale_window: int = 128
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    static_loss_scale: float = 0.0  # > 0 disables dynamic scaling


@dataclass
class DeepSpeedSection:
    template: Optional[str] = None  # a ds_configs/*.json; default from parallel.zero_stage (+ offload)
    offload: bool = False  # ZeRO-3 with parameters and optimizer states in CPU memory (ds_configs/zero3_offload.json)


@dataclass
class LoggingSection:
    mlflow: bool = True
    tracking_uri: Optional[str] = None  # default: sqlite file in the run dir; MLFLOW_TRACKING_URI wins over both
    experiment: str = "ofa-scale"
    run_name: Optional[str] = None  # default: the run directory's name
    connect_timeout_s: float = 10.0  # how long the tracking store may take to answer before the run stops


@dataclass
class TrainingConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    precision: Precision = "fp32"
    loss_scale: LossScaleSection = field(default_factory=LossScaleSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    task: TaskSection = field(default_factory=TaskSection)
    format_version: int = CONFIG_FORMAT_VERSION

    @property
    def finetuning(self) -> bool:
        return self.task.enabled

    def validate(self) -> None:
        """Checks that need no world size. Each message is one sentence naming the fix."""
        if self.format_version != CONFIG_FORMAT_VERSION:
            raise ConfigError(f"config format_version {self.format_version} is not supported; "
                              f"this ofa-scale reads version {CONFIG_FORMAT_VERSION}")
        _require(self.model.arch, "model.arch", "an OFA preset such as ofa_tiny or ofa_base")
        self.task.validate()
        self.model.prompt_tuning.validate(self)
        if self.model.overrides.get("mue") and self.parallel.pp > 1:  # MuE (model/mue_encoder.py, mue_loss.py)
            raise ConfigError("model.overrides.mue (MuE's decomposed encoder and all-layer loss) needs parallel.pp=1: "
                              "pipeline stages run their own joint encoder and last-layer loss")
        if self.finetuning:
            self._validate_finetuning()
        else:
            self._validate_pretraining()
        _require(self.data.tokenizer.path, "data.tokenizer.path", "the tokenizer directory")
        for name in ("global_batch_size", "micro_batch_size", "log_interval", "ckpt_interval"):
            value = getattr(self.train, name)
            if value < 1:
                raise ConfigError(f"train.{name} is {value}; set it to a positive integer")
        if self.train.keep_checkpoints < 0:
            raise ConfigError("train.keep_checkpoints must be >= 0 (0 keeps every checkpoint)")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size}; change one of them")
        if self.data.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        o = self.optim
        if o.lr <= 0:
            raise ConfigError(f"optim.lr is {o.lr}; set a positive learning rate")
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas is {o.betas}; give two numbers in [0, 1), e.g. [0.9, 0.999]")
        if o.eps <= 0 or o.weight_decay < 0 or o.clip_norm < 0:
            raise ConfigError("optim.eps must be > 0 and optim.weight_decay, optim.clip_norm >= 0")
        s = self.schedule
        if not 0.0 <= s.warmup_ratio < 1.0:
            raise ConfigError(f"schedule.warmup_ratio is {s.warmup_ratio}; use a fraction in [0, 1)")
        # finetuning with train.steps 0 checks again once the epochs give the number of updates
        if s.warmup_steps is not None and self.train.steps and not 0 <= s.warmup_steps < self.train.steps:
            raise ConfigError(f"schedule.warmup_steps={s.warmup_steps} must be in [0, train.steps={self.train.steps})")
        if not 0.0 <= s.end_lr <= o.lr:
            raise ConfigError(f"schedule.end_lr={s.end_lr} must be between 0 and optim.lr={o.lr}")
        if s.power <= 0:
            raise ConfigError(f"schedule.power is {s.power}; use a positive exponent (1.0 = linear decay)")
        self.parallel.validate()
        if self.deepspeed.offload and self.parallel.zero_stage != 3:
            raise ConfigError(f"deepspeed.offload needs parallel.zero_stage=3 (it is {self.parallel.zero_stage}); "
                              "set the stage to 3 or turn offload off")
        if self.deepspeed.template is not None and not Path(self.deepspeed.template).is_file():
            raise ConfigError(f"deepspeed.template {self.deepspeed.template} does not exist; "
                              "point it at a JSON file such as ds_configs/zero3.json")
        if not self.logging.connect_timeout_s > 0:
            raise ConfigError(f"logging.connect_timeout_s is {self.logging.connect_timeout_s}; give a positive "
                              "number of seconds")
        if self.train.compile_scope not in COMPILE_SCOPES:
            raise ConfigError(f"train.compile_scope is {self.train.compile_scope!r}; use one of "
                              f"{', '.join(COMPILE_SCOPES)}")
        if self.train.host_heap not in HOST_HEAP_MODES:
            raise ConfigError(f"train.host_heap is {self.train.host_heap!r}; use one of {', '.join(HOST_HEAP_MODES)}")
        if self.train.max_nonfinite_steps < 1:
            raise ConfigError("train.max_nonfinite_steps must be >= 1 (non-finite steps in a row before the run "
                              "stops)")
        self.objectives.validate()

    def _validate_pretraining(self) -> None:
        _require(self.data.root, "data.root", "an `ofa-preprocess shards` output directory")
        for key in ("train", "valid"):
            if getattr(self.data, key):
                raise ConfigError(f"data.{key} is a finetuning setting but task.name is empty (pretraining reads "
                                  f"data.root); set task.name or remove data.{key}")
        if self.train.steps < 1:
            raise ConfigError(f"train.steps is {self.train.steps}; set it to a positive integer")
        if self.train.epochs:
            raise ConfigError("train.epochs is a finetuning setting (pretraining runs train.steps updates over "
                              "resampled data); remove it or set task.name")
        if self.train.ema_decay or self.train.freeze_encoder_embedding or self.train.freeze_decoder_embedding \
                or self.train.freeze_resnet:
            raise ConfigError("train.ema_decay and train.freeze_* are finetuning settings that pretraining does "
                              "not apply; remove them or set task.name")
        if self.objectives.drop_worst_ratio > 0:
            raise ConfigError("objectives.drop_worst_ratio is a caption-finetuning option that ofa-train's "
                              "pretraining loss does not apply; set it to 0")

    def _validate_finetuning(self) -> None:
        name = self.task.name
        _require(self.data.train, "data.train", f"the `ofa-preprocess shards --format {name}` training shards")
        _require(self.data.valid, "data.valid", f"the `ofa-preprocess shards --format {name}` validation shards")
        if self.data.root:
            raise ConfigError(f"data.root is the pretraining corpus but task.name is {name!r} (finetuning reads "
                              f"data.train and data.valid); remove data.root")
        if self.train.epochs < 1:
            raise ConfigError(f"train.epochs is {self.train.epochs}; finetuning needs a positive number of passes "
                              f"over data.train (train.steps is only a cap)")
        if self.train.steps < 0:
            raise ConfigError(f"train.steps is {self.train.steps}; use 0 (no cap) or a positive cap on the updates")
        if not 0.0 <= self.train.ema_decay < 1.0 or self.train.ema_start < 0:
            raise ConfigError(f"train.ema_decay is {self.train.ema_decay} and train.ema_start "
                              f"{self.train.ema_start}; use a decay in [0, 1) (0 = off, OFA 0.9999) and a start >= 0")
        if self.task.criterion == "scst" and self.objectives.loss == "encouraging":
            raise ConfigError("objectives.loss=encouraging shapes the cross-entropy token loss, but "
                              "task.criterion=scst trains on CIDEr rewards; use objectives.loss=ce with scst")
        if self.parallel.pp > 1:
            why = ("SCST generates hypotheses inside the training step" if self.task.criterion == "scst"
                   else "validation generates with the whole model on every rank")
            raise ConfigError(f"parallel.pp={self.parallel.pp} cannot run finetuning task {name!r}: {why}, which "
                              f"the pipeline engine cannot run; use parallel.pp=1 (tensor parallelism and ZeRO-3 "
                              f"work)")

    # ---- numbers derived once the world size is known -------------------------------------------------------
    def micro_batches_per_step(self) -> int:
        """C: micro-batches in one global batch (the number of canonical data streams)."""
        return self.train.global_batch_size // self.train.micro_batch_size

    def to_dict(self) -> dict:
        return to_dict(self)


def _require(value: str, key: str, what: str) -> None:
    if not value:
        raise ConfigError(f"{key} is missing; set it in the YAML or with --set {key}=… ({what})")


def data_parallel_size(cfg: TrainingConfig, world_size: int) -> int:
    mp = cfg.parallel.tp * cfg.parallel.pp
    if world_size % mp:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp = {mp}; "
                          f"launch a multiple of {mp} processes")
    return world_size // mp


def check_world(cfg: TrainingConfig, world_size: int) -> int:
    """Checks that need the world size; returns the gradient-accumulation steps (micro-batches per rank per step)."""
    dp = data_parallel_size(cfg, world_size)
    c = cfg.micro_batches_per_step()
    if c % dp:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x data-parallel size {dp}; "
            f"make the global batch a multiple of {cfg.train.micro_batch_size * dp}")
    return c // dp


def load_training_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainingConfig:
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    _check_top_level(data)
    _check_micro_batches(data)
    cfg = from_dict(TrainingConfig, data)
    cfg.validate()
    return cfg


def _check_top_level(data: dict) -> None:
    # from_dict refuses unknown keys too; here a flat key that belongs to a section (`zero_stage: 3`) gets the
    # dotted name as its suggestion, the commonest slip when moving from OFA's flat command lines.
    hints = typing.get_type_hints(TrainingConfig)
    for key in data:
        if key in hints:
            continue
        for section, cls in hints.items():
            if dataclasses.is_dataclass(cls) and key in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"unknown config key '{key}' (did you mean '{section}.{key}'?)")
        close = difflib.get_close_matches(str(key), sorted(hints), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known sections: {', '.join(sorted(hints))})"
        raise ConfigError(f"unknown config key '{key}'{hint}")


def _check_micro_batches(data: dict) -> None:
    # parallel.micro_batches is derived from the batch sizes and the data-parallel size; a second source of
    # truth for gradient accumulation could only disagree, so we refuse it here with the fix.
    par = data.get("parallel")
    if isinstance(par, dict) and "micro_batches" in par:
        raise ConfigError("parallel.micro_batches is derived (global_batch_size / (micro_batch_size x dp)); "
                          "remove it and set train.global_batch_size / train.micro_batch_size instead")


def world_size_from_env() -> int:
    """The launcher's world size, readable before torch.distributed is initialised (torchrun, deepspeed, srun)."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1
