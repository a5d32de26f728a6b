"""Where `ofa-eval generate` gets its model, tokenizer and input geometry from.

`--checkpoint` may be
* an ofa-scale model directory (`save_pretrained` / `ofa-convert import-ofa` output: config.json +
  model.safetensors) or a fairseq/OFA `.pt` file — these carry no tokenizer, so `--tokenizer-path` is required,
  and inputs follow OFA's finetuning evaluation (480 px caption/VQA, 512 px grounding, boxes / 512);
* a training run directory of `ofa-train` (config.yaml + checkpoints/latest), or one of its
  `checkpoints/step_*` directories: the model is rebuilt from the run's config (preset + overrides, vocabulary =
  the run's tokenizer) and the weights read from DeepSpeed's files; inputs use the run's image size, box
  normaliser and word limits, so the model is evaluated on the geometry it was trained on.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ofa_scale.errors import UserError

# DeepSpeed's file with the (ZeRO-0/1/2: full) module state dict of model-parallel rank 0.
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"
# GroupsForward (ofa_scale/training/step.py) holds the OFAModel as `.model`, so engine keys start with this.
ENGINE_PREFIX = "model."


@dataclass
class InputGeometry:
    """How evaluation inputs are built (spec §7.1–§7.3 defaults)."""

    image_size: int = 480             # caption / VQA: Resize((S, S)), bicubic
    grounding_image_size: int = 512   # RefCOCO: squashed to S×S
    box_normaliser: float = 512.0     # bins span [0, normaliser] input pixels (OFA max_image_size)
    num_bins: int = 1000
    max_src_words: int = 80           # pre_caption / pre_question word limit
    max_source_tokens: Optional[int] = None  # truncate encoded sources (the run's vl.source_length)


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: Any
    geometry: InputGeometry
    description: dict[str, Any] = field(default_factory=dict)


def load_eval_model(checkpoint: str | Path, *, tokenizer_kind: Optional[str] = None,
                    tokenizer_path: str | None = None) -> EvalModel:
    """`tokenizer_kind` None: the kind a model directory recorded (OFA-CN imports: bert), else gpt2-bpe."""
    from ofa_scale.model.checkpoint import CONFIG_FILE, recorded_tokenizer_kind
    from ofa_scale.training.run_dir import locate_run_checkpoint

    path = Path(checkpoint)
    located = locate_run_checkpoint(path)  # a run (or its checkpoints/, or a step): refused clearly when empty
    if located is not None:
        return _from_run(*located)
    if not path.exists():
        raise UserError(f"--checkpoint {path} does not exist; pass a model directory, a .pt checkpoint or an "
                        "ofa-train run directory")
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        raise UserError(f"--checkpoint {path} is neither an ofa-scale model directory (no {CONFIG_FILE}) nor an "
                        "ofa-train run directory (no config.yaml with checkpoints/); pass one of those or a .pt file")
    if not tokenizer_path:
        raise UserError(f"{path} carries no tokenizer; pass --tokenizer-path (the BPE or sentencepiece directory "
                        "the model was trained with)")
    from ofa_scale.data.tokenizer import load_tokenizer
    from ofa_scale.model.checkpoint import load_pretrained

    tokenizer = load_tokenizer(tokenizer_kind or recorded_tokenizer_kind(path) or "gpt2-bpe", tokenizer_path)
    model = load_pretrained(path)
    _check_vocab(model.config.vocab_size, tokenizer, str(path))
    return EvalModel(model.eval(), tokenizer, InputGeometry(num_bins=tokenizer.num_bins),
                     {"checkpoint": str(path.resolve()), "kind": "model"})


def _check_vocab(rows: int, tokenizer: Any, source: str) -> None:
    if rows < len(tokenizer):
        raise UserError(f"{source} has {rows} token embeddings but the tokenizer has {len(tokenizer)} tokens; "
                        "pass the tokenizer the model was trained with")


def _from_run(run_root: Path, tag: Optional[str]) -> EvalModel:
    from ofa_scale.model.checkpoint import build_model, canonical_keys, convert_state_dict
    from ofa_scale.model.config import OFAConfig
    from ofa_scale.model.ofa import OFAModel
    from ofa_scale.training.checkpoint import TRAINER_RECORD, find_latest
    from ofa_scale.parallel.canonical_store import INDEX
    from ofa_scale.training.layout_resume import CANONICAL_DIR

    cfg = _run_config(run_root / "config.yaml")
    ckpt_dir = run_root / "checkpoints"
    if tag is None:
        point = find_latest(ckpt_dir)
        if point is None:
            raise UserError(f"{run_root} has no complete checkpoint yet (no checkpoints/latest); train longer "
                            "or pass a checkpoints/step_* directory")
        tag = point.tag
    elif not (ckpt_dir / tag / TRAINER_RECORD).is_file():
        raise UserError(f"{ckpt_dir / tag} is not a complete checkpoint (no {TRAINER_RECORD}); pick another step")
    from ofa_scale.finetune.prompt_checkpoint import has_prompt_checkpoint, load_prompt_eval_model

    if has_prompt_checkpoint(ckpt_dir / tag):  # prompt tuning: the checkpoint holds the tuned parameters alone
        return load_prompt_eval_model(ckpt_dir / tag)
    tokenizer, geometry = run_tokenizer_and_geometry(cfg)
    canonical = ckpt_dir / tag / CANONICAL_DIR
    if (canonical / INDEX).is_file():
        # the trainer's layout-free copy, whatever the tp/pp/ZeRO layout was: the weights' slices assembled whole
        from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader

        weights = CanonicalReader(canonical).view(MODEL)
        state = {name: weights.read(name) for name in weights.names()}
    elif cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        raise UserError(f"{ckpt_dir / tag} has no layout-free copy ({CANONICAL_DIR}/) and was trained with "
                        f"tp={cfg.parallel.tp}, pp={cfg.parallel.pp}; resume and checkpoint it with this version")
    else:
        state = _engine_state_dict(ckpt_dir, tag, cfg.parallel.zero_stage)
    rows = _embedding_rows(state, ckpt_dir / tag)
    _check_vocab(rows, tokenizer, str(ckpt_dir / tag))
    prompt = cfg.model.prompt_tuning.model_overrides() if cfg.model.prompt_tuning.enabled else {}
    config = OFAConfig.preset(cfg.model.arch, **{**cfg.model.overrides, **prompt, "vocab_size": rows})
    with torch.device("meta"):
        expected = canonical_keys(OFAModel(config))
    weights = convert_state_dict(state, expected, source=str(ckpt_dir / tag))
    return EvalModel(build_model(config, weights).eval(), tokenizer, geometry,
                     {"checkpoint": str((ckpt_dir / tag).resolve()), "kind": "run", "run": str(run_root.resolve()),
                      "tag": tag, "arch": cfg.model.arch})


def run_tokenizer_and_geometry(cfg) -> tuple[Any, InputGeometry]:
    """A run's tokenizer and the input geometry it trained on, from its resolved config."""
    from ofa_scale.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path, num_bins=cfg.objectives.num_bins)
    obj = cfg.objectives
    geometry = InputGeometry(image_size=obj.vl.image_size, grounding_image_size=obj.vl.image_size,
                             box_normaliser=float(obj.scaled.box_normaliser), num_bins=obj.num_bins,
                             max_src_words=obj.max_src_words, max_source_tokens=obj.vl.source_length)
    return tokenizer, geometry


