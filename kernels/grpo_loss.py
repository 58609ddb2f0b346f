"""GRPO per-token loss on [B, T] log-probs (clipped surrogate + k3 KL) and its aggregations.

Per token (METHOD.md section 4, Liger's semantics):
    ratio = exp(logp - logp_old)            (logp_old None: logp.detach(), so ratio = 1 with gradient)
    pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) * is_ratio
    k3    = exp(logp_ref - logp) - (logp_ref - logp) - 1      (only when beta != 0; 0 without a reference)
    kl    = k3, or ratio * k3 with bias_correction_kl (Liger's use_bias_correction_kl, DeepSeek-V3.2)
    l     = pg + beta * kl
With bias_correction_kl the ratio is Liger's exp(logp - logp_old) (not clipped, not detached: it carries
gradient even on-policy, where its value is 1), and the KL metric is the mean of the corrected kl, as Liger's.
The loss is `aggregate(l, mask, loss_type)`: a weighted sum with per-token weights from `token_weights`.
The per-token loss and its derivative d l / d logp (d pg/d ratio = -A where the unclipped branch is the min,
else 0; d k3 / d logp = 1 - exp(logp_ref - logp); d (ratio * k3) / d logp = ratio * (k3 + 1 - exp(logp_ref -
logp)) = ratio * (logp - logp_ref)) are one Triton kernel each way; aggregation is torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rarl_kernels._utils import launch, resolve_impl
from rarl_kernels._utils import world_size as _default_world_size

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


@triton.jit
def grpo_token(
    logp, old, ref, adv, isw, lo, hi, beta, HAS_KL: tl.constexpr, HAS_ISW: tl.constexpr, BIAS_CORR: tl.constexpr
):
    """Per-token GRPO math on fp32 tensors -> (loss, d loss / d logp, kl, ratio, clipped as 0/1); kl is k3, or
    ratio * k3 with BIAS_CORR (its gradient ratio * (k3 + 1 - exp(ref - logp)), written ratio * (logp - ref))."""
    ratio = tl.exp(logp - old)
    l1 = ratio * adv
    l2 = tl.minimum(tl.maximum(ratio, lo), hi) * adv
    # torch.min splits ties and clamp passes its gradient inside [lo, hi]: together the gradient reaches the
    # ratio exactly where l1 <= l2 (a tie with the ratio outside [lo, hi] needs adv == 0, gradient 0 anyway).
    loss = -tl.minimum(l1, l2)
    dlogp = tl.where(l1 <= l2, -adv * ratio, 0.0)
    if HAS_ISW:
        loss = loss * isw
        dlogp = dlogp * isw
    kl = tl.zeros_like(logp)
    if HAS_KL:
        d = ref - logp
        ed = tl.exp(d)
        kl = ed - d - 1.0
        if BIAS_CORR:
            kl = kl * ratio
            dlogp += beta * (-d * ratio)
        else:
            dlogp += beta * (1.0 - ed)
        loss += beta * kl
    clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    return loss, dlogp, kl, ratio, clipped.to(tl.float32)


@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, isw_ptr, loss_ptr, kl_ptr, ratio_ptr, clip_ptr,
    N, lo, hi, beta, HAS_KL: tl.constexpr, HAS_ISW: tl.constexpr, BIAS_CORR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    logp = tl.load(logp_ptr + offs, mask=m, other=0.0)
    old = tl.load(old_ptr + offs, mask=m, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=m, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=m, other=0.0)
    isw = tl.load(isw_ptr + offs, mask=m, other=0.0)
    loss, _, kl, ratio, clipped = grpo_token(logp, old, ref, adv, isw, lo, hi, beta, HAS_KL, HAS_ISW, BIAS_CORR)
    tl.store(loss_ptr + offs, loss, mask=m)
    tl.store(kl_ptr + offs, kl, mask=m)
    tl.store(ratio_ptr + offs, ratio, mask=m)
    tl.store(clip_ptr + offs, clipped, mask=m)


@triton.jit
def _grpo_loss_bwd_kernel(
    g_ptr, logp_ptr, old_ptr, ref_ptr, adv_ptr, isw_ptr, dlogp_ptr,
    N, lo, hi, beta, HAS_KL: tl.constexpr, HAS_ISW: tl.constexpr, BIAS_CORR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    logp = tl.load(logp_ptr + offs, mask=m, other=0.0)
    old = tl.load(old_ptr + offs, mask=m, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=m, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=m, other=0.0)
    isw = tl.load(isw_ptr + offs, mask=m, other=0.0)
    _, dlogp, _, _, _ = grpo_token(logp, old, ref, adv, isw, lo, hi, beta, HAS_KL, HAS_ISW, BIAS_CORR)
    tl.store(dlogp_ptr + offs, tl.load(g_ptr + offs, mask=m, other=0.0) * dlogp, mask=m)


def _kernel_args(logp, old, ref, adv, isw):
    """Flat fp32 [N] operands; absent ones alias logp (old: ratio = 1; ref/isw: unused by the constexprs)."""
    flat = logp.reshape(-1)
    return [flat if t is None else t for t in (old, ref, adv, isw)]


def grpo_token_fwd_triton(logp, old, ref, adv, isw, lo, hi, beta, bias_corr=False):
    """All [N] fp32 contiguous (None allowed except logp/adv) -> loss, kl, ratio, clipped: [N] fp32 each."""
    N = logp.numel()
    outs = [torch.empty_like(logp) for _ in range(4)]
    block = 1024
    launch(
        "grpo_loss_fwd", _grpo_loss_fwd_kernel, (triton.cdiv(N, block),),
        logp, *_kernel_args(logp, old, ref, adv, isw), *outs, N, lo, hi, beta,
        HAS_KL=ref is not None and beta != 0.0, HAS_ISW=isw is not None, BIAS_CORR=bias_corr, BLOCK=block,
    )  # fmt: skip
    return outs


class _GRPOTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, adv, isw, lo, hi, beta, bias_corr):
        loss, kl, ratio, clipped = grpo_token_fwd_triton(logp, old, ref, adv, isw, lo, hi, beta, bias_corr)
        ctx.save_for_backward(logp, old, ref, adv, isw)
        ctx.params = (lo, hi, beta, bias_corr)
        ctx.mark_non_differentiable(kl, ratio, clipped)
        return loss, kl, ratio, clipped

    @staticmethod
    def backward(ctx, g_loss, *_):
        logp, old, ref, adv, isw = ctx.saved_tensors
        lo, hi, beta, bias_corr = ctx.params
        dlogp = torch.empty_like(logp)
        N, block = logp.numel(), 1024
        launch(
            "grpo_loss_bwd", _grpo_loss_bwd_kernel, (triton.cdiv(N, block),),
            g_loss.contiguous(), logp, *_kernel_args(logp, old, ref, adv, isw), dlogp, N, lo, hi, beta,
            HAS_KL=ref is not None and beta != 0.0, HAS_ISW=isw is not None, BIAS_CORR=bias_corr, BLOCK=block,
        )  # fmt: skip
        return dlogp, *([None] * 8)


def grpo_token_torch(logp, old, ref, adv, isw, lo, hi, beta, bias_corr=False):
    """torch twin of the `grpo_token` Triton helper (no autograd): loss, dlogp, kl, ratio, clipped."""
    ratio = torch.exp(logp - (logp if old is None else old))
    l1 = ratio * adv
    l2 = ratio.clamp(lo, hi) * adv
    loss = -torch.minimum(l1, l2)
    dlogp = torch.where(l1 <= l2, -adv * ratio, 0.0)
    if isw is not None:
        loss, dlogp = loss * isw, dlogp * isw
    kl = torch.zeros_like(logp)
    if ref is not None and beta != 0.0:
        d = ref - logp
        ed = d.exp()
        kl = ed - d - 1.0
        if bias_corr:
            kl, dlogp = kl * ratio, dlogp + beta * (-d * ratio)
        else:
            dlogp = dlogp + beta * (1.0 - ed)
        loss = loss + beta * kl
    clipped = (((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))).float()
    return loss, dlogp, kl, ratio, clipped


def grpo_token_loss_ref(logp, logp_old, logp_ref, advantages, *, eps_low, eps_high, beta, is_ratio=None,
                        bias_correction_kl=False):  # fmt: skip
    """Plain-torch per-token loss with autograd, written like Liger's: [B,T] each -> (loss, kl, ratio, clipped)."""
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


