"""Plain-torch references of every op (as fla keeps `naive.py`): materialized logits, autograd throughout.

Tests and benchmarks compare the Triton and chunked paths against these; `impl="torch"` runs them. Each takes
`upcast=True` where a matmul is involved, to do it in fp32 (the truth a low-precision kernel is measured by).
The GRPO-family math is written here as TRL 1.16's `GRPOTrainer._compute_loss` states it (tensor ops on [B, T]
with autograd), independently of the kernels' formulation of the same math.
"""

from __future__ import annotations

import math

import torch

from rarl_kernels.aggregation import grpo_metrics, token_weights
from rarl_kernels.loss_types import LossOptions


def _logits_ref(hidden, weight, bias, upcast):
    """hidden @ weight^T + bias, in the inputs' dtype, or in fp32 with `upcast`."""
    if upcast:
        hidden, weight = hidden.float(), weight.float()
        bias = bias.float() if bias is not None else None
    logits = hidden @ weight.t()
    return logits + bias if bias is not None else logits


def _label_logp_ref(logprobs, labels):
    """logprobs[..., labels], 0 where the label is outside [0, V)."""
    V = logprobs.shape[-1]
    valid = (labels >= 0) & (labels < V)
    return torch.where(valid, logprobs.gather(-1, labels.clamp(0, V - 1)[..., None]).squeeze(-1), 0.0), valid


def fused_linear_logprobs_ref(
    hidden, weight, labels, *, temperature=1.0, bias=None, return_entropy=False, upcast=False
):
    """Reference of `fused_linear_logprobs`, materializing [N, V]. `upcast=True` does the matmul in fp32."""
    logprobs = torch.log_softmax(_logits_ref(hidden, weight, bias, upcast).float() / temperature, dim=-1)
    logp, _ = _label_logp_ref(logprobs, labels)
    if not return_entropy:
        return logp
    return logp, -(logprobs.exp() * logprobs).sum(-1)


def fused_linear_logprob_stats_ref(hidden, weight, labels, *, bias=None, temperature=1.0, softcap=None,
                                   logit_scale=1.0, upcast=False):  # fmt: skip
    """Reference of `fused_linear_logprob_stats`, materializing [N, V]: (logp, entropy, log sum p^2, mean logit,
    label is the first argmax), every statistic computed."""
    z = _logits_ref(hidden, weight, bias, upcast).float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    logp, valid = _label_logp_ref(logprobs, labels)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    with torch.no_grad():
        log_sum_sq = torch.logsumexp(2 * logprobs, dim=-1)
        is_argmax = valid & (z.argmax(-1) == labels)
    return logp, entropy, log_sum_sq, z.detach().mean(-1), is_argmax


