"""Ranking-aware verifiable reward (docs/method.md section 3, eqs. 3-8), vectorized over the batch.

Only parsing is per response (`parse.py`); regression, length, consistency and accuracy are computed
for the whole batch at once on padded float64 CPU tensors, with `kendall_tau_b` for eqs. 5 and 6.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rarl_fast.rewards.kendall import kendall_tau_b
from rarl_fast.rewards.parse import Parsed, parse_responses

__all__ = ["RANKING_FIELDS", "RewardBreakdown", "reward_means", "score", "score_parsed"]

RANKING_FIELDS = ("length", "consistency", "accuracy", "ranking")
"""Fields that are 0 for 1-image samples and are left out of logged means there (docs/method.md section 3)."""


@dataclass(frozen=True)
class RewardBreakdown:
    """Every reward component of B responses; each field is a [B] float64 tensor in [0, 1].

    Attributes:
        total: R of eq. 8.
        format: R_f, 1 when `format_ok`.
        regression: R_reg of eq. 3, mean over all N images.
        length: r_len of eq. 4 (0 for N == 1).
        consistency: r_cons of eq. 5 (0 for N == 1).
        accuracy: r_acc of eq. 6 (0 for N == 1).
        ranking: R_rank of eq. 7 (0 for N == 1).
    """

    total: Tensor
    format: Tensor
    regression: Tensor
    length: Tensor
    consistency: Tensor
    accuracy: Tensor
    ranking: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        """Field name -> [B] tensor, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _per_row(value: float | Sequence[float] | Tensor, rows: int, name: str) -> Tensor:
    """A float or one float per row -> [rows] float64, checked finite and > 0."""
    out = torch.as_tensor(value, dtype=torch.float64, device="cpu").flatten()
    if out.numel() == 1:
        out = out.expand(rows)
    if out.numel() != rows:
        raise ValueError(f"{name} must be a float or have {rows} entries, got {out.numel()}")
    if rows and not bool((torch.isfinite(out) & (out > 0)).all()):  # host sync: argument check on CPU data
        raise ValueError(f"{name} must be finite and > 0")
    return out


def _pad_truths(truths: Sequence[Sequence[float]]) -> tuple[Tensor, Tensor]:
    """B truth lists -> (y [B, Nmax] float64 padded with 0, n [B] int64)."""
    n_list = [len(t) for t in truths]
    if any(n < 1 for n in n_list):
        raise ValueError("every truth needs at least one value")
    width = max(n_list, default=0)
    n = torch.tensor(n_list, dtype=torch.int64)
    y = torch.zeros(len(n_list), width, dtype=torch.float64)
    y[torch.arange(width).unsqueeze(0) < n.unsqueeze(1)] = torch.tensor(
        [float(v) for t in truths for v in t], dtype=torch.float64
    )
    if not bool(torch.isfinite(y).all()):  # host sync: argument check on CPU data
        raise ValueError("truth values must be finite")
    return y, n


def _first_in_range(ids: Tensor, in_range: Tensor, n_max: int) -> Tensor:
    """[B, M] -> [B, M] bool: in-range elements whose id has no earlier in-range occurrence in the row.

    O(B * M): the first column of each (row, id) is a scatter-min, so long lists cost no [B, M, M].
    """
    rows, width = ids.shape
    column = torch.arange(width).expand(rows, width)
    key = torch.arange(rows).unsqueeze(1) * (n_max + 1) + torch.where(in_range, ids, 0)
    first = torch.full((rows * (n_max + 1),), width, dtype=torch.int64)
    first = first.scatter_reduce(0, key[in_range], column[in_range], reduce="amin")
    return in_range & (first[key] == column)


