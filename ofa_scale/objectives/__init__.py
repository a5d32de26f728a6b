"""Pretraining objectives: raw records → task examples → fixed-shape group batches, and OFA's loss.

See docs/objectives.md for the mixing/normalisation design and docs/interfaces.md §2–§4 for the contracts.
"""

from ofa_scale.objectives.batching import (Collator, Composition, GroupBatch, constraint_mask, group_names,
                                           loss_inputs, to_model_inputs)
from ofa_scale.objectives.config import (GROUPS, PAD_TASK_ID, SOURCES, TASK_GROUP, TASK_ID, TASKS, GroupShape,
                                         ObjectivesConfig, ScaledConstants)
from ofa_scale.objectives.example_builder import ExampleBuilder
from ofa_scale.objectives.loss import count_loss_tokens, global_loss_denominators, loss_denominators
from ofa_scale.objectives.negatives import Negatives
from ofa_scale.objectives.step import group_loss, micro_batch_loss
from ofa_scale.objectives.text import pre_caption, pre_question
from ofa_scale.objectives.token_loss import (SingleProcessTokenLoss, TokenLoss, TokenLosses, VocabParallelTokenLoss,
                                             make_token_loss)

__all__ = [
    "Collator", "Composition", "GroupBatch", "constraint_mask", "group_names", "loss_inputs", "to_model_inputs",
    "GROUPS", "PAD_TASK_ID", "SOURCES", "TASK_GROUP", "TASK_ID", "TASKS", "GroupShape", "ObjectivesConfig",
    "ScaledConstants", "ExampleBuilder", "count_loss_tokens", "global_loss_denominators", "loss_denominators",
    "Negatives", "group_loss", "micro_batch_loss", "pre_caption", "pre_question", "SingleProcessTokenLoss",
    "TokenLoss", "TokenLosses", "VocabParallelTokenLoss", "make_token_loss",
]
