"""Load DeepSpeed's module state of a trained-only checkpoint (prompt tuning, `Trainer.trained_only`) and check it.

Such a checkpoint's module state holds the trained parameters alone (training/checkpoint.py
`_trained_parameters_only`), so DeepSpeed must load it with `load_module_strict=False`, the frozen rest coming from
the base model. A non-strict load is silent about what it did not find: a tuned parameter missing from the file
(a checkpoint written with another `model.prompt_tuning`, or a damaged one) would keep its fresh initial value and
the resumed run would go on from there as if nothing happened. This loader is DeepSpeed's `custom_load_fn`: it
insists that the file holds exactly the parameters this run trains, then loads them non-strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ofa_scale.errors import UserError


def trained_only_loader(where: Path) -> Callable:
    """custom_load_fn(src=module state dict, dst=module) for `engine.load_checkpoint` of the checkpoint `where`."""

    def load(src: dict, dst) -> None:
        tuned = {name for name, p in dst.named_parameters() if p.requires_grad}
        missing = sorted(tuned - set(src))
        if missing:
            raise UserError(f"the checkpoint {where} lacks {len(missing)} of the {len(tuned)} parameters this run "
                            f"trains ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); it was written "
                            f"with another model.prompt_tuning setting or is damaged, so resume with the run's "
                            f"original settings or from another checkpoint")
        extra = sorted(set(src) - tuned)  # frozen here (its copy would overwrite the base weight) or unknown
        if extra:
            raise UserError(f"the checkpoint {where} holds {len(extra)} parameters this run does not train "
                            f"({', '.join(extra[:3])}{', …' if len(extra) > 3 else ''}); it was written with "
                            f"another model.prompt_tuning setting, so resume with the run's original settings")
        dst.load_state_dict(src, strict=False)

    return load


__all__ = ["trained_only_loader"]
