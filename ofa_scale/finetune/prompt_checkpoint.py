"""The prompt checkpoint: a prompt-tuned model as the few parameters it trained plus a reference to its base.

    RUN/checkpoints/step_N/prompt/prompt.safetensors   the tuned tensors only (full, fp32, OFA names; their EMA
                                                       when the run keeps one)
    RUN/checkpoints/step_N/prompt/prompt.json          {"method", "base": {"path", "sha256"}, "model_config", ...}

Written by the finetuning trainer into every checkpoint of a run with model.prompt_tuning (from the checkpoint's
layout-free copy, so it is the same under any tp / ZeRO layout). The rest of such a checkpoint holds no base weight
either (the trainer's `trained_only`): DeepSpeed's files and the layout-free copy carry the tuned parameters, their
Adam moments, the schedule, step, loader position and RNG, and a resume rebuilds the frozen base from the path the
run recorded, after its hash matched (`agreed_base`). `ofa-eval run`, `ofa-predict` and `ofa-convert export` load
a prompt-tuned checkpoint through it (finetune/weights.py): the base model is read from its recorded path, and only
after its content hash matches; a base that moved or changed since training is replaced by an identical copy the
user names (`--set model.pretrained=PATH`; ofa-predict `--base-model PATH`) when its content hashes the same, and
refused in one sentence otherwise, since the tuned parameters are only meaningful on the exact weights they were
trained against.

The content hash is SHA-256 over the base's files: the .pt file itself, or every file of an ofa-convert model
directory, or of the checkpoint an ofa-train run resolved to (its best, else latest, when training started), by
relative path and content.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from ofa_scale.errors import UserError

PROMPT_DIR = "prompt"
TENSORS_FILE = "prompt.safetensors"
META_FILE = "prompt.json"
FORMAT_VERSION = 1
KIND = "ofa-scale prompt checkpoint"


# ---- the base reference -----------------------------------------------------------------------------------------
def resolve_base(path: str | Path) -> Path:
    """The file or directory the base's weights are read from (a run: the checkpoint it designates now)."""
    from ofa_scale.finetune.weights import run_checkpoint

    path = Path(path)
    tag_dir = run_checkpoint(path) if path.is_dir() else None
    return (tag_dir or path).resolve()


