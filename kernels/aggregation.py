"""From per-token losses to the scalar loss and the metrics: Liger's aggregations as per-token weights.

Plain torch, no host sync: the weights are built on the device, the metrics stay tensors.
"""

from __future__ import annotations

import torch

from rarl_kernels._utils import world_size as _default_world_size

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def token_weights(mask, loss_type, *, max_completion_length=None, num_items_in_batch=None, world_size=None):
    """[B, T] fp32 weights w such that loss = sum(w * l) (Liger's aggregations; no host sync).

    grpo: mask / (clamp(row count, 1) * B); bnpo: mask / clamp(total count, 1); dapo: mask /
    clamp(num_items_in_batch / world_size, 1), or the call's count without num_items_in_batch; dr_grpo:
    mask / (B * max_completion_length). bnpo ignores num_items_in_batch, as Liger's does.
    """
    m = mask.float()
    B = m.shape[0]
    if loss_type == "grpo":
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * B)
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dapo":
        if num_items_in_batch is None:
            return m / m.sum().clamp(min=1.0)
        ws = world_size if world_size is not None else _default_world_size()
        n = torch.as_tensor(num_items_in_batch, device=m.device, dtype=torch.float32)
        return m / (n / ws).clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return m / float(B * max_completion_length)
    raise NotImplementedError(f"loss_type={loss_type!r} is not supported (supported: {LOSS_TYPES})")


def aggregate(loss_mat, mask, mode, *, max_completion_length=None, num_items_in_batch=None, world_size=None):
    """Scalar loss from per-token losses [B, T] and mask [B, T] (see `token_weights` for the modes)."""
    w = token_weights(mask, mode, max_completion_length=max_completion_length,
                      num_items_in_batch=num_items_in_batch, world_size=world_size)  # fmt: skip
    return (loss_mat * w).sum()


def grpo_metrics(mask, kl, ratio, clipped, beta, entropy=None) -> dict[str, torch.Tensor]:
    """Masked means over all tokens of the call, as Liger defines its metrics (tensors, no .item())."""
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
