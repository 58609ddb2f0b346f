"""The lm_head pieces both fused ops share: the logits of one tile (Triton) or one row chunk (torch), and the
contraction of a d-logits chunk into the gradients of hidden, weight and bias (Triton GEMMs or torch)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rarl_kernels._matmul import matmul_into


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, s_hn, s_hh, s_wv, s_wh, inv_t,
               HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """[BLOCK_N, BLOCK_V] fp32 tile of (hidden @ weight^T + bias) / T; columns >= V come back as -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_H)
    a_ptrs = h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hh
    b_ptrs = w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wh
    for k0 in range(0, H, BLOCK_H):
        k_in = ks[None, :] < H - k0
        a = tl.load(a_ptrs, mask=(rows[:, None] < N) & k_in, other=0.0)
        b = tl.load(b_ptrs, mask=(cols[:, None] < V) & k_in, other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_H * s_hh
        b_ptrs += BLOCK_H * s_wh
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return tl.where(cols[None, :] < V, acc * inv_t, float("-inf"))


def chunk_logits(h_c, weight, bias, inv_t: float) -> torch.Tensor:
    """[c, V] fp32 logits / T for one row chunk; the matmul runs in the input dtype (as Liger and eager do)."""
    z = (h_c @ weight.t()).float()
    if bias is not None:
        z += bias.float()
    return z.mul_(inv_t)


def contract_dlogits(dz, h_c, weight, gh_c, gw, gb, *, accumulate: bool) -> None:
    """gh_c = dz @ W; gw (+)= dz^T @ h_c (fp32); gb += column sums of dz. dz [c,V], h_c [c,H], W [V,H]."""
    if gh_c is not None:
        matmul_into(dz, weight, gh_c)
    if gw is not None:
        matmul_into(dz.t(), h_c, gw, accumulate=accumulate)
    if gb is not None:
        gb += dz.sum(0, dtype=torch.float32)


def contract_dlogits_torch(dz, h_c, weight, gh_c, gw, gb) -> None:
    """torch twin of `contract_dlogits` (gw, gb fp32 accumulators)."""
    dz_lp = dz.to(weight.dtype)
    if gh_c is not None:
        torch.mm(dz_lp, weight, out=gh_c) if gh_c.dtype == weight.dtype else gh_c.copy_(dz_lp @ weight)
    if gw is not None:
        if h_c.dtype == torch.float32:
            gw.addmm_(dz_lp.t(), h_c)
        else:
            gw += dz_lp.t() @ h_c
    if gb is not None:
        gb += dz.sum(0)
