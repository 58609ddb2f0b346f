"""The GRPO-family per-token loss on [B, T] log-probs, and its gradient, aggregated to the scalar loss.

Per token (docs/method.md section 4; the loss types and options are `loss_types.LossOptions`). r is the
importance ratio: exp(logp - logp_old) per token, or with importance_sampling_level="sequence" the sequence's
exp(mean over its tokens of logp - logp_old) (logp_old None: logp detached, so r = 1 with its gradient).
    clip   pg = -min(min(r, delta) A, clip(r, 1 - eps_low, 1 + eps_high) A)           (delta None: no cap)
    cispo  pg = -sg(min(r, eps_high)) A logp                                            (sg: no gradient)
    sapo   pg = -(4 / tau) sigmoid(tau (r - 1)) A,  tau = tau_pos if A > 0 else tau_neg
    vespo  pg = -sg(phi) A logp, phi = exp(lam + k log w - lam w) of the sequence's w (see `sequence_operand`)
    k3     = exp(logp_ref - logp) - (logp_ref - logp) - 1    (beta != 0 with a reference; else 0)
    kl     = k3, or r k3 with bias_correction_kl (r carrying its gradient)
    l      = pg * is_ratio + beta kl                          (vespo folds is_ratio into w instead)
The loss is sum(weight * l) with `aggregation.token_weights`.

The gradient is formed with the loss, never by autograd: coef = weight * d l / d logp per token. With a
token-level ratio it only involves the token itself (`grpo_token`, one Triton kernel). With a sequence-level
ratio a token's loss depends on every log-prob of its sequence through s = mean(logp - logp_old): the kernel
also returns each token's weight * d l / d s, and `spread_sequence_gradient` adds their sum over the sequence,
times d s / d logp = mask / (token count), to the coef of each of its tokens. VESPO's weight is detached, so its
gradient stays per token; only its value needs the whole sequence. Those per-sequence reductions (`sequence_operand`
before the kernel, `spread_sequence_gradient` after it) are a few torch ops on [rows] vectors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rarl_kernels._utils import launch, resolve_impl
from rarl_kernels.aggregation import grpo_metrics, token_weights
from rarl_kernels.loss_types import LossOptions, LuspoReduction
from rarl_kernels.reference import grpo_loss_ref

# Rows of the per-token output block of `token_stats`: the loss, its KL term, the ratio and clip flag (metrics),
# coef = weight * d loss / d logp, and with a sequence-level ratio weight * d loss / d s (summed per sequence).
TOKEN_STATS = ("loss", "kl", "ratio", "clipped", "coef", "dseq")


class TokenOperands(NamedTuple):
    """The per-token operands of the token math: flat fp32 [N] each, None where the call has none."""

    adv: torch.Tensor
    """advantage of the token's sequence"""
    old: torch.Tensor | None = None
    """log-prob under the rollout policy (None: on-policy, ratio 1)"""
    ref: torch.Tensor | None = None
    """log-prob under the reference policy (None: no KL term)"""
    isw: torch.Tensor | None = None
    """rollout importance weight multiplying the policy term"""
    weight: torch.Tensor | None = None
    """aggregation weight (`token_weights`)"""
    mask: torch.Tensor | None = None
    """completion mask: which tokens a sequence-level ratio averages over"""
    log_is: torch.Tensor | None = None
    """vespo: the sequence's sum of clamped log rollout importance weights, on each of its tokens"""
    seq: torch.Tensor | None = None
    """the sequence's operand on each of its tokens: the mean log-ratio s (sequence level) or phi (vespo)"""

    def rows(self, r0: int, r1: int) -> TokenOperands:
        """The operands of tokens r0:r1."""
        return TokenOperands(*(None if t is None else t[r0:r1] for t in self))


def kernel_scalars(o: LossOptions) -> dict[str, float]:
    """The runtime scalars of the token kernels: clip bounds (for cispo `hi` is its cap eps_high), KL weight,
    delta (inf: no cap) and the SAPO temperatures."""
    return dict(lo=1.0 - o.eps_low, hi=o.eps_high if o.surrogate == "cispo" else 1.0 + o.eps_high, beta=o.beta,
                delta=math.inf if o.delta is None else float(o.delta), tau_pos=o.sapo_temperature_pos,
                tau_neg=o.sapo_temperature_neg)  # fmt: skip


def kernel_flags(tok: TokenOperands, o: LossOptions) -> dict[str, object]:
    """The constexpr switches; BIAS_CORR only with a KL term (otherwise it changes nothing: one variant less)."""
    has_kl = tok.ref is not None and o.beta != 0.0
    return dict(SURROGATE=o.surrogate, SEQ=o.importance_sampling_level == "sequence", HAS_KL=has_kl,
                HAS_ISW=tok.isw is not None, BIAS_CORR=has_kl and o.bias_correction_kl)  # fmt: skip


