"""lm_head + log-prob + GRPO loss + KL in one pass over each row chunk, gradients produced in the forward.

With token-level ratios, d loss / d logp of a token depends only on that token (its logp, old/ref logps,
advantage, and an aggregation weight known before the pass), so the whole gradient is formed in the
forward and `backward` only scales it by grad_output (the design of Liger's chunked loss, fused further).

Per row chunk (rows bounded so the [rows, V] fp32 buffer fits `chunk_bytes`), Triton path:
  1. `_logits_partials_kernel` (2-D grid of row x vocab tiles): logits tile = hidden @ W^T via `tl.dot`
     (fp32 accumulate), + bias, / T; stored in the buffer; its epilogue writes the tile's partial max,
     sum of exp and entropy term, and the label logit: the online logsumexp split over vocab tiles.
  2. `_grpo_rows_kernel`: merges the partials -> lse, logp, entropy; runs the GRPO token math (shared
     `grpo_token` helper) -> per-token loss, k3, ratio, clipped flag and coef = weight * d loss / d logp.
  3. `_grpo_dz_kernel`: in place, d-logits = coef * (onehot - softmax) / T.
  4. two Triton GEMMs: grad_hidden = dz @ W; grad_weight += dz^T @ hidden (fp32, deterministic);
     grad_bias += column sums of dz.
Three GEMM-sized passes in all (logits, two gradient contractions): the logits are never recomputed.
Work memory: the chunk buffer + an fp32 [V, H] weight-gradient accumulator + [rows, V / BLOCK_V] partials.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rarl_kernels._lm_head import chunk_logits, contract_dlogits, contract_dlogits_torch, logit_tile
from rarl_kernels._utils import (
    chunk_rows,
    dot_flags,
    fit_block,
    kernel_out_dtype,
    launch,
    resolve_impl,
    row_buffer,
    tile_config,
)
from rarl_kernels.aggregation import LOSS_TYPES, grpo_metrics, token_weights
from rarl_kernels.grpo_loss import TokenOperands, TokenParams, grpo_token, grpo_token_torch, per_token_inputs
from rarl_kernels.linear_logprobs import fused_linear_logprobs
from rarl_kernels.reference import fused_linear_grpo_loss_ref, fused_linear_logprobs_ref, grpo_token_loss_ref

# Rows of the per-token output block written by `_grpo_rows_kernel`.
STATS = ("logp", "lse", "entropy", "loss", "kl", "ratio", "clipped", "coef")


class FusedOptions(NamedTuple):
    """The scalar settings of one fused call."""

    token: TokenParams
    """clip bounds, KL weight and bias correction of the token math"""
    temperature: float
    """logits are divided by it before the softmax"""
    entropy: bool
    """compute the policy entropy (the chunked torch path spends a pass on it; the Triton path gets it free)"""


# The row count only bounds masks across rows: not specialized on (no recompile per chunk length).
@triton.jit(do_not_specialize=["N"])
def _logits_partials_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, z_ptr, pm_ptr, ps_ptr, pu_ptr, zl_ptr,
    N, V, H, s_hn, s_hh, s_wv, s_wh, s_zn, s_pn, inv_t,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid_v = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, s_hn, s_hh, s_wv, s_wh, inv_t,
                    HAS_BIAS, DOT_F32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
    rmask = rows < N
    cmask = cols < V
    tl.store(z_ptr + rows[:, None] * s_zn + cols[None, :], z, mask=rmask[:, None] & cmask[None, :])
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    tl.store(pm_ptr + rows * s_pn + pid_v, m, mask=rmask)
    tl.store(ps_ptr + rows * s_pn + pid_v, tl.sum(e, axis=1), mask=rmask)
    u = tl.sum(e * tl.where(cmask[None, :], z - m[:, None], 0.0), axis=1)
    tl.store(pu_ptr + rows * s_pn + pid_v, u, mask=rmask)
    labels = tl.load(y_ptr + rows, mask=rmask, other=-1)
    in_tile = (labels >= pid_v * BLOCK_V) & (labels < pid_v * BLOCK_V + BLOCK_V) & (labels < V)
    z_label = tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
    tl.store(zl_ptr + rows, z_label, mask=rmask & in_tile)


# Row count and vocabulary size only bound masks and label checks here: not specialized on.
@triton.jit(do_not_specialize=["N", "V"])
def _grpo_rows_kernel(
    pm_ptr, ps_ptr, pu_ptr, zl_ptr, y_ptr, old_ptr, ref_ptr, adv_ptr, isw_ptr, wt_ptr, st_ptr,
    N, V, NVB, s_pn, s_st, lo, hi, beta,
    HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, HAS_ISW: tl.constexpr, BIAS_CORR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    M = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
    S = tl.zeros((BLOCK_N,), dtype=tl.float32)
    U = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, NVB, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        offs = rows[:, None] * s_pn + ps[None, :]
        pmask = rmask[:, None] & (ps[None, :] < NVB)
        m_p = tl.load(pm_ptr + offs, mask=pmask, other=-1e30)
        s_p = tl.load(ps_ptr + offs, mask=pmask, other=0.0)
        u_p = tl.load(pu_ptr + offs, mask=pmask, other=0.0)
        M_new = tl.maximum(M, tl.max(m_p, axis=1))
        alpha = tl.exp(M - M_new)
        sc = tl.exp(m_p - M_new[:, None])
        U = alpha * (U + (M - M_new) * S) + tl.sum(sc * (u_p + (m_p - M_new[:, None]) * s_p), axis=1)
        S = alpha * S + tl.sum(sc * s_p, axis=1)
        M = M_new
    S = tl.where(rmask, S, 1.0)  # rows past the end: keep log() finite
    log_s = tl.log(S)
    lse = M + log_s
    labels = tl.load(y_ptr + rows, mask=rmask, other=-1)
    valid = (labels >= 0) & (labels < V)
    # (z - M) - log S, not z - lse: exact for the top tokens however large |logits| is
    logp = tl.where(valid, (tl.load(zl_ptr + rows, mask=rmask, other=0.0) - M) - log_s, 0.0)
    old = logp
    if HAS_OLD:
        old = tl.load(old_ptr + rows, mask=rmask, other=0.0)
    ref = logp
    if HAS_KL:
        ref = tl.load(ref_ptr + rows, mask=rmask, other=0.0)
    isw = logp
    if HAS_ISW:
        isw = tl.load(isw_ptr + rows, mask=rmask, other=0.0)
    adv = tl.load(adv_ptr + rows, mask=rmask, other=0.0)
    loss, dlogp, kl, ratio, clipped = grpo_token(logp, old, ref, adv, isw, lo, hi, beta, HAS_KL, HAS_ISW, BIAS_CORR)
    coef = tl.where(valid, tl.load(wt_ptr + rows, mask=rmask, other=0.0) * dlogp, 0.0)
    tl.store(st_ptr + 0 * s_st + rows, logp, mask=rmask)
    tl.store(st_ptr + 1 * s_st + rows, lse, mask=rmask)
    tl.store(st_ptr + 2 * s_st + rows, log_s - U / S, mask=rmask)
    tl.store(st_ptr + 3 * s_st + rows, loss, mask=rmask)
    tl.store(st_ptr + 4 * s_st + rows, kl, mask=rmask)
    tl.store(st_ptr + 5 * s_st + rows, ratio, mask=rmask)
    tl.store(st_ptr + 6 * s_st + rows, clipped, mask=rmask)
    tl.store(st_ptr + 7 * s_st + rows, coef, mask=rmask)


# The row count only bounds masks across rows: not specialized on (no recompile per chunk length).
@triton.jit(do_not_specialize=["N"])
def _grpo_dz_kernel(z_ptr, y_ptr, lse_ptr, coef_ptr, N, V, s_zn, inv_t, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    mask = rmask[:, None] & (cols[None, :] < V)
    ptrs = z_ptr + rows[:, None] * s_zn + cols[None, :]
    z = tl.load(ptrs, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
    labels = tl.load(y_ptr + rows, mask=rmask, other=-1)
    dz = tl.where(cols[None, :] == labels[:, None], coef[:, None], 0.0) - coef[:, None] * tl.exp(z - lse[:, None])
    tl.store(ptrs, dz * inv_t, mask=mask)


def fused_grpo_chunks_triton(hidden, weight, bias, labels, tok: TokenOperands, needs, opts: FusedOptions, chunk_bytes):
    """hidden [N,H], weight [V,H], labels [N]; tok: the per-token operands, `weight` included; needs: which of
    (hidden, weight, bias) get a gradient. Returns stats [len(STATS), N] fp32 and (grad_h, grad_w, grad_b).
    The entropy comes free from the partials here, so it is always computed."""
    p = opts.token
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cfg = tile_config(dev, hidden.dtype)
    bn, bv = fit_block(cfg["BLOCK_N"], N, cfg["MIN_M"]), cfg["BLOCK_V"]
    rows = chunk_rows(N, V, chunk_bytes, multiple=bn, device=dev)
    nvb = triton.cdiv(V, bv)
    z = row_buffer(rows, V, device=dev, dtype=torch.float32)
    part = torch.empty(3, rows, nvb, device=dev, dtype=torch.float32)
    z_label = torch.zeros(N, device=dev, dtype=torch.float32)
    stats = torch.empty(len(STATS), N, device=dev, dtype=torch.float32)
    gh = torch.empty(N, H, device=dev, dtype=kernel_out_dtype(hidden.dtype)) if needs[0] else None
    gw = torch.empty(V, H, device=dev, dtype=torch.float32) if needs[1] else None
    gb = torch.zeros(V, device=dev, dtype=torch.float32) if needs[2] else None
    inv_t = 1.0 / opts.temperature
    has_kl = tok.ref is not None and p.beta != 0.0  # BIAS_CORR only with it: one compiled variant less
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        n, h_c, z_c, st = r1 - r0, hidden[r0:r1], z[: r1 - r0], stats[:, r0:r1]
        # absent operands alias z_label (never read: their constexpr flag is off)
        t = TokenOperands(*(z_label[r0:r1] if x is None else x for x in tok.rows(r0, r1)))
        launch(
            "grpo_logits_partials", _logits_partials_kernel, (triton.cdiv(n, bn), nvb),
            h_c, weight, bias if bias is not None else h_c, labels[r0:r1], z_c, part[0], part[1], part[2],
            z_label[r0:r1], n, V, H, *h_c.stride(), *weight.stride(), z_c.stride(0), part.stride(1), inv_t,
            HAS_BIAS=bias is not None, **dot_flags(hidden.dtype),
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
        launch(
            "grpo_rows", _grpo_rows_kernel, (triton.cdiv(n, cfg["BLOCK_R"]),),
            part[0], part[1], part[2], z_label[r0:r1], labels[r0:r1], t.old, t.ref, t.adv, t.isw, t.weight, st,
            n, V, nvb, part.stride(1), st.stride(0), p.lo, p.hi, p.beta,
            HAS_OLD=tok.old is not None, HAS_KL=has_kl, HAS_ISW=tok.isw is not None, BIAS_CORR=has_kl and p.bias_corr,
            BLOCK_N=cfg["BLOCK_R"], BLOCK_P=cfg["BLOCK_P"], num_warps=cfg["rows_warps"],
        )  # fmt: skip
        if not any(needs):
            continue
        launch(
            "grpo_dz", _grpo_dz_kernel, (triton.cdiv(n, bn), nvb),
            z_c, labels[r0:r1], st[STATS.index("lse")], st[STATS.index("coef")], n, V, z_c.stride(0), inv_t,
            BLOCK_N=bn, BLOCK_V=bv, num_warps=cfg["num_warps"],
        )  # fmt: skip
        contract_dlogits(z_c, h_c, weight, gh[r0:r1] if gh is not None else None, gw, gb, accumulate=r0 > 0)
    return stats, _cast_grads(gh, gw, gb, hidden, weight, bias)


def _cast_grads(gh, gw, gb, hidden, weight, bias):
    return (
        gh.to(hidden.dtype) if gh is not None else None,
        gw.to(weight.dtype) if gw is not None else None,
        gb.to(bias.dtype) if gb is not None else None,
    )


def fused_grpo_chunks_torch(hidden, weight, bias, labels, tok: TokenOperands, needs, opts: FusedOptions, chunk_bytes):
    """Plain-torch twin of `fused_grpo_chunks_triton` (same outputs; entropy only if opts.entropy, it
    costs two passes over each chunk), memory O(rows * V)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    rows = chunk_rows(N, V, chunk_bytes, device=dev)
    stats = torch.empty(len(STATS), N, device=dev, dtype=torch.float32)
    gh = torch.empty_like(hidden) if needs[0] else None
    gw = torch.zeros(V, H, device=dev, dtype=torch.float32) if needs[1] else None
    gb = torch.zeros(V, device=dev, dtype=torch.float32) if needs[2] else None
    inv_t = 1.0 / opts.temperature
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h_c, y = hidden[r0:r1], labels[r0:r1]
        part = tok.rows(r0, r1)
        z = chunk_logits(h_c, weight, bias, inv_t)
        m = z.amax(-1)
        z.sub_(m[:, None])  # z - m, then log p = (z - m) - log-sum: exact for the top tokens (see linear_logprobs)
        log_sum = torch.logsumexp(z, dim=-1)
        lse = m + log_sum
        valid = (y >= 0) & (y < V)
        logp = torch.where(valid, z.gather(1, y.clamp(0, V - 1)[:, None]).squeeze(1) - log_sum, 0.0)
        loss, dlogp, kl, ratio, clipped = grpo_token_torch(logp, part, opts.token)
        coef = torch.where(valid, part.weight * dlogp, 0.0)
        logprobs = z.sub_(log_sum[:, None])
        if opts.entropy:
            p = logprobs.exp()
            entropy = -torch.mul(p, logprobs, out=logprobs).sum(-1)
        else:
            p, entropy = logprobs.exp_(), torch.zeros_like(lse)
        stats[:, r0:r1] = torch.stack([logp, lse, entropy, loss, kl, ratio, clipped, coef])
        if any(needs):
            dz = p.mul_(-coef[:, None]).scatter_add_(1, y.clamp(0, V - 1)[:, None], coef[:, None]).mul_(inv_t)
            contract_dlogits_torch(dz, h_c, weight, gh[r0:r1] if gh is not None else None, gw, gb)
    return stats, (gh, *_cast_grads(None, gw, gb, hidden, weight, bias)[1:])


