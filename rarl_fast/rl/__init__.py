"""rl: the pure GRPO core, group-normalized advantages and RMO (docs/method.md sections 4-5)."""

from rarl_fast.rl.advantages import group_advantages, group_std
from rarl_fast.rl.rmo import (
    RMO_BASELINES,
    RMO_MODES,
    RMO_SOURCES,
    THINK_STYLES,
    BestCache,
    RMOResult,
    RMOSettings,
    gt_answer,
    longest_gt_answer,
    mutate_responses,
)

__all__ = [
    "RMO_BASELINES",
    "RMO_MODES",
    "RMO_SOURCES",
    "THINK_STYLES",
    "BestCache",
    "RMOResult",
    "RMOSettings",
    "group_advantages",
    "group_std",
    "gt_answer",
    "longest_gt_answer",
    "mutate_responses",
]
