"""Which weights of an `ofa-train` run a finetuning recipe starts from or `ofa-eval run` evaluates.

A run directory (or its checkpoints/ directory) means its best checkpoint (`checkpoints/best`, finetuning runs) or,
when it has none, `latest`; a `checkpoints/step_*` directory means that checkpoint. The EMA weights are used when
the checkpoint stores them (`<tag>/ema/`, finetune/ema_store.py): they are what validation scored, as OFA
evaluates its EMA model. A prompt-tuned run's checkpoint is its prompt checkpoint (`<tag>/prompt/`,
finetune/prompt_checkpoint.py): the base model, hash-checked, plus the tuned parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ofa_scale.errors import UserError


def run_checkpoint(path: str | Path) -> Optional[Path]:
    """The checkpoint directory `path` designates when it is part of an ofa-train run, else None."""
    from ofa_scale.finetune.best import best_checkpoint
    from ofa_scale.training.run_dir import locate_run_checkpoint

    located = locate_run_checkpoint(path)
    if located is None:
        return None
    root, tag = located
    if not Path(path).name.startswith("step_"):
        best = best_checkpoint(root)
        if best is not None:
            return best
    return root / "checkpoints" / tag


def load_run_eval_model(path: str | Path, *, ema: bool = True, base: Optional[str] = None,
                        base_hint: Optional[str] = None):
    """An EvalModel (model, the run's tokenizer, description) of the checkpoint `path` designates (`base`,
    `base_hint`: a prompt-tuned run's identical copy of a moved base, prompt_checkpoint.check_base)."""
    from ofa_scale.evaluation.model_source import load_eval_model
    from ofa_scale.finetune.ema_store import ema_weights, has_ema_copy
    from ofa_scale.parallel.canonical import load_model_weights

    tag_dir = run_checkpoint(path)
    if tag_dir is None:
        raise UserError(f"{path} is not an ofa-train run directory or one of its checkpoints")
    from ofa_scale.finetune.prompt_checkpoint import has_prompt_checkpoint

    if has_prompt_checkpoint(tag_dir):  # prompt tuning: the hash-checked base model plus the tuned parameters
        from ofa_scale.finetune.prompt_checkpoint import load_prompt_eval_model

        return load_prompt_eval_model(tag_dir, base, base_hint)
    loaded = load_eval_model(tag_dir)
    use_ema = ema and has_ema_copy(tag_dir)
    if use_ema:
        load_model_weights(None, loaded.model, ema_weights(tag_dir))
    loaded.description.update({"weights": "ema" if use_ema else "model"})
    return loaded


def load_run_model(path: str | Path, *, ema: bool = True):
    """The OFAModel of the checkpoint `path` designates (EMA weights when stored)."""
    return load_run_eval_model(path, ema=ema).model