def per_token_inputs(logp_old, logp_ref, advantages, is_ratio, shape, beta):
    """Flat fp32 [B*T] per-token operands (advantages and is_ratio broadcast over T); None stays None."""
    B, T = shape
    flat = lambda t: None if t is None else t.detach().float().expand(B, T).reshape(-1).contiguous()
    adv = flat(advantages.reshape(B, 1))
    isw = None if is_ratio is None else flat(is_ratio.reshape(B, -1))
    return flat(logp_old), flat(logp_ref) if beta != 0.0 else None, adv, isw


def grpo_loss_ref(logp, logp_old, logp_ref, advantages, mask, *, eps_low=0.2, eps_high=0.2, beta=0.04,
                  loss_type="dapo", max_completion_length=None, num_items_in_batch=None, is_ratio=None,
                  world_size=None, bias_correction_kl=False):  # fmt: skip
    """Plain-torch reference of `grpo_loss` (autograd through torch.min/clamp, as Liger computes it)."""
    if is_ratio is not None and is_ratio.dim() == 1:
        is_ratio = is_ratio[:, None]
    loss_mat, kl, ratio, clipped = grpo_token_loss_ref(logp, logp_old, logp_ref, advantages, eps_low=eps_low,
                                                       eps_high=eps_high, beta=beta, is_ratio=is_ratio,
                                                       bias_correction_kl=bias_correction_kl)  # fmt: skip
    loss = aggregate(loss_mat, mask, loss_type, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch, world_size=world_size)  # fmt: skip
    return loss, grpo_metrics(mask, kl, ratio, clipped, beta)


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor | None,
    logp_ref: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.04,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    is_ratio: torch.Tensor | None = None,
    world_size: int | None = None,
    bias_correction_kl: bool = False,
    impl: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss from per-token log-probs; differentiable w.r.t. logp only.

    logp, logp_old, logp_ref, mask: [B, T]; advantages: [B]; is_ratio (rollout importance weights):
    [B, T], [B, 1] or [B] | None. loss_type: grpo | bnpo | dapo | dr_grpo (see `token_weights`).
    bias_correction_kl: the KL term (and kl_mean) times the ratio exp(logp - logp_old), with its gradient.
    Returns (fp32 scalar loss, {"kl_mean" (beta != 0), "clip_ratio", "ratio_mean"}: fp32 scalar tensors).
    """
    if loss_type not in LOSS_TYPES:
        raise NotImplementedError(f"loss_type={loss_type!r} is not supported (supported: {LOSS_TYPES})")
    if resolve_impl(impl, logp.device) != "triton":
        return grpo_loss_ref(
            logp, logp_old, logp_ref, advantages, mask, eps_low=eps_low, eps_high=eps_high, beta=beta,
            loss_type=loss_type, max_completion_length=max_completion_length,
            num_items_in_batch=num_items_in_batch, is_ratio=is_ratio, world_size=world_size,
            bias_correction_kl=bias_correction_kl,
        )  # fmt: skip
    shape = logp.shape
    old, ref, adv, isw = per_token_inputs(logp_old, logp_ref, advantages, is_ratio, shape, beta)
    flat = logp.float().reshape(-1).contiguous()
    loss_tok, kl, ratio, clipped = _GRPOTokenLoss.apply(flat, old, ref, adv, isw, 1 - eps_low, 1 + eps_high, beta,
                                                        bool(bias_correction_kl))  # fmt: skip
    loss = aggregate(loss_tok.view(shape), mask, loss_type, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch, world_size=world_size)  # fmt: skip
    return loss, grpo_metrics(mask, kl.view(shape), ratio.view(shape), clipped.view(shape), beta)
