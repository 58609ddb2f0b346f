"""Fused lm_head + log-softmax + label gather (+ entropy and other per-row statistics), never holding the [N, V]
logits.

Logits: z = scale * y / T for y = hidden @ weight^T + bias, or, with a soft cap c, z = c * tanh(scale * y / c) / T
(Gemma-style capping; `LogitForm`). Every statistic below is of the distribution softmax(z).

Forward (Triton): one program per BLOCK_N rows streams the vocabulary in BLOCK_V tiles; each tile's logits
come from a K-loop of `tl.dot` over H (fp32 accumulate), are formed as above, and fold into a running
max / sum-of-exp (online logsumexp), the label logit, and a running sum of p*(z - max) for the entropy. On request
(constexpr flags, so the plain variant is unchanged) the same pass also folds sum of exp(2(z - max)) (for
log sum p^2), sum of z (the mean logit) and the largest logit before the label's column (whether the label is
the first argmax). Saved for backward: the row max m, log(sum exp(z - m)) and the entropy in fp32, [N] each.
Keeping m and the log-sum apart (not their sum, the logsumexp) lets log p = (z - m) - log-sum stay exact for the
top tokens when |logits| is large: z - lse would round to the spacing of fp32 numbers near lse (1e-3 at
|lse| ~ 1e4).

Backward (Triton): for row chunks bounded by a byte budget, a 2-D grid recomputes each logit tile and writes
d-logits = (g * (onehot - p) - g_ent * p * (log p + H)) * dz/dy into a [chunk, V] buffer (dz/dy = scale / T, times
1 - tanh^2 under a soft cap); two Triton GEMMs then contract it, grad_hidden = dz @ W and grad_weight += dz^T @
hidden (fp32 accumulator, one owner per output tile: deterministic, no atomics); grad_bias = column sums of dz.
Only the log-probs and the entropy carry gradients; the other statistics are not differentiable.

Labels outside [0, V) (e.g. -100) are ignored: logp = 0 there, no gradient flows from it, and the label is not
the argmax (the entropy and the other statistics of such rows are still computed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
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
from rarl_kernels.reference import fused_linear_logprob_stats_ref, fused_linear_logprobs_ref

# Per-row statistics beyond the log-probs, each computed only when asked for (`fused_linear_logprob_stats`).
STATISTICS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")


class LogitForm(NamedTuple):
    """How the logits z are formed from y = hidden @ weight^T + bias."""

    temperature: float = 1.0
    """z is divided by it"""
    softcap: float | None = None
    """c in z = c * tanh(scale * y / c) / T; None: no cap, z = scale * y / T"""
    scale: float = 1.0
    """multiplies y before the cap (a model's logit scale / multiplier)"""

    @property
    def pre(self) -> float:
        """Factor applied to y inside the logit tile: everything when there is no cap, the scale under one."""
        return self.scale if self.softcap is not None else self.scale / self.temperature

    @property
    def post(self) -> float:
        """Factor applied after the cap (1 without one)."""
        return 1.0 / self.temperature if self.softcap is not None else 1.0


class LogprobStats(NamedTuple):
    """Per-row outputs of `fused_linear_logprob_stats`: fp32 [N] each (is_argmax bool); None when not asked for."""

    logp: torch.Tensor
    """log softmax(z)[label]; 0 for ignored labels; differentiable"""
    entropy: torch.Tensor | None = None
    """-sum p log p; differentiable"""
    log_sum_sq_probs: torch.Tensor | None = None
    """log sum p^2 (the log collision probability); no gradient"""
    mean_logit: torch.Tensor | None = None
    """mean of z over the vocabulary; no gradient"""
    is_argmax: torch.Tensor | None = None
    """the label is the first index of max z; no gradient"""


@triton.jit
def _capped(y, cols, V, softcap, post, HAS_SOFTCAP: tl.constexpr):
    """The logits from a tile of pre-scaled y (see `LogitForm`): c * tanh(y / c) * post under a cap; columns >= V
    stay -inf. tanh(x) is written 2 * sigmoid(2x) - 1 (the interpreter and every backend have sigmoid)."""
    if HAS_SOFTCAP:
        y = softcap * (2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0) * post
        y = tl.where(cols[None, :] < V, y, float("-inf"))
    return y


# The row count only bounds masks across rows: not specialized on (no recompile per chunk length).
@triton.jit(do_not_specialize=["N"])
def _linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, logp_ptr, m_ptr, ls_ptr, ent_ptr, sq_ptr, zs_ptr, top_ptr,
    N, V, H, s_hn, s_hh, s_wv, s_wh, inv_t, softcap, post,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SQ: tl.constexpr, HAS_MEAN: tl.constexpr,
    HAS_TOP: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    labels = tl.load(y_ptr + rows, mask=rows < N, other=-1)
    # A finite start for the running max keeps (m_old - m_new) * s = 0 (not nan) on the first tile.
    m = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m), for the entropy
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(2 (z - m))
    zs = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum z
    before = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # max z over the columns before the label
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, s_hn, s_hh, s_wv, s_wh, inv_t,
                        HAS_BIAS, DOT_F32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
        z = _capped(z, cols, V, softcap, post, HAS_SOFTCAP)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        d = tl.where(cols[None, :] < V, z - m_new[:, None], 0.0)
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        if HAS_SQ:
            sq = alpha * alpha * sq + tl.sum(e * e, axis=1)
        if HAS_MEAN:
            zs += tl.sum(tl.where(cols[None, :] < V, z, 0.0), axis=1)
        if HAS_TOP:
            before = tl.maximum(before, tl.max(tl.where(cols[None, :] < labels[:, None], z, float("-inf")), axis=1))
        m = m_new
        z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
    ls = tl.log(s)
    valid = (labels >= 0) & (labels < V)
    rmask = rows < N
    tl.store(logp_ptr + rows, tl.where(valid, (z_label - m) - ls, 0.0), mask=rmask)
    tl.store(m_ptr + rows, m, mask=rmask)
    tl.store(ls_ptr + rows, ls, mask=rmask)
    tl.store(ent_ptr + rows, ls - u / s, mask=rmask)
    if HAS_SQ:
        tl.store(sq_ptr + rows, tl.log(sq) - 2.0 * ls, mask=rmask)
    if HAS_MEAN:
        tl.store(zs_ptr + rows, zs / V, mask=rmask)
    if HAS_TOP:
        # the first maximum: a tie with an earlier column is not the label's
        top = valid & (z_label >= m) & (z_label > before)
        tl.store(top_ptr + rows, top.to(tl.float32), mask=rmask)