def score_parsed(
    parsed: Parsed,
    truths: Sequence[Sequence[float]],
    *,
    tolerance: float | Sequence[float] | Tensor,
    alpha: float,
    beta: float,
    lam: float,
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
) -> RewardBreakdown:
    """`score` on already parsed responses (see `score` for the arguments)."""
    rows = len(parsed)
    if len(truths) != rows:
        raise ValueError(f"got {rows} responses but {len(truths)} truths")
    delta = _per_row(tolerance, rows, "tolerance")
    y, n = _pad_truths(truths)
    ok = parsed.format_ok
    mask = parsed.mask & ok.unsqueeze(1)
    ids, values = parsed.ids, parsed.values
    n_f = n.to(torch.float64)

    in_range = mask & (ids >= 1) & (ids <= n.unsqueeze(1))
    present = _first_in_range(ids, in_range, y.shape[1])
    n_present = present.sum(dim=1)
    m = mask.sum(dim=1)
    y_of_id = y.gather(1, (ids - 1).clamp(0, max(y.shape[1] - 1, 0)))

    # eq. 3: r_i = max(0, 1 - (v(i) - y_i)^2 / delta^2) for i in present, averaged over all N images.
    err = (values - y_of_id) ** 2 / delta.unsqueeze(1) ** 2
    regression = torch.where(present, (1.0 - err).clamp_min(0.0), 0.0).sum(dim=1) / n_f
    # eq. 4
    length = ((m == n) & (n_present == n)).to(torch.float64)
    # eq. 5: list position vs listed value over all valid elements.
    position = torch.arange(ids.shape[1], dtype=torch.float64).expand_as(values)
    tau_c = kendall_tau_b(position, values, mask)
    consistency = torch.where(m >= 2, (tau_c + 1.0) / 2.0, 0.0)
    # eq. 6: listed order of the present ids vs their true values; a stable sort moves the present
    # elements to the front in listed order so Kendall only spans |present| <= N columns.
    front = (~present).to(torch.int8).argsort(dim=1, stable=True)
    tau_a = kendall_tau_b(position, y_of_id.gather(1, front), present.gather(1, front))
    accuracy = torch.where(n_present >= 2, (tau_a + 1.0) / 2.0 * n_present.to(torch.float64) / n_f, 0.0)

    multi = (n >= 2) & ok
    length, consistency, accuracy = (torch.where(multi, t, 0.0) for t in (length, consistency, accuracy))
    w_len, w_cons, w_acc = weights
    ranking = w_len * length + w_cons * consistency + w_acc * accuracy
    fmt = ok.to(torch.float64)
    regression = torch.where(ok, regression, 0.0)
    # eq. 8; for N == 1 the ranking term is absent and alpha takes alpha + beta.
    f64 = torch.float64
    a = torch.where(multi, torch.tensor(alpha, dtype=f64), torch.tensor(alpha + beta, dtype=f64))
    b = torch.where(multi, torch.tensor(beta, dtype=f64), torch.tensor(0.0, dtype=f64))
    total = lam * fmt + (1.0 - lam) * fmt * (a * regression + b * ranking)
    return RewardBreakdown(
        total=total,
        format=fmt,
        regression=regression,
        length=length,
        consistency=consistency,
        accuracy=accuracy,
        ranking=ranking,
    )


def score(
    texts: Sequence[str],
    truths: Sequence[Sequence[float]],
    *,
    tolerance: float | Sequence[float] | Tensor,
    alpha: float,
    beta: float,
    lam: float,
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
) -> RewardBreakdown:
    """Score B responses against their truths (docs/method.md section 3); never raises on any text.

    Tau is exactly +-1 for perfectly (anti-)ordered lists (see `kendall_tau_b`), so a perfect answer
    totals `lam + (1 - lam) * (alpha + beta * sum(weights))`, exactly 1 for the default weights.

    Args:
        texts: B responses, without special tokens (an appended EOS string would break the framing).
        truths: B lists of true values `y_1..y_N` by image id (N >= 1, finite).
        tolerance: delta of eq. 3, a float or one per response ([B]); finite and > 0.
        alpha, beta: eq. 8 weights of regression and ranking (stage 1: 1, 0; stage 2: 0.5, 0.5).
        lam: eq. 8 format weight.
        weights: (w_len, w_cons, w_acc) of eq. 7.
    Returns:
        `RewardBreakdown` of [B] float64 tensors.
    Raises:
        ValueError: on malformed arguments other than `texts` (lengths, empty truths, bad tolerance).
    """
    return score_parsed(
        parse_responses(texts), truths, tolerance=tolerance, alpha=alpha, beta=beta, lam=lam, weights=weights
    )


def reward_means(breakdown: RewardBreakdown, num_images: Tensor) -> dict[str, Tensor]:
    """Batch means of every component, with 1-image responses left out of the ranking-related ones.

    Args:
        breakdown: components of B responses.
        num_images: [B] int, N of each response's sample.
    Returns:
        name -> 0-dim float64 tensor (NaN for a ranking-related mean when no response has N >= 2).
    """
    multi = num_images.to(breakdown.total.device) >= 2
    out = {}
    for name, value in breakdown.as_dict().items():
        out[name] = value[multi].mean() if name in RANKING_FIELDS else value.mean()
    return out