class _FusedLinearGRPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tok, needs, opts, impl, chunk_bytes):
        run = fused_grpo_chunks_triton if impl == "triton" else fused_grpo_chunks_torch
        stats, grads = run(hidden, weight, bias, labels, tok, needs, opts, chunk_bytes)
        loss = (stats[STATS.index("loss")] * tok.weight).sum()
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _):
        scaled = [None if t is None else t * g_loss.to(t.dtype) for t in ctx.saved_tensors]
        return scaled[0], scaled[1], scaled[2], *([None] * 6)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logp_old: torch.Tensor | None = None,
    logp_ref: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    is_ratio: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.04,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    world_size: int | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = True,
    bias_correction_kl: bool = False,
    impl: str | None = None,
    chunk_bytes: int | None = None,
    return_per_token: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """GRPO loss straight from the policy's last hidden states, never holding the [B*T, V] logits.

    hidden [B, T, H]; weight [V, H]; labels, mask [B, T]; advantages [B]; bias [V] | None; logp_old,
    logp_ref [B, T] | None (logp_ref None with ref_hidden [B, T, H] + ref_weight [V, H] (+ ref_bias):
    computed here without gradient); is_ratio [B, T] | [B, 1] | [B] | None multiplies the clipped term;
    bias_correction_kl multiplies the KL term by the ratio (Liger's use_bias_correction_kl; see `grpo_loss`).
    Loss semantics and metrics: `grpo_loss`, plus "entropy_mean" (of the policy at temperature T) when
    compute_entropy. Differentiable w.r.t. hidden, weight and bias; the gradients are computed during the
    forward (see the module docstring). With return_per_token, a third output holds the per-token values of
    the pass, [B, T] fp32 without gradient: "logp", "kl", "ratio", "clipped" and "entropy" (when
    compute_entropy), for a trainer that logs statistics of its own.
    """
    if loss_type not in LOSS_TYPES:
        raise NotImplementedError(f"loss_type={loss_type!r} is not supported (supported: {LOSS_TYPES})")
    impl = resolve_impl(impl, hidden.device)
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta=beta, loss_type=loss_type, world_size=world_size,
              max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
              bias_correction_kl=bias_correction_kl)  # fmt: skip
    if logp_ref is None and ref_hidden is not None and beta != 0.0:
        with torch.no_grad():
            logp_ref = fused_linear_logprobs(ref_hidden, ref_weight, labels, temperature=temperature, bias=ref_bias,
                                             impl=impl, chunk_bytes=chunk_bytes)  # fmt: skip
    if impl == "torch":
        out = fused_linear_grpo_loss_ref(
            hidden, weight, labels, mask, advantages, bias=bias, logp_old=logp_old, logp_ref=logp_ref,
            is_ratio=is_ratio, temperature=temperature, compute_entropy=compute_entropy, **kw,
        )  # fmt: skip
        if not return_per_token:
            return out
        return *out, _per_token_ref(hidden, weight, labels, bias, logp_old, logp_ref, advantages, is_ratio,
                                    temperature, compute_entropy, kw)  # fmt: skip
    B, T, H = hidden.shape
    h2 = hidden.reshape(B * T, H)
    w = weight if weight.dtype == h2.dtype else weight.to(h2.dtype)
    tok_w = token_weights(mask, loss_type, max_completion_length=max_completion_length,
                          num_items_in_batch=num_items_in_batch, world_size=world_size)  # fmt: skip
    tok = per_token_inputs(logp_old, logp_ref, advantages, is_ratio, (B, T), beta)
    tok = tok._replace(weight=tok_w.reshape(-1).contiguous())
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)  # fmt: skip
    y = labels.reshape(-1).long().contiguous()
    token = TokenParams(lo=1 - eps_low, hi=1 + eps_high, beta=beta, bias_corr=bool(bias_correction_kl))
    opts = FusedOptions(token, temperature=float(temperature), entropy=compute_entropy)
    loss, stats = _FusedLinearGRPO.apply(h2, w, bias, y, tok, needs, opts, impl, chunk_bytes)
    st = {k: stats[i].view(B, T) for i, k in enumerate(STATS)}
    entropy = st["entropy"] if compute_entropy else None
    metrics = grpo_metrics(mask, st["kl"], st["ratio"], st["clipped"], beta, entropy)
    if not return_per_token:
        return loss, metrics
    per_token = {k: st[k] for k in ("logp", "kl", "ratio", "clipped")}
    return loss, metrics, per_token | ({"entropy": entropy} if compute_entropy else {})


def _per_token_ref(hidden, weight, labels, bias, logp_old, logp_ref, advantages, is_ratio, temperature, entropy, kw):
    """`return_per_token`'s values on the reference path (a second materializing pass, without gradient)."""
    with torch.no_grad():
        logp, ent = fused_linear_logprobs_ref(hidden, weight, labels, temperature=temperature, bias=bias,
                                              return_entropy=True)  # fmt: skip
        if is_ratio is not None:
            is_ratio = is_ratio.reshape(is_ratio.shape[0], -1)
        _, kl, ratio, clipped = grpo_token_loss_ref(
            logp, logp_old, logp_ref, advantages, eps_low=kw["eps_low"], eps_high=kw["eps_high"], beta=kw["beta"],
            is_ratio=is_ratio, bias_correction_kl=kw["bias_correction_kl"],
        )  # fmt: skip
    out = {"logp": logp, "kl": kl, "ratio": ratio, "clipped": clipped}
    return out | ({"entropy": ent} if entropy else {})
