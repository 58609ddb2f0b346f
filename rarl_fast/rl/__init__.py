"""rl: the pure GRPO core — group-normalized advantages and RMO (METHOD.md sections 4-5)."""

from rarl_fast.rl.advantages import group_advantages, group_std
from rarl_fast.rl.rmo import (
    RMO_MODES,
    RMO_SOURCES,
    BestCache,
    RMOResult,
    gt_answer,
    longest_gt_answer,
    mutate_responses,
)

__all__ = [
    "RMO_MODES",
    "RMO_SOURCES",
    "BestCache",
    "RMOResult",
    "group_advantages",
    "group_std",
    "gt_answer",
    "longest_gt_answer",
    "mutate_responses",
]
