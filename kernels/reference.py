"""Plain-torch references of every op (as fla keeps `naive.py`): materialized logits, autograd throughout.

Tests and benchmarks compare the Triton and chunked paths against these; `impl="torch"` runs them. Each takes
`upcast=True` where a matmul is involved, to do it in fp32 (the truth a low-precision kernel is measured by).
"""

from __future__ import annotations

import torch

from rarl_kernels.aggregation import aggregate, grpo_metrics, token_weights


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


def grpo_token_loss_ref(logp, logp_old, logp_ref, advantages, *, eps_low, eps_high, beta, is_ratio=None,
                        bias_correction_kl=False):  # fmt: skip
    """Per-token GRPO loss with autograd, written like Liger's: [B,T] each -> (loss, kl, ratio, clipped)."""
    old = logp.detach() if logp_old is None else logp_old.float()
    ratio = torch.exp(logp - old)
    adv = advantages.float()[:, None]
    lo, hi = 1 - eps_low, 1 + eps_high
    loss = -torch.min(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    if is_ratio is not None:
        loss = loss * is_ratio
    kl = torch.zeros_like(logp).detach()
    if beta != 0.0:
        ref = logp.detach() if logp_ref is None else logp_ref.float()
        kl = torch.exp(ref - logp) - (ref - logp) - 1.0
        if bias_correction_kl:
            kl = kl * ratio  # the ratio with its gradient, as Liger's `kl_div * torch.exp(log_importance_weights)`
        loss = loss + beta * kl
    clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    return loss, kl.detach(), ratio.detach(), clipped.float()


def grpo_loss_ref(logp, logp_old, logp_ref, advantages, mask, *, eps_low=0.2, eps_high=0.2, beta=0.04,
                  loss_type="dapo", max_completion_length=None, num_items_in_batch=None, is_ratio=None,
                  world_size=None, bias_correction_kl=False):  # fmt: skip
    """Reference of `grpo_loss` (autograd through torch.min/clamp, as Liger computes it)."""
    if is_ratio is not None and is_ratio.dim() == 1:
        is_ratio = is_ratio[:, None]
    loss_mat, kl, ratio, clipped = grpo_token_loss_ref(logp, logp_old, logp_ref, advantages, eps_low=eps_low,
                                                       eps_high=eps_high, beta=beta, is_ratio=is_ratio,
                                                       bias_correction_kl=bias_correction_kl)  # fmt: skip
    loss = aggregate(loss_mat, mask, loss_type, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch, world_size=world_size)  # fmt: skip
    return loss, grpo_metrics(mask, kl, ratio, clipped, beta)


def fused_linear_grpo_loss_ref(hidden, weight, labels, mask, advantages, *, bias=None, logp_old=None, logp_ref=None,
                               ref_hidden=None, ref_weight=None, ref_bias=None, is_ratio=None, eps_low=0.2,
                               eps_high=0.2, beta=0.04, loss_type="dapo", max_completion_length=None,
                               num_items_in_batch=None, world_size=None, temperature=1.0, compute_entropy=True,
                               bias_correction_kl=False, upcast=False):  # fmt: skip
    """Reference of `fused_linear_grpo_loss`: materialized [B, T, V] logits, autograd throughout."""
    if logp_ref is None and ref_hidden is not None and beta != 0.0:
        with torch.no_grad():
            logp_ref = fused_linear_logprobs_ref(ref_hidden, ref_weight, labels, temperature=temperature,
                                                 bias=ref_bias, upcast=upcast)  # fmt: skip
    logp, entropy = fused_linear_logprobs_ref(hidden, weight, labels, temperature=temperature, bias=bias,
                                              return_entropy=True, upcast=upcast)  # fmt: skip
    if is_ratio is not None:
        is_ratio = is_ratio.reshape(is_ratio.shape[0], -1)
    loss_mat, kl, ratio, clipped = grpo_token_loss_ref(logp, logp_old, logp_ref, advantages, eps_low=eps_low,
                                                       eps_high=eps_high, beta=beta, is_ratio=is_ratio,
                                                       bias_correction_kl=bias_correction_kl)  # fmt: skip
    w = token_weights(mask, loss_type, max_completion_length=max_completion_length,
                      num_items_in_batch=num_items_in_batch, world_size=world_size)  # fmt: skip
    entropy = entropy.detach() if compute_entropy else None
    return (loss_mat * w).sum(), grpo_metrics(mask, kl, ratio, clipped, beta, entropy)
