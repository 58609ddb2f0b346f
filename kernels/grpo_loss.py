"""GRPO per-token loss on [B, T] log-probs (clipped surrogate + k3 KL), aggregated to the scalar loss.

Per token (docs/method.md section 4, Liger's semantics):
    ratio = exp(logp - logp_old)            (logp_old None: logp.detach(), so ratio = 1 with gradient)
    pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) * is_ratio
    k3    = exp(logp_ref - logp) - (logp_ref - logp) - 1      (only when beta != 0; 0 without a reference)
    kl    = k3, or ratio * k3 with bias_correction_kl (Liger's use_bias_correction_kl, DeepSeek-V3.2)
    l     = pg + beta * kl
With bias_correction_kl the ratio is Liger's exp(logp - logp_old) (not clipped, not detached: it carries
gradient even on-policy, where its value is 1), and the KL metric is the mean of the corrected kl, as Liger's.
The loss is `aggregate(l, mask, loss_type)` (aggregation.py): a weighted sum with per-token weights.
The per-token loss and its derivative d l / d logp (d pg/d ratio = -A where the unclipped branch is the min,
else 0; d k3 / d logp = 1 - exp(logp_ref - logp); d (ratio * k3) / d logp = ratio * (k3 + 1 - exp(logp_ref -
logp)) = ratio * (logp - logp_ref)) are one Triton kernel each way; aggregation is torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rarl_kernels._utils import launch, resolve_impl
from rarl_kernels.aggregation import LOSS_TYPES, aggregate, grpo_metrics
from rarl_kernels.reference import grpo_loss_ref


class TokenOperands(NamedTuple):
    """The per-token operands of the GRPO token math: flat fp32 [N] each, None where the call has none."""

    adv: torch.Tensor
    """advantage of the token's sequence"""
    old: torch.Tensor | None = None
    """log-prob under the rollout policy (None: on-policy, ratio 1)"""
    ref: torch.Tensor | None = None
    """log-prob under the reference policy (None: no KL term)"""
    isw: torch.Tensor | None = None
    """rollout importance weight multiplying the clipped term"""
    weight: torch.Tensor | None = None
    """aggregation weight (`token_weights`), for the fused loss that sums weight * loss itself"""

    def rows(self, r0: int, r1: int) -> TokenOperands:
        """The operands of tokens r0:r1."""
        return TokenOperands(*(None if t is None else t[r0:r1] for t in self))


class TokenParams(NamedTuple):
    """The scalars of the GRPO token math."""

    lo: float
    """lower clip bound of the ratio, 1 - eps_low"""
    hi: float
    """upper clip bound of the ratio, 1 + eps_high"""
    beta: float
    """weight of the KL term"""
    bias_corr: bool = False
    """KL term times the ratio (Liger's use_bias_correction_kl)"""


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


def _kernel_args(logp, tok: TokenOperands):
    """Flat fp32 [N] operands; absent ones alias logp (old: ratio = 1; ref/isw: unused by the constexprs)."""
    flat = logp.reshape(-1)
    return [flat if t is None else t for t in (tok.old, tok.ref, tok.adv, tok.isw)]


def _flags(tok: TokenOperands, p: TokenParams) -> dict[str, bool]:
    """The constexpr switches; BIAS_CORR only with a KL term (otherwise it changes nothing: one compiled variant)."""
    has_kl = tok.ref is not None and p.beta != 0.0
    return dict(HAS_KL=has_kl, HAS_ISW=tok.isw is not None, BIAS_CORR=has_kl and p.bias_corr)


def grpo_token_fwd_triton(logp, tok: TokenOperands, p: TokenParams):
    """logp and the operands [N] fp32 contiguous -> loss, kl, ratio, clipped: [N] fp32 each."""
    N = logp.numel()
    outs = [torch.empty_like(logp) for _ in range(4)]
    block = 1024
    launch(
        "grpo_loss_fwd", _grpo_loss_fwd_kernel, (triton.cdiv(N, block),),
        logp, *_kernel_args(logp, tok), *outs, N, p.lo, p.hi, p.beta, **_flags(tok, p), BLOCK=block,
    )  # fmt: skip
    return outs