# The row count only bounds masks across rows: not specialized on (no recompile per chunk length).
@triton.jit(do_not_specialize=["N"])
def _linear_logprobs_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, m_ptr, ls_ptr, ent_ptr, g_ptr, ge_ptr, dz_ptr,
    N, V, H, s_hn, s_hh, s_wv, s_wh, s_dn, inv_t, softcap, post,
    HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # Row blocks vary fastest, so the programs in flight share one weight tile in L2.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, s_hn, s_hh, s_wv, s_wh, inv_t,
                    HAS_BIAS, DOT_F32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
    dzdy = inv_t
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0
        dzdy = (1.0 - t * t) * (inv_t * post)
        z = tl.where(cols[None, :] < V, softcap * t * post, float("-inf"))
    rmask = rows < N
    labels = tl.load(y_ptr + rows, mask=rmask, other=-1)
    m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
    ls = tl.load(ls_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    g = tl.where((labels >= 0) & (labels < V), g, 0.0)
    logp = (z - m[:, None]) - ls[:, None]
    p = tl.exp(logp)
    dz = tl.where(cols[None, :] == labels[:, None], g[:, None], 0.0) - g[:, None] * p
    if HAS_GENT:
        ge = tl.load(ge_ptr + rows, mask=rmask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
        dz -= ge[:, None] * p * tl.where(cols[None, :] < V, logp + ent[:, None], 0.0)
    tl.store(dz_ptr + rows[:, None] * s_dn + cols[None, :], (dz * dzdy).to(dz_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cols[None, :] < V))  # fmt: skip


def _common_args(hidden: torch.Tensor, weight: torch.Tensor) -> tuple:
    return (hidden.shape[0], weight.shape[0], hidden.shape[1], *hidden.stride(), *weight.stride())


def _form_args(form: LogitForm) -> tuple:
    """inv_t, softcap, post: the kernels' scalar logit arguments (softcap 1.0 when unused: never read)."""
    return form.pre, form.softcap if form.softcap is not None else 1.0, form.post


def linear_logprobs_fwd_triton(hidden, weight, labels, bias, form: LogitForm, stats=frozenset(("entropy",))):
    """hidden [N,H], weight [V,H], labels [N] int64, bias [V]|None -> logp, row max, log-sum (logsumexp minus the
    row max), entropy, and a dict of the other `stats` asked for: [N] fp32 each (is_argmax 0/1)."""
    N = hidden.shape[0]
    cfg = tile_config(hidden.device, hidden.dtype)
    cfg["BLOCK_N"] = fit_block(cfg["BLOCK_N"], N, cfg["MIN_M"])
    logp, row_max, log_sum, ent = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(4))
    extra = {k: torch.empty(N, device=hidden.device, dtype=torch.float32) for k in STATISTICS[1:] if k in stats}
    launch(
        "linear_logprobs_fwd", _linear_logprobs_fwd_kernel, (triton.cdiv(N, cfg["BLOCK_N"]),),
        hidden, weight, bias if bias is not None else hidden, labels, logp, row_max, log_sum, ent,
        *(extra.get(k, logp) for k in STATISTICS[1:]),  # absent ones alias logp: their flag is off
        *_common_args(hidden, weight), *_form_args(form),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=form.softcap is not None, HAS_SQ="log_sum_sq_probs" in extra,
        HAS_MEAN="mean_logit" in extra, HAS_TOP="is_argmax" in extra, **dot_flags(hidden.dtype),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )  # fmt: skip
    return logp, row_max, log_sum, ent, extra


def linear_logprobs_bwd_triton(hidden, weight, labels, bias, form: LogitForm, row_max, log_sum, ent, g_logp, g_ent,
                               needs, chunk_bytes):  # fmt: skip
    """Gradients (hidden, weight, bias) of sum(g_logp*logp + g_ent*entropy); `needs` = which of the three."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = tile_config(hidden.device, hidden.dtype)
    cfg["BLOCK_N"] = fit_block(cfg["BLOCK_N"], N, cfg["MIN_M"])
    rows = chunk_rows(N, V, chunk_bytes, multiple=cfg["BLOCK_N"], device=hidden.device)
    dz = row_buffer(rows, V, device=hidden.device, dtype=kernel_out_dtype(hidden.dtype))
    gh = torch.empty(N, H, device=hidden.device, dtype=kernel_out_dtype(hidden.dtype)) if needs[0] else None
    gw = torch.empty(V, H, device=hidden.device, dtype=torch.float32) if needs[1] else None
    gb = torch.zeros(V, device=hidden.device, dtype=torch.float32) if needs[2] else None
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h_c, dz_c = hidden[r0:r1], dz[: r1 - r0]
        launch(
            "linear_logprobs_dlogits", _linear_logprobs_dlogits_kernel,
            (triton.cdiv(r1 - r0, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"])),
            h_c, weight, bias if bias is not None else h_c, labels[r0:r1], row_max[r0:r1], log_sum[r0:r1], ent[r0:r1],
            g_logp[r0:r1], g_ent[r0:r1] if g_ent is not None else g_logp[r0:r1], dz_c,
            *_common_args(h_c, weight), dz_c.stride(0), *_form_args(form),
            HAS_BIAS=bias is not None, HAS_GENT=g_ent is not None, HAS_SOFTCAP=form.softcap is not None,
            **dot_flags(hidden.dtype),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )  # fmt: skip
        contract_dlogits(dz_c, h_c, weight, gh[r0:r1] if gh is not None else None, gw, gb, accumulate=r0 > 0)
    return (
        gh.to(hidden.dtype) if gh is not None else None,
        gw.to(weight.dtype) if gw is not None else None,
        gb.to(bias.dtype) if gb is not None else None,
    )


def formed_logits(h_c, weight, bias, form: LogitForm, *, keep_tanh: bool = False):
    """[c, V] fp32 logits z of one row chunk; with `keep_tanh`, also tanh(scale * y / c) under a soft cap (None
    without one), which the backward's chain rule needs."""
    z = chunk_logits(h_c, weight, bias, form.pre)
    if form.softcap is None:
        return (z, None) if keep_tanh else z
    t = z.div_(form.softcap).tanh_()
    if keep_tanh:
        return t * (form.softcap * form.post), t
    return t.mul_(form.softcap * form.post)


def linear_logprobs_fwd_chunked(hidden, weight, labels, bias, form: LogitForm, chunk_bytes=None,
                                stats=frozenset(("entropy",))):  # fmt: skip
    """Plain-torch chunked forward: O(chunk * V) memory. Same outputs as `linear_logprobs_fwd_triton` (the
    entropy is zeros unless asked for: it costs one more pass over each chunk here, as does each other statistic)."""
    N, V = hidden.shape[0], weight.shape[0]
    logp, row_max, log_sum, ent = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(4))
    extra = {k: torch.empty(N, device=hidden.device, dtype=torch.float32) for k in STATISTICS[1:] if k in stats}
    rows = chunk_rows(N, V, chunk_bytes, device=hidden.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = formed_logits(hidden[r0:r1], weight, bias, form)
        y = labels[r0:r1]
        valid = (y >= 0) & (y < V)
        if "mean_logit" in extra:
            extra["mean_logit"][r0:r1] = z.sum(-1) / V
        if "is_argmax" in extra:
            extra["is_argmax"][r0:r1] = (valid & (z.argmax(-1) == y)).float()  # argmax: the first maximum
        m = z.amax(-1)
        z.sub_(m[:, None])  # z - m: exact near the top, where the probability mass is
        e = z.exp()
        s = e.sum(-1)
        ls = s.log()
        z_label = z.gather(1, y.clamp(0, V - 1)[:, None]).squeeze(1)
        logp[r0:r1] = torch.where(valid, z_label - ls, 0.0)
        row_max[r0:r1], log_sum[r0:r1] = m, ls
        if "log_sum_sq_probs" in extra:
            extra["log_sum_sq_probs"][r0:r1] = torch.linalg.vector_norm(e, dim=-1).log_().mul_(2) - 2 * ls
        ent[r0:r1] = ls - e.mul_(z).sum(-1) / s if "entropy" in stats else 0.0
    return logp, row_max, log_sum, ent, extra


def dlogits_chunk_torch(z, labels, g, inv_t, row_max, log_sum, ent=None, g_ent=None) -> torch.Tensor:
    """In place on the [c, V] fp32 logits z: returns d(sum g*logp + g_ent*H)/d(z) * inv_t."""
    V = z.shape[1]
    valid = (labels >= 0) & (labels < V)
    g = torch.where(valid, g, 0.0)
    z.sub_(row_max[:, None]).sub_(log_sum[:, None])  # log p, in this order (see the module docstring)
    if g_ent is not None:
        dz = z.add(ent[:, None]).mul_(z.exp()).mul_(-g_ent[:, None])
        dz.addcmul_(z.exp_(), g[:, None], value=-1.0)
    else:
        dz = z.exp_().mul_(-g[:, None])
    dz.scatter_add_(1, labels.clamp(0, V - 1)[:, None], g[:, None])
    return dz.mul_(inv_t)


def linear_logprobs_bwd_chunked(hidden, weight, labels, bias, form: LogitForm, row_max, log_sum, ent, g_logp, g_ent,
                                needs, chunk_bytes):  # fmt: skip
    """Plain-torch chunked backward: recompute each chunk's logits, form d-logits, contract."""
    N, H = hidden.shape
    V = weight.shape[0]
    gh = torch.empty_like(hidden) if needs[0] else None
    gw = torch.zeros(V, H, device=hidden.device, dtype=torch.float32) if needs[1] else None
    gb = torch.zeros(V, device=hidden.device, dtype=torch.float32) if needs[2] else None
    rows = chunk_rows(N, V, chunk_bytes, device=hidden.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h_c = hidden[r0:r1]
        z, t = formed_logits(h_c, weight, bias, form, keep_tanh=True)
        g_ent_c = g_ent[r0:r1] if g_ent is not None else None
        dz = dlogits_chunk_torch(z, labels[r0:r1], g_logp[r0:r1], form.pre * form.post, row_max[r0:r1],
                                 log_sum[r0:r1], ent[r0:r1], g_ent_c)  # fmt: skip
        if t is not None:
            dz.mul_(t.mul_(t).neg_().add_(1.0))  # d tanh = 1 - tanh^2
        contract_dlogits_torch(dz, h_c, weight, gh[r0:r1] if gh is not None else None, gw, gb)
    return (
        gh,
        gw.to(weight.dtype) if gw is not None else None,
        gb.to(bias.dtype) if gb is not None else None,
    )


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, form, impl, chunk_bytes, stats, backward_context):
        # An output that feeds no loss (the entropy logged, not trained on) gets no gradient: no zeros are made
        # for it and its backward term is skipped.
        ctx.set_materialize_grads(False)
        if impl == "triton":
            logp, row_max, log_sum, ent, extra = linear_logprobs_fwd_triton(hidden, weight, labels, bias, form, stats)
        else:
            logp, row_max, log_sum, ent, extra = linear_logprobs_fwd_chunked(
                hidden, weight, labels, bias, form, chunk_bytes, stats
            )
        ctx.save_for_backward(hidden, weight, labels, bias, row_max, log_sum, ent)
        ctx.form, ctx.impl, ctx.chunk_bytes, ctx.backward_context = form, impl, chunk_bytes, backward_context
        ctx.entropy = "entropy" in stats
        if "is_argmax" in extra:
            extra["is_argmax"] = extra["is_argmax"] != 0
        ctx.mark_non_differentiable(*extra.values())
        return logp, ent, *(extra.get(k) for k in STATISTICS[1:])

    @staticmethod
    def backward(ctx, g_logp, g_ent, *_):
        hidden, weight, labels, bias, row_max, log_sum, ent = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        g_ent = None if g_ent is None or not ctx.entropy else g_ent.float().contiguous()
        if g_logp is None and g_ent is None:
            return (None,) * 9
        bwd = linear_logprobs_bwd_triton if ctx.impl == "triton" else linear_logprobs_bwd_chunked
        g_logp = torch.zeros_like(log_sum) if g_logp is None else g_logp.float().contiguous()
        around = ctx.backward_context() if ctx.backward_context is not None else contextlib.nullcontext()
        with around:
            gh, gw, gb = bwd(hidden, weight, labels, bias, ctx.form, row_max, log_sum, ent, g_logp, g_ent, needs,
                             ctx.chunk_bytes)  # fmt: skip
        return gh, gw, None, gb, *([None] * 5)


def fused_linear_logprob_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    stats: tuple[str, ...] = ("entropy",),
    impl: str | None = None,
    chunk_bytes: int | None = None,
    backward_context: Callable[[], AbstractContextManager] | None = None,
) -> LogprobStats:
    """Log-probs of the labels and the per-row statistics in `stats` (any of `STATISTICS`), in one fused pass.

    hidden [N, H] (or [..., H]); weight [V, H]; labels [N] (or [...]) int, outside [0, V) means ignored (logp 0,
    not the argmax); bias [V] | None. The logits are z = logit_scale * y / temperature for y = hidden @ weight^T +
    bias, or softcap * tanh(logit_scale * y / softcap) / temperature with a soft cap. Returns `LogprobStats`, each
    field shaped like labels (None when not in `stats`): logp and entropy differentiable w.r.t. hidden, weight and
    bias, the others not. impl: "triton" | "chunked" | "torch" | None (see `fused_linear_logprobs`); chunk_bytes
    bounds the [rows, V] fp32 working buffer; backward_context, when given, is called and entered around the
    backward (e.g. to gather a sharded lm_head again).
    """
    unknown = sorted(set(stats) - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown} (known: {STATISTICS})")
    impl = resolve_impl(impl, hidden.device)
    form = LogitForm(float(temperature), None if softcap is None else float(softcap), float(logit_scale))
    if impl == "torch":
        out = fused_linear_logprob_stats_ref(hidden, weight, labels, bias=bias, temperature=form.temperature,
                                             softcap=form.softcap, logit_scale=form.scale)  # fmt: skip
        return LogprobStats(*(v if i == 0 or STATISTICS[i - 1] in stats else None for i, v in enumerate(out)))
    shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    w = weight if weight.dtype == h2.dtype else weight.to(h2.dtype)
    y = labels.reshape(-1).long().contiguous()
    out = _LinearLogprobs.apply(h2, w, y, bias, form, impl, chunk_bytes, frozenset(stats), backward_context)
    keep = (True, *(k in stats for k in STATISTICS))
    return LogprobStats(*(v.view(shape) if k else None for v, k in zip(out, keep)))


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
    impl: str | None = None,
    chunk_bytes: int | None = None,
):
    """log softmax((hidden @ weight^T + bias) / T)[labels], and optionally the entropy, both fp32.

    hidden [N, H] (or [..., H]); weight [V, H]; labels [N] (or [...]) int, outside [0, V) means ignored (logp 0);
    bias [V] | None. Returns logp [N] (, entropy [N]) shaped like labels, differentiable w.r.t. hidden, weight and
    bias (through logp and the entropy). impl: "triton" | "chunked" | "torch" | None (None: triton on CUDA, chunked
    elsewhere); chunk_bytes bounds the [rows, V] fp32 working buffer. `fused_linear_logprob_stats` adds a logit
    soft cap and scale and further per-row statistics.
    """
    impl = resolve_impl(impl, hidden.device)
    if impl == "torch":
        return fused_linear_logprobs_ref(hidden, weight, labels, temperature=temperature, bias=bias,
                                         return_entropy=return_entropy)  # fmt: skip
    out = fused_linear_logprob_stats(hidden, weight, labels, bias=bias, temperature=temperature,
                                     stats=("entropy",) if return_entropy else (), impl=impl,
                                     chunk_bytes=chunk_bytes)  # fmt: skip
    return (out.logp, out.entropy) if return_entropy else out.logp
