"""From per-token losses to the scalar loss and the metrics: every aggregation as per-token weights.

Plain torch, no host sync: the weights are built on the device, the metrics stay tensors. Which loss type
aggregates how is `loss_types.AGGREGATION`.
"""

from __future__ import annotations

import torch

from rarl_kernels._utils import world_size as _default_world_size
from rarl_kernels.loss_types import AGGREGATION, LOSS_TYPES, check_loss_options


def token_weights(mask, loss_type, *, max_completion_length=None, num_items_in_batch=None, world_size=None):
    """[B, T] fp32 weights w such that loss = sum(w * l) (no host sync). mask [B, T] (0 off the completion).

    sequence_mean (grpo, sapo): mask / (clamp(row count, 1) * B); call_tokens (bnpo): mask / clamp(total count, 1),
    ignoring num_items_in_batch as Liger and TRL do; global_tokens (dapo, cispo, vespo): mask /
    clamp(num_items_in_batch / world_size, 1), or the call's count without num_items_in_batch; fixed_length
    (dr_grpo): mask / (B * max_completion_length); sequence_sum (luspo): mask / B, TRL's masked row sums averaged
    over rows (Liger instead weights every position, padding included, by its row's length / (B * T)).
    """
    check_loss_options(loss_type)
    m = mask.float()
    B = m.shape[0]
    kind = AGGREGATION[loss_type]
    if kind == "sequence_mean":
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * B)
    if kind == "call_tokens" or (kind == "global_tokens" and num_items_in_batch is None):
        return m / m.sum().clamp(min=1.0)
    if kind == "global_tokens":
        ws = world_size if world_size is not None else _default_world_size()
        n = torch.as_tensor(num_items_in_batch, device=m.device, dtype=torch.float32)
        return m / (n / ws).clamp(min=1.0)
    if kind == "fixed_length":
        if max_completion_length is None:
            raise ValueError(f"loss_type={loss_type!r} needs max_completion_length")
        return m / float(B * max_completion_length)
    return m / float(max(B, 1))  # sequence_sum


def aggregate(loss_mat, mask, mode, *, max_completion_length=None, num_items_in_batch=None, world_size=None):
    """Scalar loss from per-token losses [B, T] and mask [B, T] (see `token_weights` for the modes)."""
    w = token_weights(mask, mode, max_completion_length=max_completion_length,
                      num_items_in_batch=num_items_in_batch, world_size=world_size)  # fmt: skip
    return (loss_mat * w).sum()


def grpo_metrics(mask, kl, ratio, clipped, beta, entropy=None) -> dict[str, torch.Tensor]:
    """Masked means over all tokens of the call, as Liger defines its metrics (tensors, no .item()).

    With sequence-level importance sampling the ratio and the clip flag are the sequence's, counted once per token
    (Liger's weighting; TRL logs the mean over sequences instead)."""
    m = mask.float()
    n = m.sum().clamp(min=1.0)
    out = {}
    if beta != 0.0:
        out["kl_mean"] = (kl * m).sum() / n
    out["clip_ratio"] = (clipped * m).sum() / n
    out["ratio_mean"] = (ratio * m).sum() / n
    if entropy is not None:
        out["entropy_mean"] = (entropy * m).sum() / n
    return out


__all__ = ["LOSS_TYPES", "aggregate", "grpo_metrics", "token_weights"]
