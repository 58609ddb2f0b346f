"""Batched Kendall tau-b over many small padded rankings (docs/method.md section 3).

The one implementation that rewards, data checks, metrics and evaluation share. It compares every
pair (i < j) of the L columns of each row at once, so a batch is a handful of tensor ops with no
Python loop over pairs; rows are processed in chunks that bound the [chunk, L, L] temporaries.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kendall_tau_b"]

_CHUNK_ELEMENTS = 1 << 22
"""Upper bound on chunk * L * L, the size of each pairwise temporary."""
_MIN_BUCKET = 8
"""Rows up to this width are computed together without bucketing (the common case: N <= 8)."""


def _signs(v: Tensor) -> Tensor:
    """[B, L] -> [B, L, L] int8: sign(v[j] - v[i]) at (i, j), by comparison so +-inf cannot produce NaN."""
    a = v.unsqueeze(1)
    b = v.unsqueeze(2)
    return (a > b).to(torch.int8) - (a < b).to(torch.int8)


def _tau_chunk(x: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    length = x.shape[1]
    upper = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
    pair = valid.unsqueeze(2) & valid.unsqueeze(1) & upper
    sx = _signs(x)
    sy = _signs(y)
    n0 = pair.sum(dim=(1, 2))
    n1 = (pair & (sx == 0)).sum(dim=(1, 2))
    n2 = (pair & (sy == 0)).sum(dim=(1, 2))
    s = torch.where(pair, sx * sy, 0).sum(dim=(1, 2), dtype=torch.int64)
    denom = ((n0 - n1) * (n0 - n2)).to(torch.float64)
    return torch.where(denom > 0, s.to(torch.float64) / denom.clamp_min(1).sqrt(), 0.0)


def _tau_rows(x: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """`_tau_chunk` over row chunks that keep each [chunk, L, L] temporary under `_CHUNK_ELEMENTS`."""
    rows, length = x.shape
    chunk = max(1, _CHUNK_ELEMENTS // (length * length))
    if chunk >= rows:
        return _tau_chunk(x, y, valid)
    return torch.cat(
        [_tau_chunk(x[i : i + chunk], y[i : i + chunk], valid[i : i + chunk]) for i in range(0, rows, chunk)]
    )


def kendall_tau_b(x: Tensor, y: Tensor, valid: Tensor | None = None) -> Tensor:
    """Kendall tau-b of each row's pairs `(x[b, k], y[b, k])` over the columns where `valid[b, k]`.

    `tau = (concordant - discordant) / sqrt((n0 - ties_x) * (n0 - ties_y))` with n0 the number of
    valid pairs, as `scipy.stats.kendalltau(variant="b")`; it agrees with scipy to ~1e-15 where scipy is
    finite and is 0 where scipy gives NaN (fewer than 2 valid columns, or all x or all y tied). It is
    exactly +-1 for strictly concordant/discordant rows, since the denominator is then sqrt(n0**2).
    Only the order of the valid columns matters, so gaps in `valid` are fine.

    Cost is O(L^2) per row. When L > 8, rows are grouped by their own width (last valid column + 1)
    into power-of-two buckets, so one long row does not make the whole batch pay for its width; this
    takes one deliberate host sync per bucket (`nonzero`).

    Args:
        x: [B, L] real tensor (any real dtype); NaN compares tied with everything, so mask it out instead.
        y: [B, L] real tensor, same shape.
        valid: [B, L] bool, or None for all columns.
    Returns:
        [B] float64 tau-b, 0 where undefined.
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"x and y must both be [B, L], got {tuple(x.shape)} and {tuple(y.shape)}")
    if valid is None:
        valid = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    elif valid.shape != x.shape:
        raise ValueError(f"valid must be {tuple(x.shape)}, got {tuple(valid.shape)}")
    valid = valid.bool()
    rows, length = x.shape
    if rows == 0 or length < 2:
        return torch.zeros(rows, dtype=torch.float64, device=x.device)
    if length <= _MIN_BUCKET:
        return _tau_rows(x, y, valid)
    width = (valid * torch.arange(1, length + 1, device=x.device)).amax(dim=1)
    out = torch.zeros(rows, dtype=torch.float64, device=x.device)
    low, high = 1, _MIN_BUCKET
    while low < length:
        high = min(high, length)
        sel = ((width > low) & (width <= high)).nonzero().squeeze(1)  # host sync: bucket sizes
        if sel.numel():
            out[sel] = _tau_rows(x[sel, :high], y[sel, :high], valid[sel, :high])
        low, high = high, 2 * high
    return out
