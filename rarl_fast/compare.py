"""Two models compared on the same fixed test groups, paired group by group.

Inputs are eval JSONL lines (``n``, ``key``, ``truth``, ``response``: ``<run>/eval/<name>.jsonl``) of two models;
groups are matched by key, so the order of the lines does not matter. A cell's difference is model A's metric
minus model B's; its standard error is the delete-one jackknife over the test groups, which for the mean metrics
(Kendall tau, MAE, accuracy) is exactly the paired standard error sd(d) / sqrt(groups) of the per-group
differences, and for SRCC (a statistic of the whole test set) the usual jackknife estimate. It covers the noise
of the test set only; seed noise comes on top.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from rarl_fast.metrics import group_kendall, single_predictions, srcc

__all__ = ["paired_cell_difference", "paired_tau_gap"]


def _by_key(rows: Sequence[dict[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    return {json.dumps(r["key"]): r for r in rows if int(r["n"]) == n}


def _per_group(rows: list[dict[str, Any]], n: int, metric: str, midpoint: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group values [G] float64 whose mean is the cell (tau, absolute error or correctness), and the truths
    [G] (for SRCC, which is not a mean)."""
    answers, truths = [r["response"] for r in rows], [r["truth"] for r in rows]
    if n >= 2:
        tau, _ = group_kendall(answers, truths)
        return tau, torch.zeros(0)
    pred, failed = single_predictions(answers, midpoint)
    truth = torch.tensor([t[0] for t in truths], dtype=torch.float64)
    if metric == "mae":
        return (pred - truth).abs(), truth
    if metric == "accuracy":
        return ((torch.round(pred) == truth) & ~failed).double(), truth
    if metric == "srcc":
        return pred, truth
    raise ValueError(f"metric must be mae, accuracy or srcc, got {metric!r}")


def paired_cell_difference(
    rows_a: Sequence[dict[str, Any]],
    rows_b: Sequence[dict[str, Any]],
    n: int,
    *,
    metric: str = "kendall_tau",
    value_min: float = 0.0,
    value_max: float = 0.0,
) -> dict[str, Any]:
    """Model A minus model B in the table cell of N images, paired over their shared test groups.

    Args:
        rows_a, rows_b: eval JSONL lines of the two models (lines of other N are ignored).
        n: images per prompt; N >= 2 compares Kendall tau, N = 1 the task's ``metric``.
        metric: the 1-image metric, ``mae``, ``accuracy`` or ``srcc``.
        value_min, value_max: the value range (failed 1-image answers count as its midpoint, as in the table).
    Returns:
        ``a``, ``b`` (each model's cell), ``diff`` (a - b), ``se`` (jackknife over the groups), ``groups``.
    Raises:
        ValueError: when the two do not cover the same test groups of N, or fewer than 2.
    """
    a, b = _by_key(rows_a, n), _by_key(rows_b, n)
    if set(a) != set(b) or len(a) < 2:
        raise ValueError(f"N={n}: the two evaluations do not cover the same test groups (>= 2 needed)")
    keys = sorted(a)
    midpoint = (value_min + value_max) / 2
    va, truth = _per_group([a[k] for k in keys], n, metric, midpoint)
    vb, _ = _per_group([b[k] for k in keys], n, metric, midpoint)
    g = len(keys)
    if n == 1 and metric == "srcc":
        whole = srcc(va, truth) - srcc(vb, truth)
        keep = ~torch.eye(g, dtype=torch.bool)
        loo = torch.tensor([srcc(va[keep[i]], truth[keep[i]]) - srcc(vb[keep[i]], truth[keep[i]]) for i in range(g)])
        se = float(((g - 1) / g * (loo - loo.mean()).square().sum()).sqrt())
        return {"a": srcc(va, truth), "b": srcc(vb, truth), "diff": whole, "se": se, "groups": g}
    d = (va - vb).tolist()
    return {
        "a": float(va.mean()),
        "b": float(vb.mean()),
        "diff": statistics.fmean(d),
        "se": statistics.stdev(d) / g**0.5,
        "groups": g,
    }


def paired_tau_gap(rows_a: Sequence[dict[str, Any]], rows_b: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Model A minus model B on the mean of the N >= 2 Kendall-tau columns, paired over the shared test groups.

    Per N the cell difference of :func:`paired_cell_difference`; over the columns the difference of the column
    means with SE = sqrt(sum of the column SE^2) / columns. ``verdict`` is ``ahead`` / ``behind`` when the gap
    exceeds 2 SE, else ``within test-set noise`` (seed noise comes on top: compare seeds too).
    """
    per_n = {str(n): paired_cell_difference(rows_a, rows_b, n) for n in sorted({int(r["n"]) for r in rows_a}) if n >= 2}
    if not per_n:
        raise ValueError("no N >= 2 rows to compare")
    cols = list(per_n.values())
    gap = statistics.fmean(c["diff"] for c in cols)
    se = sum(c["se"] ** 2 for c in cols) ** 0.5 / len(cols)
    verdict = "ahead" if gap > 2 * se else "behind" if gap < -2 * se else "within test-set noise"
    return {
        "a": statistics.fmean(c["a"] for c in cols),
        "b": statistics.fmean(c["b"] for c in cols),
        "diff": gap,
        "se": se,
        "verdict": verdict,
        "per_n": per_n,
    }