@torch.no_grad()
def vespo_weights_ref(adv, log_ratio, mask, is_ratio, o: LossOptions):
    """VESPO's detached gamma weight per sequence [B, 1]: w = exp(clamped sum of the token log-ratios plus the
    rollout correction's log-weights), phi(w) = exp(lambda + k log w - lambda w), phi(1) = 1."""
    floor = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    if is_ratio is not None:
        log_w = log_w + torch.log(is_ratio).clamp(floor, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(floor, 20.0)
    nonneg = adv >= 0
    k = torch.where(nonneg, o.vespo_k_pos, o.vespo_k_neg)
    lam = torch.where(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_token_loss_ref(logp, logp_old, logp_ref, advantages, mask, o: LossOptions, is_ratio=None):
    """Per-token loss with autograd: logp, logp_old, logp_ref, mask [B, T]; advantages [B]; is_ratio [B, T] |
    [B, 1] | None. Returns (loss, kl, ratio, clipped), [B, T] each (the last three detached)."""
    adv = advantages.float()[:, None]
    m = mask.float()
    old = logp.detach() if logp_old is None else logp_old.float()
    log_ratio = logp - old
    if o.importance_sampling_level == "sequence":
        log_w = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        log_w = log_ratio
    ratio = torch.exp(log_w)
    no_clip = torch.zeros_like(ratio, dtype=torch.bool)
    if o.surrogate == "cispo":
        pg = -torch.clamp(ratio, max=o.eps_high).detach() * adv * logp
        clipped = (ratio > o.eps_high) & (adv > 0)
    elif o.surrogate == "sapo":
        tau = torch.where(adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        pg = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        clipped = no_clip
    elif o.surrogate == "vespo":
        pg = -vespo_weights_ref(adv, log_ratio, m, is_ratio, o) * adv * logp
        clipped = no_clip
    else:
        lo, hi = 1 - o.eps_low, 1 + o.eps_high
        capped = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
        pg = -torch.min(capped * adv, torch.clamp(ratio, lo, hi) * adv)
        clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    if is_ratio is not None and o.surrogate != "vespo":  # VESPO folds the correction into its weight
        pg = pg * is_ratio
    kl = torch.zeros_like(logp)
    loss = pg
    if o.beta != 0.0:
        ref = logp.detach() if logp_ref is None else logp_ref.float()
        kl = torch.exp(ref - logp) - (ref - logp) - 1.0
        if o.bias_correction_kl:
            kl = kl * ratio  # the ratio with its gradient, before any delta cap
        loss = pg + o.beta * kl
    shape = logp.shape
    return (loss.expand(shape), kl.detach().expand(shape), ratio.detach().expand(shape),
            clipped.float().expand(shape))  # fmt: skip


def _per_row(is_ratio, B):
    return None if is_ratio is None else is_ratio.float().reshape(B, -1)


def grpo_loss_ref(logp, logp_old, logp_ref, advantages, mask, *, max_completion_length=None, num_items_in_batch=None,
                  is_ratio=None, world_size=None, luspo_reduction="row_sum", **options):  # fmt: skip
    """Reference of `grpo_loss`; `options` are `LossOptions` fields."""
    o = LossOptions(**options).checked()
    loss_mat, kl, ratio, clipped = grpo_token_loss_ref(logp, logp_old, logp_ref, advantages, mask, o,
                                                       _per_row(is_ratio, logp.shape[0]))  # fmt: skip
    w = token_weights(mask, o.loss_type, max_completion_length=max_completion_length,
                      num_items_in_batch=num_items_in_batch, world_size=world_size,
                      luspo_reduction=luspo_reduction)  # fmt: skip
    return (loss_mat * w).sum(), grpo_metrics(mask, kl, ratio, clipped, o.beta)


def fused_linear_grpo_loss_ref(hidden, weight, labels, mask, advantages, *, bias=None, logp_old=None, logp_ref=None,
                               ref_hidden=None, ref_weight=None, ref_bias=None, is_ratio=None,
                               max_completion_length=None, num_items_in_batch=None, world_size=None,
                               luspo_reduction="row_sum", temperature=1.0, compute_entropy=True, upcast=False,
                               **options):  # fmt: skip
    """Reference of `fused_linear_grpo_loss`: materialized [B, T, V] logits, autograd throughout; `options` are
    `LossOptions` fields."""
    o = LossOptions(**options).checked()
    if logp_ref is None and ref_hidden is not None and o.beta != 0.0:
        with torch.no_grad():
            logp_ref = fused_linear_logprobs_ref(ref_hidden, ref_weight, labels, temperature=temperature,
                                                 bias=ref_bias, upcast=upcast)  # fmt: skip
    logp, entropy = fused_linear_logprobs_ref(hidden, weight, labels, temperature=temperature, bias=bias,
                                              return_entropy=True, upcast=upcast)  # fmt: skip
    loss_mat, kl, ratio, clipped = grpo_token_loss_ref(logp, logp_old, logp_ref, advantages, mask, o,
                                                       _per_row(is_ratio, logp.shape[0]))  # fmt: skip
    w = token_weights(mask, o.loss_type, max_completion_length=max_completion_length,
                      num_items_in_batch=num_items_in_batch, world_size=world_size,
                      luspo_reduction=luspo_reduction)  # fmt: skip
    entropy = entropy.detach() if compute_entropy else None
    return (loss_mat * w).sum(), grpo_metrics(mask, kl, ratio, clipped, o.beta, entropy)
