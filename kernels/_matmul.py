"""Triton GEMM used for the two gradient contractions of the lm_head: C (+)= A @ B with fp32 accumulation.

`A` is the [rows, V] d-logits buffer (or its transpose) and is cast tile by tile to `B`'s dtype before
`tl.dot`, the same rounding eager autograd applies when it casts d-logits to bf16 for the matmul backward.
With `accumulate=True` the kernel adds into an fp32 `C` in its epilogue; each output tile has exactly one
owner program, so the result is deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rarl_kernels._utils import dot_flags, fit_block, launch, tile_config


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
    ACCUMULATE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row tiles share each column tile of B while it is hot in L2.
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak
    b_ptrs = b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
        # DOT_F32 (interpreter only, see `_utils.dot_flags`) computes in fp32 without any downcast.
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    c_ptrs = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False) -> torch.Tensor:
    """out[M,N] (+)= a[M,K] @ b[K,N]; any strides (transposed views are free); fp32 accumulation."""
    M, K = a.shape
    K2, N = b.shape
    assert K == K2 and out.shape == (M, N), (a.shape, b.shape, out.shape)
    cfg = tile_config(a.device, b.dtype)
    bm, bn, bk = fit_block(cfg["BLOCK_M"], M, cfg["MIN_M"]), fit_block(cfg["BLOCK_MN"], N), fit_block(cfg["BLOCK_K"], K)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    launch(
        "matmul", _matmul_kernel, grid,
        a, b, out, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, **dot_flags(b.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        num_warps=cfg["gemm_warps"], num_stages=cfg["gemm_stages"],
    )  # fmt: skip
    return out