@triton.jit
def grpo_token(
    logp, old, ref, adv, isw, seq, lo, hi, beta, delta, tau_pos, tau_neg,
    SURROGATE: tl.constexpr, SEQ: tl.constexpr, HAS_KL: tl.constexpr, HAS_ISW: tl.constexpr, BIAS_CORR: tl.constexpr,
):  # fmt: skip
    """Per-token math on fp32 tensors -> (loss, d loss / d logp, d loss / d s, kl, ratio, clipped as 0/1).

    SEQ: the ratio is exp(seq), seq the sequence's mean log-ratio s, and the policy term's gradient goes to s.
    vespo: seq is the sequence's detached weight phi."""
    if SEQ:
        ratio = tl.exp(seq)
    else:
        ratio = tl.exp(logp - old)
    clipped = tl.zeros_like(logp)
    if SURROGATE == "cispo":
        c = tl.minimum(ratio, hi)
        pg = -c * adv * logp
        dpg = -c * adv
        clipped = ((ratio > hi) & (adv > 0)).to(tl.float32)
    elif SURROGATE == "sapo":
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        pg = -(4.0 / tau) * gate * adv
        dpg = -4.0 * gate * (1.0 - gate) * ratio * adv
    elif SURROGATE == "vespo":
        pg = -seq * adv * logp
        dpg = -seq * adv
    else:
        l1 = tl.minimum(ratio, delta) * adv
        l2 = tl.minimum(tl.maximum(ratio, lo), hi) * adv
        pg = -tl.minimum(l1, l2)
        # d/d log r of the branch torch.min picks (a tie splits the gradient evenly); min(r, delta) and the clamp
        # pass the ratio's gradient inside their bounds, ends included
        g1 = tl.where(ratio <= delta, ratio, 0.0)
        g2 = tl.where((ratio >= lo) & (ratio <= hi), ratio, 0.0)
        dpg = -adv * tl.where(l1 < l2, g1, tl.where(l1 > l2, g2, 0.5 * (g1 + g2)))
        clipped = (((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))).to(tl.float32)
    if HAS_ISW:
        pg = pg * isw
        dpg = dpg * isw
    dseq = tl.zeros_like(logp)
    dlogp = dpg
    if SEQ:
        dseq = dpg
        dlogp = tl.zeros_like(logp)
    kl = tl.zeros_like(logp)
    loss = pg
    if HAS_KL:
        d = ref - logp
        ed = tl.exp(d)
        kl = ed - d - 1.0
        if BIAS_CORR:
            kl = kl * ratio
            if SEQ:
                dlogp += beta * ratio * (1.0 - ed)
                dseq += beta * kl
            else:  # d (r k3) / d logp = r (k3 + 1 - exp(d)) = r (logp - ref)
                dlogp += beta * (-d * ratio)
        else:
            dlogp += beta * (1.0 - ed)
        loss += beta * kl
    return loss, dlogp, dseq, kl, ratio, clipped


# The token count only bounds masks: not specialized on (no recompile per chunk length).
@triton.jit(do_not_specialize=["N"])
def _grpo_token_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, isw_ptr, seq_ptr, wt_ptr, st_ptr,
    N, s_st, lo, hi, beta, delta, tau_pos, tau_neg,
    SURROGATE: tl.constexpr, SEQ: tl.constexpr, HAS_KL: tl.constexpr, HAS_ISW: tl.constexpr, BIAS_CORR: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    m = offs < N
    logp = tl.load(logp_ptr + offs, mask=m, other=0.0)
    old = tl.load(old_ptr + offs, mask=m, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=m, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=m, other=0.0)
    isw = tl.load(isw_ptr + offs, mask=m, other=0.0)
    seq = tl.load(seq_ptr + offs, mask=m, other=0.0)
    w = tl.load(wt_ptr + offs, mask=m, other=0.0)
    loss, dlogp, dseq, kl, ratio, clipped = grpo_token(
        logp, old, ref, adv, isw, seq, lo, hi, beta, delta, tau_pos, tau_neg,
        SURROGATE, SEQ, HAS_KL, HAS_ISW, BIAS_CORR,
    )  # fmt: skip
    tl.store(st_ptr + 0 * s_st + offs, loss, mask=m)
    tl.store(st_ptr + 1 * s_st + offs, kl, mask=m)
    tl.store(st_ptr + 2 * s_st + offs, ratio, mask=m)
    tl.store(st_ptr + 3 * s_st + offs, clipped, mask=m)
    tl.store(st_ptr + 4 * s_st + offs, w * dlogp, mask=m)
    if SEQ:
        tl.store(st_ptr + 5 * s_st + offs, w * dseq, mask=m)