def grpo_token_bwd_triton(g_loss, logp, tok: TokenOperands, p: TokenParams):
    """g_loss [N] fp32 -> g_loss * d loss / d logp [N] fp32."""
    dlogp = torch.empty_like(logp)
    N, block = logp.numel(), 1024
    launch(
        "grpo_loss_bwd", _grpo_loss_bwd_kernel, (triton.cdiv(N, block),),
        g_loss.contiguous(), logp, *_kernel_args(logp, tok), dlogp, N, p.lo, p.hi, p.beta, **_flags(tok, p),
        BLOCK=block,
    )  # fmt: skip
    return dlogp


class _GRPOTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, tok, p):
        loss, kl, ratio, clipped = grpo_token_fwd_triton(logp, tok, p)
        ctx.save_for_backward(logp)
        ctx.tok, ctx.p = tok, p  # detached operands: no gradient flows to them
        ctx.mark_non_differentiable(kl, ratio, clipped)
        return loss, kl, ratio, clipped

    @staticmethod
    def backward(ctx, g_loss, *_):
        (logp,) = ctx.saved_tensors
        return grpo_token_bwd_triton(g_loss, logp, ctx.tok, ctx.p), None, None


def grpo_token_torch(logp, tok: TokenOperands, p: TokenParams):
    """torch twin of the `grpo_token` Triton helper (no autograd): loss, dlogp, kl, ratio, clipped."""
    lo, hi, beta = p.lo, p.hi, p.beta
    adv = tok.adv
    ratio = torch.exp(logp - (logp if tok.old is None else tok.old))
    l1 = ratio * adv
    l2 = ratio.clamp(lo, hi) * adv
    loss = -torch.minimum(l1, l2)
    dlogp = torch.where(l1 <= l2, -adv * ratio, 0.0)
    if tok.isw is not None:
        loss, dlogp = loss * tok.isw, dlogp * tok.isw
    kl = torch.zeros_like(logp)
    if tok.ref is not None and beta != 0.0:
        d = tok.ref - logp
        ed = d.exp()
        kl = ed - d - 1.0
        if p.bias_corr:
            kl, dlogp = kl * ratio, dlogp + beta * (-d * ratio)
        else:
            dlogp = dlogp + beta * (1.0 - ed)
        loss = loss + beta * kl
    clipped = (((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))).float()
    return loss, dlogp, kl, ratio, clipped


def per_token_inputs(logp_old, logp_ref, advantages, is_ratio, shape, beta) -> TokenOperands:
    """Flat fp32 [B*T] per-token operands (advantages and is_ratio broadcast over T); None stays None, and the
    reference is dropped when beta == 0."""
    B, T = shape
    flat = lambda t: None if t is None else t.detach().float().expand(B, T).reshape(-1).contiguous()
    adv = flat(advantages.reshape(B, 1))
    isw = None if is_ratio is None else flat(is_ratio.reshape(B, -1))
    return TokenOperands(adv=adv, old=flat(logp_old), ref=flat(logp_ref) if beta != 0.0 else None, isw=isw)


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
    tok = per_token_inputs(logp_old, logp_ref, advantages, is_ratio, shape, beta)
    flat = logp.float().reshape(-1).contiguous()
    params = TokenParams(lo=1 - eps_low, hi=1 + eps_high, beta=beta, bias_corr=bool(bias_correction_kl))
    loss_tok, kl, ratio, clipped = _GRPOTokenLoss.apply(flat, tok, params)
    loss = aggregate(loss_tok.view(shape), mask, loss_type, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch, world_size=world_size)  # fmt: skip
    return loss, grpo_metrics(mask, kl.view(shape), ratio.view(shape), clipped.view(shape), beta)
