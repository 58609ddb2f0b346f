"""Fused lm_head + log-softmax + label gather (+ entropy), never holding the [N, V] logits.

Forward (Triton): one program per BLOCK_N rows streams the vocabulary in BLOCK_V tiles; each tile's logits
come from a K-loop of `tl.dot` over H (fp32 accumulate), are scaled by 1/temperature, and fold into a running
max / sum-of-exp (online logsumexp), the label logit, and a running sum of p*(z - max) for the entropy.
Saved for backward: the row max m, log(sum exp(z - m)) and the entropy in fp32, [N] each. Keeping m and the
log-sum apart (not their sum, the logsumexp) lets log p = (z - m) - log-sum stay exact for the top tokens when
|logits| is large: z - lse would round to the spacing of fp32 numbers near lse (1e-3 at |lse| ~ 1e4).

Backward (Triton): for row chunks bounded by a byte budget, a 2-D grid recomputes each logit tile and writes
d-logits = (g * (onehot - p) - g_ent * p * (log p + H)) / T into a [chunk, V] buffer; two Triton GEMMs then
contract it, grad_hidden = dz @ W and grad_weight += dz^T @ hidden (fp32 accumulator, one owner per output
tile: deterministic, no atomics); grad_bias = column sums of dz.

Labels outside [0, V) (e.g. -100) are ignored: logp = 0 there and no gradient flows from it (the entropy of
such rows is still computed and differentiable).
"""

from __future__ import annotations

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
from rarl_kernels.reference import fused_linear_logprobs_ref


# The row count only bounds masks across rows: not specialized on (no recompile per chunk length).
@triton.jit(do_not_specialize=["N"])
def _linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, logp_ptr, m_ptr, ls_ptr, ent_ptr,
    N, V, H, s_hn, s_hh, s_wv, s_wh, inv_t,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    labels = tl.load(y_ptr + rows, mask=rows < N, other=-1)
    # A finite start for the running max keeps (m_old - m_new) * s = 0 (not nan) on the first tile.
    m = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m), for the entropy
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, s_hn, s_hh, s_wv, s_wh, inv_t,
                        HAS_BIAS, DOT_F32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        d = tl.where(cols[None, :] < V, z - m_new[:, None], 0.0)
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
    ls = tl.log(s)
    valid = (labels >= 0) & (labels < V)
    tl.store(logp_ptr + rows, tl.where(valid, (z_label - m) - ls, 0.0), mask=rows < N)
    tl.store(m_ptr + rows, m, mask=rows < N)
    tl.store(ls_ptr + rows, ls, mask=rows < N)
    tl.store(ent_ptr + rows, ls - u / s, mask=rows < N)


# The row count only bounds masks across rows: not specialized on (no recompile per chunk length).
@triton.jit(do_not_specialize=["N"])
def _linear_logprobs_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, m_ptr, ls_ptr, ent_ptr, g_ptr, ge_ptr, dz_ptr,
    N, V, H, s_hn, s_hh, s_wv, s_wh, s_dn, inv_t,
    HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # Row blocks vary fastest, so the programs in flight share one weight tile in L2.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, s_hn, s_hh, s_wv, s_wh, inv_t,
                    HAS_BIAS, DOT_F32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
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
    tl.store(dz_ptr + rows[:, None] * s_dn + cols[None, :], (dz * inv_t).to(dz_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cols[None, :] < V))  # fmt: skip


def _common_args(hidden: torch.Tensor, weight: torch.Tensor) -> tuple:
    return (hidden.shape[0], weight.shape[0], hidden.shape[1], *hidden.stride(), *weight.stride())


def linear_logprobs_fwd_triton(hidden, weight, labels, bias, temperature: float):
    """hidden [N,H], weight [V,H], labels [N] int64, bias [V]|None -> logp, row max, log-sum (logsumexp minus the
    row max), entropy: [N] fp32 each."""
    N = hidden.shape[0]
    cfg = tile_config(hidden.device, hidden.dtype)
    cfg["BLOCK_N"] = fit_block(cfg["BLOCK_N"], N, cfg["MIN_M"])
    logp, row_max, log_sum, ent = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(4))
    launch(
        "linear_logprobs_fwd", _linear_logprobs_fwd_kernel, (triton.cdiv(N, cfg["BLOCK_N"]),),
        hidden, weight, bias if bias is not None else hidden, labels, logp, row_max, log_sum, ent,
        *_common_args(hidden, weight), 1.0 / temperature,
        HAS_BIAS=bias is not None, **dot_flags(hidden.dtype),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )  # fmt: skip
    return logp, row_max, log_sum, ent


