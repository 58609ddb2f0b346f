"""Helpers shared by the kernel tests and the benchmark (plain torch, no test framework needed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_ptr(x) -> int | None:
    if isinstance(x, torch.Tensor):
        return x.untyped_storage().data_ptr()
    if isinstance(x, torch.UntypedStorage | torch.TypedStorage):
        return x.data_ptr()
    return None


class LargestTensorMode(TorchDispatchMode):
    """Records the largest tensor (in elements) that an aten op creates while the mode is active, backward
    included when the backward runs inside the mode. Outputs on the storage of an input (views, in-place
    ops, `set_` re-wrapping an existing storage) allocate nothing and are skipped. `largest` and
    `largest_op` say what and where."""

    def __init__(self):
        super().__init__()
        self.largest, self.largest_op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {_storage_ptr(x) for x in tree_flatten((args, kwargs))[0]}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest and _storage_ptr(t) not in seen:
                self.largest, self.largest_op = t.numel(), str(func)
        return out


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def assert_three_way(out: torch.Tensor, ref_same_dtype: torch.Tensor | Sequence[torch.Tensor], ref_fp32: torch.Tensor,
                     *, atol: float, name: str = "") -> None:  # fmt: skip
    """The kernel's error against fp32 (or fp64) is at most 2x torch's own error in the kernel's dtype, plus `atol`.

    `ref_same_dtype` may be several results of torch, one per equally valid summation order (see
    `contraction_orders`); torch's error is then the worst of them. One order's error is a single draw that can
    land 20x below the typical rounding when the values are large, and a bound made from that one draw fails on
    a machine whose BLAS happens to add in another order."""
    refs = list(ref_same_dtype) if isinstance(ref_same_dtype, list | tuple) else [ref_same_dtype]
    err, base = max_err(out, ref_fp32), max(max_err(r, ref_fp32) for r in refs)
    assert err <= 2 * base + atol, f"{name}: kernel error {err:.3e} > 2 * torch error {base:.3e} + {atol:.1e}"


def contraction_orders(size: int, count: int, *, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` random permutations of range(`size`), each with its inverse. A contraction fed its inputs permuted
    along the contracted dimension (hidden[..., p] @ weight[:, p].T) gives the same value rounded in another
    order; gradients taken with respect to the permuted inputs come back with `[..., inverse]`."""
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(size, generator=g) for _ in range(count)]
    return [(p, torch.argsort(p)) for p in perms]


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, *, rtol: float, name: str = "") -> None:
    """max |out - ref| <= rtol * max |ref| (plus a floor for all-zero references)."""
    err, scale = max_err(out, ref), ref.detach().float().abs().max().item()
    assert err <= rtol * scale + 1e-30, f"{name}: max error {err:.3e} > {rtol:.0e} * max|ref| {scale:.3e}"
