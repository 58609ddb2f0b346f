"""Group-normalized GRPO advantages (docs/method.md section 4).

`A_j = (R_j - mean(R)) / (std(R) + eps)` within each prompt's group, with std's Bessel correction off by
default; `scale_by_std=False` gives Dr.GRPO's `A_j = R_j - mean(R)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_advantages", "group_std"]


def group_std(rewards: Tensor, *, unbiased: bool = False) -> Tensor:
    """Per-group standard deviation of a [B, G] reward tensor -> [B].

    With `unbiased=True` and G == 1 the std is 0 (not NaN): a single response has no spread.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got {tuple(rewards.shape)}")
    groups = rewards.shape[1]
    dof = max(groups - int(unbiased), 1)
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return (centered.square().sum(dim=1) / dof).sqrt()


def _flat_advantages(
    rewards: Tensor, group_index: Tensor, num_groups: int | None, *, scale_by_std: bool, unbiased: bool, eps: float
) -> Tensor:
    if group_index.shape != rewards.shape or rewards.dim() != 1:
        raise ValueError(
            f"flat rewards [R] and group_index [R] needed, got {tuple(rewards.shape)}, {tuple(group_index.shape)}"
        )
    index = group_index.long()
    if num_groups is None:
        num_groups = int(index.max()) + 1 if index.numel() else 0  # host sync: the group count sizes the buffers
    zeros = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    count = zeros.index_add(0, index, torch.ones_like(rewards))
    total = zeros.index_add(0, index, rewards)
    mean = total / count.clamp_min(1)
    centered = rewards - mean[index]
    if not scale_by_std:
        return centered
    sq = zeros.index_add(0, index, centered.square())
    std = (sq / (count - int(unbiased)).clamp_min(1)).sqrt()
    return centered / (std[index] + eps)


def group_advantages(
    rewards: Tensor,
    group_index: Tensor | None = None,
    num_groups: int | None = None,
    *,
    scale_by_std: bool = True,
    unbiased: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """Advantages normalized within each group of responses to the same prompt.

    Two layouts:
      - `rewards` [B, G] (group b holds row b), `group_index` None -> advantages [B, G];
      - `rewards` [R] flat with `group_index` [R] int (ids 0..B-1, groups of any size, in any order)
        -> advantages [R].

    Args:
        rewards: [B, G] or [R] real tensor; the output has its dtype.
        group_index: None, or [R] group id of each flat reward.
        num_groups: B for the flat layout; None reads it from `group_index` (one host sync).
        scale_by_std: divide by `std + eps` (GRPO); False gives Dr.GRPO (centering only).
        unbiased: Bessel's correction in the std (off by default, docs/method.md section 4); a group of
            one response then has std 0 rather than NaN.
        eps: added to the std before dividing.
    """
    if group_index is not None:
        return _flat_advantages(rewards, group_index, num_groups, scale_by_std=scale_by_std, unbiased=unbiased, eps=eps)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G] when group_index is None, got {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centered
    return centered / (group_std(rewards, unbiased=unbiased).unsqueeze(1) + eps)