def content_hash(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative path and content, in sorted order)."""
    from ofa_scale.data.shard_writer import file_sha256

    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def base_reference(path: str | Path) -> dict[str, str]:
    """{"path", "resolved", "sha256"} of the base model `path` (model.pretrained)."""
    resolved = resolve_base(path)
    if not resolved.exists():
        raise UserError(f"model.pretrained {path} does not exist; prompt tuning needs the base model it tunes")
    return {"path": str(Path(path).resolve()), "resolved": str(resolved), "sha256": content_hash(resolved)}


COPY_HINT = "--set model.pretrained=PATH"  # how a user names an identical copy of a moved base (ofa-train, ofa-eval)


def check_base(meta: dict, where: Path, candidate: str | Path | None = None, hint: str | None = None) -> dict:
    """The base reference ({"path", "resolved", "sha256"}) a prompt checkpoint's weights are read from (for a run:
    the checkpoint training started from), after checking its content hash. The recorded base first; when it is
    gone or changed, `candidate` (the user's model.pretrained) is accepted if its content hashes the same: a moved
    base or an identical copy. Otherwise one-sentence refusal naming `hint`, the way to point at a copy."""
    hint = hint or COPY_HINT
    base = meta["base"]
    recorded, want = Path(base["resolved"]), base["sha256"]
    found = content_hash(recorded) if recorded.exists() else None
    if found == want:
        return base
    problem = "which no longer exists" if found is None else f"which now hashes to {found[:16]}…"
    copy = None if candidate is None else base_reference_or_none(candidate)
    if copy is not None and Path(copy["resolved"]) != recorded:
        if copy["sha256"] == want:
            return copy
        raise UserError(f"the prompt checkpoint {where} was trained on the base model {base['path']} (SHA-256 "
                        f"{want[:16]}…), {problem}, and {candidate} hashes to {copy['sha256'][:16]}…, not the "
                        f"same; pass an identical copy of the original base with {hint}, since the tuned parameters "
                        f"only fit those weights")
    raise UserError(f"the prompt checkpoint {where} was trained on the base model {base['path']} (SHA-256 "
                    f"{want[:16]}…), {problem}; restore it there or pass an identical copy with {hint}, since the "
                    f"tuned parameters only fit those weights")


def base_reference_or_none(path: str | Path) -> dict[str, str] | None:
    """base_reference of `path`, or None when nothing is there (a recipe's placeholder model.pretrained)."""
    return base_reference(path) if resolve_base(path).exists() else None


def agreed_base(pretrained: str, resume_tag_dir: Path | None, *, is_main: bool) -> dict:
    """Collective (every rank, process groups up): the base reference a prompt-tuning run trains on. A fresh run
    hashes model.pretrained; a resume takes the reference its checkpoint recorded, after checking the files still
    hash to it, or model.pretrained when that is an identical copy of a base that moved (later checkpoints then
    record the copy). Rank 0 hashes; a refusal raises the same one sentence on every rank."""
    from ofa_scale.parallel import collectives

    base = failure = None
    if is_main:
        try:
            if resume_tag_dir is not None and has_prompt_checkpoint(resume_tag_dir):
                base = check_base(read_meta(resume_tag_dir), Path(resume_tag_dir), candidate=pretrained)
            else:
                base = base_reference(pretrained)
        except UserError as e:
            failure = str(e)
    base, failure = collectives.broadcast_object((base, failure), 0)
    if failure is not None:
        raise UserError(failure)
    return base


# ---- writing ----------------------------------------------------------------------------------------------------
def prompt_dir(tag_dir: Path) -> Path:
    return Path(tag_dir) / PROMPT_DIR


def has_prompt_checkpoint(tag_dir: Path) -> bool:
    return (prompt_dir(tag_dir) / META_FILE).is_file()


def write_prompt_checkpoint(tag_dir: Path, *, method: str, base: dict, model_config, step: int) -> Path:
    """Rank 0, after the checkpoint's layout-free copies are on disk: copy the tuned tensors out of the EMA copy
    when the run keeps one (the weights validation scored, as OFA evaluates its EMA model), else the live ones."""
    from ofa_scale.finetune.ema_store import EMA_DIR, has_ema_copy
    from ofa_scale.model.checkpoint import _atomic_save_safetensors
    from ofa_scale.model.prompt_tuning import trainable
    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader
    from ofa_scale.training.layout_resume import canonical_dir
    from ofa_scale.utils.io import atomic_write_json

    ema = has_ema_copy(tag_dir)
    weights = CanonicalReader(Path(tag_dir) / EMA_DIR if ema else canonical_dir(tag_dir)).view(MODEL)
    tensors = {name: weights.read(name).float().contiguous() for name in sorted(weights.names())
               if trainable(name, method)}
    out = prompt_dir(tag_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_save_safetensors(tensors, out / TENSORS_FILE, metadata={"format_version": str(FORMAT_VERSION)})
    atomic_write_json(out / META_FILE, {
        "format_version": FORMAT_VERSION, "kind": KIND, "method": method, "step": step, "base": base,
        "weights": "ema" if ema else "model",
        "model_config": dataclasses.asdict(model_config), "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values()))})
    return out


# ---- reading ----------------------------------------------------------------------------------------------------
def read_meta(tag_dir: Path) -> dict[str, Any]:
    import json

    meta = json.loads((prompt_dir(tag_dir) / META_FILE).read_text())
    if meta.get("kind") != KIND or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{prompt_dir(tag_dir) / META_FILE} is not a prompt checkpoint of this ofa-scale version")
    return meta


def load_prompt_model(tag_dir: Path, base: str | Path | None = None, hint: str | None = None) -> torch.nn.Module:
    """The prompt-tuned OFAModel (eval mode): the hash-checked base (`base`: an identical copy to use when the
    recorded one moved; check_base), then the tuned tensors."""
    return _load_prompt_model(tag_dir, base, hint)[0]


def _load_prompt_model(tag_dir: Path, base: str | Path | None, hint: str | None) -> tuple[torch.nn.Module, dict]:
    """(the prompt-tuned model, the base reference its weights came from)."""
    from safetensors.torch import load_file

    from ofa_scale.model.config import OFAConfig
    from ofa_scale.model.ofa import OFAModel
    from ofa_scale.training.workload import load_pretrained_weights

    meta = read_meta(tag_dir)
    found = check_base(meta, prompt_dir(tag_dir), candidate=base, hint=hint)
    config = OFAConfig(**meta["model_config"])
    model = OFAModel(config)
    load_pretrained_weights(model, found["resolved"], config)
    tuned = load_file(str(prompt_dir(tag_dir) / TENSORS_FILE))
    params = dict(model.named_parameters())
    unknown = sorted(set(tuned) - set(params))
    if unknown:
        raise UserError(f"{prompt_dir(tag_dir)} holds tensors this model does not have ({', '.join(unknown[:3])}); "
                        f"it was written for another model configuration")
    with torch.no_grad():
        for name, value in tuned.items():
            params[name].copy_(value)
    return model.eval(), found


def load_prompt_eval_model(tag_dir: Path, base: str | Path | None = None, hint: str | None = None):
    """An EvalModel for `ofa-eval run` / `ofa-predict`: the prompt-tuned model (`base`, `hint`: load_prompt_model),
    with the run's tokenizer and input geometry (the run is the checkpoint's RUN/checkpoints/step_N parent)."""
    from ofa_scale.evaluation.model_source import EvalModel, _check_vocab, _run_config, run_tokenizer_and_geometry

    tag_dir = Path(tag_dir)
    run_root = tag_dir.parent.parent
    tokenizer, geometry = run_tokenizer_and_geometry(_run_config(run_root / "config.yaml"))
    model, found = _load_prompt_model(tag_dir, base, hint)
    _check_vocab(model.config.vocab_size, tokenizer, str(tag_dir))
    meta = read_meta(tag_dir)
    return EvalModel(model, tokenizer, geometry,
                     {"checkpoint": str(tag_dir.resolve()), "kind": "prompt", "run": str(run_root.resolve()),
                      "tag": tag_dir.name, "arch": meta["model_config"].get("arch"),
                      "weights": f"prompt ({meta.get('weights', 'model')})",
                      "method": meta["method"], "base": found["path"]})
