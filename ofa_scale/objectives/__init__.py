"""Pretraining objectives: raw records → task examples → fixed-shape group batches, and OFA's loss.

See docs/objectives.md for the mixing/normalisation design and docs/interfaces.md §2–§4 for the contracts.
"""

from ofa_scale.objectives.batching import (Collator, Composition, GroupBatch, constraint_mask, group_names,
                                           loss_inputs, to_model_inputs)
from ofa_scale.objectives.config import (GROUPS, PAD_TASK_ID, SOURCES, TASK_GROUP, TASK_ID, TASKS, GroupShape,
                                         ObjectivesConfig, ScaledConstants)
from ofa_scale.objectives.example_builder import ExampleBuilder
from ofa_scale.objectives.loss import (LossOutput, TokenLosses, combine_group_losses, count_loss_tokens,
                                       label_smoothed_cross_entropy, loss_denominators, merge_task_sums,
                                       reduce_token_losses, smoothed_loss, task_metrics, token_losses)
from ofa_scale.objectives.negatives import Negatives
from ofa_scale.objectives.step import default_denominators, group_losses, micro_batch_loss
from ofa_scale.objectives.text import pre_caption, pre_question

__all__ = [
    "Collator", "Composition", "GroupBatch", "constraint_mask", "group_names", "loss_inputs", "to_model_inputs",
    "GROUPS", "PAD_TASK_ID", "SOURCES", "TASK_GROUP", "TASK_ID", "TASKS", "GroupShape", "ObjectivesConfig",
    "ScaledConstants", "ExampleBuilder", "LossOutput", "TokenLosses", "combine_group_losses", "count_loss_tokens",
    "label_smoothed_cross_entropy", "loss_denominators", "merge_task_sums", "reduce_token_losses",
    "smoothed_loss", "task_metrics", "token_losses", "Negatives", "pre_caption", "pre_question",
    "default_denominators", "group_losses", "micro_batch_loss",
]