def grpo_token_torch(logp, tok: TokenOperands, o: LossOptions):
    """torch twin of the `grpo_token` Triton helper (no autograd): loss, dlogp, dseq, kl, ratio, clipped."""
    s = kernel_scalars(o)
    lo, hi, beta, delta = s["lo"], s["hi"], s["beta"], s["delta"]
    adv = tok.adv
    sequence = o.importance_sampling_level == "sequence"
    ratio = tok.seq.exp() if sequence else torch.exp(logp - (logp if tok.old is None else tok.old))
    clipped = torch.zeros_like(logp)
    if o.surrogate == "cispo":
        c = ratio.clamp(max=hi)
        pg, dpg = -c * adv * logp, -c * adv
        clipped = ((ratio > hi) & (adv > 0)).float()
    elif o.surrogate == "sapo":
        tau = torch.where(adv > 0, s["tau_pos"], s["tau_neg"])
        gate = torch.sigmoid(tau * (ratio - 1.0))
        pg, dpg = -(4.0 / tau) * gate * adv, -4.0 * gate * (1.0 - gate) * ratio * adv
    elif o.surrogate == "vespo":
        pg, dpg = -tok.seq * adv * logp, -tok.seq * adv
    else:
        l1, l2 = ratio.clamp(max=delta) * adv, ratio.clamp(lo, hi) * adv
        pg = -torch.minimum(l1, l2)
        g1 = torch.where(ratio <= delta, ratio, 0.0)
        g2 = torch.where((ratio >= lo) & (ratio <= hi), ratio, 0.0)
        dpg = -adv * torch.where(l1 < l2, g1, torch.where(l1 > l2, g2, 0.5 * (g1 + g2)))
        clipped = (((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))).float()
    if tok.isw is not None:
        pg, dpg = pg * tok.isw, dpg * tok.isw
    zero = torch.zeros_like(logp)
    dlogp, dseq = (zero, dpg) if sequence else (dpg, zero)
    kl, loss = zero, pg
    if tok.ref is not None and beta != 0.0:
        d = tok.ref - logp
        ed = d.exp()
        kl = ed - d - 1.0
        if o.bias_correction_kl:
            kl = kl * ratio
            if sequence:
                dlogp, dseq = dlogp + beta * ratio * (1.0 - ed), dseq + beta * kl
            else:
                dlogp = dlogp + beta * (-d * ratio)
        else:
            dlogp = dlogp + beta * (1.0 - ed)
        loss = loss + beta * kl
    return loss, dlogp, dseq, kl, ratio, clipped


