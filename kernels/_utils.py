"""Shared plumbing for the kernels: implementation switch, launch counter, block sizes, chunking.

Only torch, triton and the standard library are imported here (``rarl_kernels`` is standalone).
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

IMPLS = ("triton", "chunked", "torch")

# Number of launches per Triton kernel name since import (or since the last `LAUNCHES.clear()`).
# Launchers increment it, so tests can assert that a Triton kernel actually ran rather than a fallback.
LAUNCHES: collections.Counter[str] = collections.Counter()

# Byte budget of the [rows, V] fp32 buffer that the chunked and triton paths hold at once, per device type.
# CUDA: 1 GiB (1664 rows at V=151936). Each chunk reads and writes the fp32 weight gradient once; the roofline
# model (bench/roofline.py --sweep) puts the knee there: below it that traffic outweighs the gradient GEMM (0.5 GiB
# is predicted 24 % slower on an H100), above it nothing is gained, while the buffer stays ~1/9 of eager's logits.
# CPU: 64 MiB (512 rows at V=32000). Each chunk is a dozen short parallel regions (GEMMs and elementwise passes);
# on a shared CPU every region waits for its slowest thread, so fewer, larger chunks lose less to contention
# (bench_kernels' cpu shape, fp32 forward+backward, cores shared: 16 MiB took 1.5x eager's time, 64 MiB 0.87x)
# while the peak stays ~1/15 of eager's (128 MiB: 1/9).
DEFAULT_CHUNK_BYTES = {"cuda": 2**30, "cpu": 64 * 2**20}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """`None` picks "triton" on CUDA and "chunked" elsewhere; "triton" on CPU needs the interpreter (or a capture,
    see `capture_launches`)."""
    if impl is None:
        return "triton" if device.type == "cuda" else "chunked"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and device.type != "cuda" and not interpreting() and _capture is None:
        raise RuntimeError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
    return impl


class Launch(NamedTuple):
    """One kernel launch as a launcher made it: enough to compile the same specialization ahead of time."""

    name: str
    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict[str, Any]


class _Capture(NamedTuple):
    arch: int
    launches: list[Launch]


_capture: _Capture | None = None


@contextlib.contextmanager
def capture_launches(arch: int) -> Iterator[list[Launch]]:
    """Run the ops as on a GPU of tile family `arch` (see `gpu_arch`) without launching anything: each launch is
    appended to the yielded list instead. Tensors may be on the CPU (their outputs are then left unwritten); used
    to compile every kernel variant for real GPUs on a machine without one (`rarl_kernels.aot`)."""
    global _capture
    if arch not in GPU_TILES:
        raise ValueError(f"arch must be one of {sorted(GPU_TILES)}, got {arch}")
    if _capture is not None:
        raise RuntimeError("capture_launches does not nest")
    _capture = _Capture(arch, [])
    try:
        yield _capture.launches
    finally:
        _capture = None


def launch(name: str, kernel, grid, *args, **kwargs) -> None:
    """Launch a Triton kernel and count it in `LAUNCHES[name]` (inside `capture_launches`: record it instead)."""
    LAUNCHES[name] += 1
    if _capture is not None:
        _capture.launches.append(Launch(name, kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


# Tile sizes and launch shapes per GPU tile family (see `gpu_arch`) and operand width, fixed rather than autotuned
# (so the interpreter needs no do_bench stand-in). Keys:
#   BLOCK_N x BLOCK_V logit tiles, BLOCK_H the K step, num_warps / num_stages: the logit kernels;
#   BLOCK_R rows x BLOCK_P partials per step, rows_warps: the row merge of the fused loss (fp32 whatever the inputs);
#   BLOCK_M x BLOCK_MN x BLOCK_K, gemm_warps / gemm_stages: the gradient GEMMs; MIN_M: the smallest row tile of a dot.
# Each was chosen by compiling every launch for its target (`python -m rarl_kernels.aot`, checked in the tests): no
# register spills, the family's tensor-core instruction in the 16-bit dots, shared memory within the block limit.
_TILES_16BIT = dict(
    BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3, BLOCK_R=64, BLOCK_P=16, rows_warps=4,
    BLOCK_M=128, BLOCK_MN=128, BLOCK_K=64, gemm_warps=8, gemm_stages=3, MIN_M=16,
)  # fmt: skip
# fp32 dots run on CUDA cores (exact fp32 products): smaller tiles and K steps keep the unrolled FMA accumulators
# in registers.
_TILES_FP32 = dict(
    _TILES_16BIT, BLOCK_H=32, num_stages=2, BLOCK_M=64, BLOCK_MN=128, BLOCK_K=16, gemm_stages=2,
)  # fmt: skip
GPU_TILES: dict[int, dict[str, dict[str, int]]] = {
    # mma.sync; the family includes sm_86/89/120 (99 KB of shared memory per block): the GEMM takes 96 KB
    80: {"16bit": dict(_TILES_16BIT), "fp32": dict(_TILES_FP32)},
    # wgmma needs 64-row tiles
    90: {"16bit": dict(_TILES_16BIT, MIN_M=64), "fp32": dict(_TILES_FP32)},
    # tcgen05's native tile has 128 rows; 128 x 64 logit tiles keep the online softmax out of local memory
    100: {
        "16bit": dict(_TILES_16BIT, BLOCK_N=128, BLOCK_V=64, MIN_M=128),
        "fp32": dict(_TILES_FP32, BLOCK_MN=64, BLOCK_K=32),
    },
}
# Interpreter tiles: large (its cost is per op, not per element), yet crossed by the odd test sizes (N=63,
# H=72, V=1000).
INTERPRETER_TILES = dict(
    BLOCK_N=32, BLOCK_V=512, BLOCK_H=64, num_warps=4, num_stages=1, BLOCK_R=32, BLOCK_P=64, rows_warps=4,
    BLOCK_M=128, BLOCK_MN=128, BLOCK_K=512, gemm_warps=4, gemm_stages=1, MIN_M=16,
)  # fmt: skip

# Entries here replace `tile_config`'s choices on every device (e.g. a wide BLOCK_V for the V=151936 interpreter
# test, or a user's own tiles).
TILE_OVERRIDES: dict[str, int] = {}


def gpu_arch(device: torch.device) -> int | None:
    """Tile family of a CUDA device: 100 for compute capability 10.x/11.x (Blackwell datacenter: tcgen05), 90 for
    9.x (Hopper: wgmma), 80 for the rest (Ampere, Ada, consumer Blackwell 12.x: mma.sync); None off CUDA. Inside
    `capture_launches` the captured family."""
    if _capture is not None:
        return _capture.arch
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return 100 if major in (10, 11) else 90 if major == 9 else 80


def tile_config(device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """Tiles for kernels whose operands are `dtype` on `device` (`GPU_TILES`, or the interpreter's off CUDA), with
    `TILE_OVERRIDES` applied."""
    arch = gpu_arch(device)
    if arch is None:
        cfg = dict(INTERPRETER_TILES)
    else:
        cfg = dict(GPU_TILES[arch]["fp32" if dtype == torch.float32 else "16bit"])
    cfg.update(TILE_OVERRIDES)
    return cfg


def fit_block(block: int, size: int, floor: int = 16) -> int:
    """`block` shrunk to the next power of two >= `size` for small dims, but not below `floor` (16 is tl.dot's
    minimum; the row tile of a dot on Hopper and Blackwell needs 64 for wgmma / tcgen05, `MIN_M` of the tiles)."""
    return min(block, max(floor, 1 << max(0, size - 1).bit_length()))


def row_buffer(rows: int, cols: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized [rows, cols] buffer whose row stride is a multiple of 16 elements: compiled kernels get the
    aligned (vectorized) specialization of that stride whatever `cols` is (an odd vocabulary size)."""
    return torch.empty(rows, -(-cols // 16) * 16, device=device, dtype=dtype)[:, :cols]


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