def linear_logprobs_bwd_triton(hidden, weight, labels, bias, temperature, row_max, log_sum, ent, g_logp, g_ent, needs,
                               chunk_bytes):  # fmt: skip
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
            *_common_args(h_c, weight), dz_c.stride(0), 1.0 / temperature,
            HAS_BIAS=bias is not None, HAS_GENT=g_ent is not None, **dot_flags(hidden.dtype),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )  # fmt: skip
        contract_dlogits(dz_c, h_c, weight, gh[r0:r1] if gh is not None else None, gw, gb, accumulate=r0 > 0)
    return (
        gh.to(hidden.dtype) if gh is not None else None,
        gw.to(weight.dtype) if gw is not None else None,
        gb.to(bias.dtype) if gb is not None else None,
    )


def linear_logprobs_fwd_chunked(hidden, weight, labels, bias, temperature: float, chunk_bytes=None, entropy=True):
    """Plain-torch chunked forward: O(chunk * V) memory. Same outputs as `linear_logprobs_fwd_triton` (the
    entropy is zeros unless `entropy`: it costs one more pass over each chunk here)."""
    N, V = hidden.shape[0], weight.shape[0]
    logp, row_max, log_sum, ent = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(4))
    rows = chunk_rows(N, V, chunk_bytes, device=hidden.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = chunk_logits(hidden[r0:r1], weight, bias, 1.0 / temperature)
        y = labels[r0:r1]
        m = z.amax(-1)
        z.sub_(m[:, None])  # z - m: exact near the top, where the probability mass is
        e = z.exp()
        s = e.sum(-1)
        ls = s.log()
        z_label = z.gather(1, y.clamp(0, V - 1)[:, None]).squeeze(1)
        logp[r0:r1] = torch.where((y >= 0) & (y < V), z_label - ls, 0.0)
        row_max[r0:r1], log_sum[r0:r1] = m, ls
        ent[r0:r1] = ls - e.mul_(z).sum(-1) / s if entropy else 0.0
    return logp, row_max, log_sum, ent


def dlogits_chunk_torch(z, labels, g, inv_t, row_max, log_sum, ent=None, g_ent=None) -> torch.Tensor:
    """In place on the [c, V] fp32 logits z: returns d(sum g*logp + g_ent*H)/d(raw logits)."""
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


def linear_logprobs_bwd_chunked(hidden, weight, labels, bias, temperature, row_max, log_sum, ent, g_logp, g_ent,
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
        z = chunk_logits(h_c, weight, bias, 1.0 / temperature)
        g_ent_c = g_ent[r0:r1] if g_ent is not None else None
        dz = dlogits_chunk_torch(z, labels[r0:r1], g_logp[r0:r1], 1.0 / temperature, row_max[r0:r1], log_sum[r0:r1],
                                 ent[r0:r1], g_ent_c)  # fmt: skip
        contract_dlogits_torch(dz, h_c, weight, gh[r0:r1] if gh is not None else None, gw, gb)
    return (
        gh,
        gw.to(weight.dtype) if gw is not None else None,
        gb.to(bias.dtype) if gb is not None else None,
    )


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, temperature, impl, chunk_bytes, entropy):
        if impl == "triton":
            logp, row_max, log_sum, ent = linear_logprobs_fwd_triton(hidden, weight, labels, bias, temperature)
        else:
            logp, row_max, log_sum, ent = linear_logprobs_fwd_chunked(
                hidden, weight, labels, bias, temperature, chunk_bytes, entropy
            )
        ctx.save_for_backward(hidden, weight, labels, bias, row_max, log_sum, ent)
        ctx.temperature, ctx.impl, ctx.chunk_bytes, ctx.entropy = temperature, impl, chunk_bytes, entropy
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, labels, bias, row_max, log_sum, ent = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        bwd = linear_logprobs_bwd_triton if ctx.impl == "triton" else linear_logprobs_bwd_chunked
        g_logp = torch.zeros_like(log_sum) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None or not ctx.entropy else g_ent.float().contiguous()
        gh, gw, gb = bwd(hidden, weight, labels, bias, ctx.temperature, row_max, log_sum, ent, g_logp, g_ent, needs,
                         ctx.chunk_bytes)  # fmt: skip
        return gh, gw, None, gb, None, None, None, None


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

    hidden [N, H] (or [..., H]); weight [V, H]; labels [N] (or [...]) int, outside [0, V) means ignored
    (logp 0); bias [V] | None. Returns logp [N] (, entropy [N]) shaped like labels, differentiable w.r.t.
    hidden, weight and bias (through logp and the entropy). impl: "triton" | "chunked" | "torch" | None
    (None: triton on CUDA, chunked elsewhere); chunk_bytes bounds the [rows, V] fp32 working buffer.
    """
    impl = resolve_impl(impl, hidden.device)
    if impl == "torch":
        return fused_linear_logprobs_ref(hidden, weight, labels, temperature=temperature, bias=bias,
                                         return_entropy=return_entropy)  # fmt: skip
    shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    w = weight if weight.dtype == h2.dtype else weight.to(h2.dtype)
    y = labels.reshape(-1).long().contiguous()
    logp, ent = _LinearLogprobs.apply(h2, w, y, bias, float(temperature), impl, chunk_bytes, return_entropy)
    return (logp.view(shape), ent.view(shape)) if return_entropy else logp.view(shape)