def sequence_operand(logp, tok: TokenOperands, o: LossOptions, seq_len: int) -> torch.Tensor:
    """[n] fp32: on each token its sequence's s = mean over the masked tokens of logp - logp_old (sequence level),
    or VESPO's detached phi(w) = exp(lam + k log w - lam w), log w = clamp(sum over the masked tokens of
    clamp(logp - logp_old, -20, 20) + the rollout correction's summed log-weights, log 1e-8, 20), with (k, lam)
    of the advantage's sign (>= 0: the _pos pair). logp [n] holds whole sequences of `seq_len` tokens."""
    k = logp.numel() // seq_len
    m = tok.mask.view(k, seq_len)
    lr = torch.zeros_like(m) if tok.old is None else (logp - tok.old).view(k, seq_len)
    live = m != 0  # masked-out tokens never reach the sum, not even as nan * 0
    if o.surrogate == "vespo":
        log_w = torch.where(live, lr.clamp(-20.0, 20.0) * m, 0.0).sum(-1)
        if tok.log_is is not None:
            log_w = log_w + tok.log_is.view(k, seq_len)[:, 0]
        log_w = log_w.clamp(math.log(1e-8), 20.0)
        nonneg = tok.adv.view(k, seq_len)[:, 0] >= 0
        kk = torch.where(nonneg, o.vespo_k_pos, o.vespo_k_neg)
        lam = torch.where(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
        val = torch.exp(lam + kk * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    else:
        val = torch.where(live, lr * m, 0.0).sum(-1) / m.sum(-1).clamp(min=1.0)
    return val[:, None].expand(k, seq_len).contiguous().view(-1)


def spread_sequence_gradient(st: torch.Tensor, mask: torch.Tensor, seq_len: int) -> None:
    """In place on a `TOKEN_STATS` block [6, n] of whole sequences: coef += mask * (sum over the sequence of
    weight * d loss / d s) / (its token count), the gradient through s = mean(logp - logp_old)."""
    k = st.shape[1] // seq_len
    m = mask.view(k, seq_len)
    g = st[TOKEN_STATS.index("dseq")].view(k, seq_len).sum(-1) / m.sum(-1).clamp(min=1.0)
    st[TOKEN_STATS.index("coef")] += (m * g[:, None]).reshape(-1)


def token_stats(logp, tok: TokenOperands, o: LossOptions, seq_len: int, out: torch.Tensor, impl: str) -> None:
    """Fill out [len(TOKEN_STATS), n] for the tokens logp [n] fp32 (whole sequences of `seq_len` tokens when
    `o.needs_whole_sequences`; any run of tokens otherwise) with the Triton kernel (impl "triton") or its twin."""
    if o.needs_whole_sequences:
        tok = tok._replace(seq=sequence_operand(logp, tok, o, seq_len))
    if impl == "triton":
        n, block = logp.numel(), 1024
        flat = [logp if t is None else t for t in (tok.old, tok.ref, tok.adv, tok.isw, tok.seq)]
        launch(
            "grpo_token", _grpo_token_kernel, (triton.cdiv(n, block),),
            logp, *flat, tok.weight, out, n, out.stride(0), **kernel_scalars(o), **kernel_flags(tok, o), BLOCK=block,
        )  # fmt: skip
    else:
        loss, dlogp, dseq, kl, ratio, clipped = grpo_token_torch(logp, tok, o)
        out[:] = torch.stack([loss, kl, ratio, clipped, tok.weight * dlogp, tok.weight * dseq])
    if o.importance_sampling_level == "sequence":
        spread_sequence_gradient(out, tok.mask, seq_len)


def per_token_inputs(logp_old, logp_ref, advantages, is_ratio, mask, o: LossOptions) -> TokenOperands:
    """Flat fp32 [B*T] per-token operands (advantages and is_ratio broadcast over T); None stays None, the
    reference is dropped when beta == 0, and for vespo is_ratio becomes its summed clamped log (`log_is`)."""
    B, T = mask.shape
    flat = lambda t: None if t is None else t.detach().float().expand(B, T).reshape(-1).contiguous()
    isw = None if is_ratio is None else is_ratio.detach().float().reshape(B, -1)
    log_is = None
    if isw is not None and o.surrogate == "vespo":
        log_is, isw = torch.log(isw).clamp(math.log(1e-8), 20.0).sum(-1, keepdim=True), None
    return TokenOperands(adv=flat(advantages.reshape(B, 1)), old=flat(logp_old),
                         ref=flat(logp_ref) if o.beta != 0.0 else None, isw=flat(isw), mask=flat(mask),
                         log_is=flat(log_is))  # fmt: skip


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, tok, o, seq_len):
        st = torch.empty(len(TOKEN_STATS), logp.numel(), device=logp.device, dtype=torch.float32)
        token_stats(logp, tok, o, seq_len, st, "triton")
        ctx.save_for_backward(st[TOKEN_STATS.index("coef")])
        ctx.mark_non_differentiable(st)
        return (st[0] * tok.weight).sum(), st

    @staticmethod
    def backward(ctx, g_loss, _):
        (coef,) = ctx.saved_tensors
        return coef * g_loss, None, None, None


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
    importance_sampling_level: str = "token",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    bias_correction_kl: bool = False,
    max_completion_length: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    is_ratio: torch.Tensor | None = None,
    world_size: int | None = None,
    luspo_reduction: LuspoReduction = "row_sum",
    impl: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family loss from per-token log-probs; differentiable w.r.t. logp only.

    logp, logp_old, logp_ref, mask: [B, T]; advantages: [B]; is_ratio (rollout importance weights): [B, T],
    [B, 1] or [B] | None. The loss options are `loss_types.LossOptions`' (see the module docstring for the math);
    max_completion_length, num_items_in_batch, world_size and luspo_reduction feed the aggregation
    (`token_weights`).
    Returns (fp32 scalar loss, {"kl_mean" (beta != 0), "clip_ratio", "ratio_mean"}: fp32 scalar tensors).
    """
    o = LossOptions(loss_type, importance_sampling_level, eps_low, eps_high, beta, delta, sapo_temperature_pos,
                    sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
                    bool(bias_correction_kl)).checked()  # fmt: skip
    agg = dict(max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
               world_size=world_size, luspo_reduction=luspo_reduction)  # fmt: skip
    if resolve_impl(impl, logp.device) != "triton":
        return grpo_loss_ref(logp, logp_old, logp_ref, advantages, mask, is_ratio=is_ratio, **agg, **o._asdict())
    B, T = logp.shape
    tok = per_token_inputs(logp_old, logp_ref, advantages, is_ratio, mask, o)
    tok = tok._replace(weight=token_weights(mask, loss_type, **agg).reshape(-1).contiguous())
    loss, st = _GRPOLoss.apply(logp.float().reshape(-1).contiguous(), tok, o, T)
    st = {k: st[i].view(B, T) for i, k in enumerate(TOKEN_STATS)}
    return loss, grpo_metrics(mask, st["kl"], st["ratio"], st["clipped"], beta)
