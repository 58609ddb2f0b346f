"""From per-token losses to the scalar loss and the metrics: every aggregation as per-token weights.

Plain torch, no host sync: the weights are built on the device, the metrics stay tensors. Which loss type
aggregates how is `loss_types.AGGREGATION`.
"""

from __future__ import annotations

import torch

from rarl_kernels._utils import world_size as _default_world_size
from rarl_kernels.loss_types import AGGREGATION, LOSS_TYPES, check_loss_options, check_loss_params


def token_weights(mask, loss_type, *, max_completion_length=None, num_items_in_batch=None, world_size=None,
                  luspo_reduction="row_sum"):  # fmt: skip
    """[B, T] fp32 weights w such that loss = sum(w * l) (no host sync). mask [B, T] (0 off the completion).

    sequence_mean (grpo, sapo): mask / (clamp(row count, 1) * B); call_tokens (bnpo): mask / clamp(total count, 1),
    ignoring num_items_in_batch as Liger and TRL do; global_tokens (dapo, cispo, vespo): mask /
    clamp(num_items_in_batch / world_size, 1), or the call's count without num_items_in_batch; fixed_length
    (dr_grpo): mask / (B * max_completion_length); sequence_sum (luspo): with luspo_reduction "row_sum" mask / B
    (each row's masked sum, averaged over rows), with "length_weighted_mean" every position, padding included,
    its row's token count / (B * T) (`loss_types.LUSPO_REDUCTIONS`).
    """
    check_loss_options(loss_type)
    check_loss_params(luspo_reduction=luspo_reduction)
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
    if luspo_reduction == "length_weighted_mean":  # sequence_sum, Liger's form
        return m.sum(-1, keepdim=True).expand_as(m) / float(max(m.numel(), 1))
    return m / float(max(B, 1))  # sequence_sum


def aggregate(loss_mat, mask, mode, **aggregation):
    """Scalar loss from per-token losses [B, T] and mask [B, T]; `aggregation` are `token_weights`' keyword
    arguments (the modes are described there)."""
    return (loss_mat * token_weights(mask, mode, **aggregation)).sum()


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
