"""Shared plumbing for the kernels: implementation switch, launch counter, block sizes, chunking.

Only torch, triton and the standard library are imported here (``rarl_kernels`` is standalone).
"""

from __future__ import annotations

import collections
import os

import torch

IMPLS = ("triton", "chunked", "torch")

# Number of launches per Triton kernel name since import (or since the last `LAUNCHES.clear()`).
# Launchers increment it, so tests can assert that a Triton kernel actually ran rather than a fallback.
LAUNCHES: collections.Counter[str] = collections.Counter()

# Byte budget of the [rows, V] fp32 buffer that the chunked and triton paths hold at once, per device type.
# CUDA: 1 GiB (~1700 rows at V=151936) keeps the gradient GEMMs long in K, so the fp32 weight-gradient
# accumulator is read and written only ~10 times at N=16384, while the buffer stays ~1/10 of eager's logits.
# CPU: 16 MiB chunks stay cache-friendly and keep the peak far below eager's.
DEFAULT_CHUNK_BYTES = {"cuda": 2**30, "cpu": 16 * 2**20}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """`None` picks "triton" on CUDA and "chunked" elsewhere; "triton" on CPU needs the interpreter."""
    if impl is None:
        return "triton" if device.type == "cuda" else "chunked"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
    return impl


def launch(name: str, kernel, grid, *args, **kwargs) -> None:
    """Launch a Triton kernel and count it in `LAUNCHES[name]`."""
    LAUNCHES[name] += 1
    kernel[grid](*args, **kwargs)


# Test hook: entries here replace `tile_config`'s choices (e.g. a wide BLOCK_V for the V=151936 case, since
# the interpreter's cost is per op, not per element).
TILE_OVERRIDES: dict[str, int] = {}


def tile_config(device: torch.device) -> dict[str, int]:
    """Fixed tile sizes (no autotune, so the interpreter needs no do_bench stand-in).

    GPU: 64x128 logit tiles with a 64-deep K step and 128x128x64 GEMM tiles, the usual sweet spots for bf16
    tl.dot on Hopper/Ampere with 8 warps. Interpreter: large tiles (its cost is per op, not per element)
    that the odd test sizes (N=63, H=72, V=1000) still cross.
    """
    if device.type == "cuda":
        cfg = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, BLOCK_M=128, BLOCK_MN=128, BLOCK_K=64, num_warps=8,
                   num_stages=3)  # fmt: skip
    else:
        cfg = dict(BLOCK_N=32, BLOCK_V=512, BLOCK_H=64, BLOCK_M=128, BLOCK_MN=128, BLOCK_K=512, num_warps=4,
                   num_stages=1)  # fmt: skip
    cfg.update(TILE_OVERRIDES)
    return cfg


def fit_block(block: int, size: int) -> int:
    """`block` shrunk to the next power of two >= `size` (at least 16, tl.dot's minimum) for small dims."""
    return min(block, max(16, 1 << max(0, size - 1).bit_length()))


def chunk_rows(n_rows: int, vocab: int, chunk_bytes: int | None, multiple: int = 1, device=None) -> int:
    """Rows per chunk so that a [rows, vocab] fp32 buffer fits in `chunk_bytes` (None: the device's default
    budget) with at least `multiple` rows."""
    kind = device.type if device is not None else "cpu"
    budget = DEFAULT_CHUNK_BYTES.get(kind, DEFAULT_CHUNK_BYTES["cpu"]) if chunk_bytes is None else chunk_bytes
    rows = max(1, budget // (4 * vocab))
    if rows >= multiple:
        rows -= rows % multiple
    else:
        rows = multiple
    return max(1, min(rows, n_rows))


def dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """Constexpr dot flags: fp32 operands use exact fp32 products (torch's default matmul precision, not tf32).

    DOT_F32 (interpreter only) makes kernels upcast both operands and skip every downcast: triton 3.9's
    interpreter reads bf16 dot operands as integers and truncates fp32->bf16 casts, while fp32 products of
    bf16 values are exact, so the result equals the tensor-core one up to the rounding of d-logits to bf16.
    """
    return dict(DOT_F32=interpreting(), DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def world_size() -> int:
    """Data-parallel world size as Liger's dapo normalizer sees it (1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def kernel_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype a kernel stores into: the interpreter truncates fp32->bf16 casts, so there kernels write fp32
    and torch rounds to nearest afterwards; compiled kernels store `dtype` directly."""
    return torch.float32 if interpreting() else dtype