def _run_config(path: Path):
    """The resolved config a run wrote. Read as data without the launch-time checks: the file records derived
    values (parallel.micro_batches) that a user-written config may not set."""
    from ofa_scale.errors import ConfigError
    from ofa_scale.training.config import TrainingConfig
    from ofa_scale.utils.config import from_dict, load_yaml

    try:
        return from_dict(TrainingConfig, load_yaml(path))
    except ConfigError as e:
        raise UserError(f"{path}: {e}; was this run written by another ofa-scale version?") from None


def _engine_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 3:
        # ZeRO-3 files hold partitions only; DeepSpeed's own tool gathers them (CPU, no process group).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        path = ckpt_dir / tag / DEEPSPEED_MODEL_STATES
        if not path.is_file():
            raise UserError(f"{path} is missing; the checkpoint is incomplete or was not written by ofa-train")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # DeepSpeed may pickle small non-tensor objects next to the weights; this file was written by our own
            # trainer (the same trust as resuming from it).
            blob = torch.load(path, map_location="cpu", weights_only=False)
        state = blob.get("module") if isinstance(blob, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"{path} holds no 'module' state dict; it is not a DeepSpeed model-states file")
    return {k[len(ENGINE_PREFIX):] if k.startswith(ENGINE_PREFIX) else k: v for k, v in state.items()}


def _embedding_rows(state: dict[str, torch.Tensor], where: Path) -> int:
    from ofa_scale.model.checkpoint import EMBEDDING_KEY

    weight = state.get(EMBEDDING_KEY)
    if weight is None:
        raise UserError(f"{where} has no '{EMBEDDING_KEY}'; it is not an OFA checkpoint of ofa-train")
    return int(weight.shape[0])

