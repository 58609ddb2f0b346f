"""Evaluation metrics of docs/method.md section 7 and the paper-shaped results table. Pure functions.

For N = 1 the task's metric: MAE, counting accuracy (round(pred) == truth, rounding half to even as Python's
``round``) or SRCC (Spearman over the test set); for N >= 2 the mean Kendall tau between the listed order and
the true order. An answer that fails to parse or does not list all N images is a *failure*: tau 0 for N >= 2;
for N = 1 the midpoint of the value range for MAE and SRCC, and wrong for accuracy. Every number comes with
its failure rate. Departure (undefined cases, not covered by the paper): SRCC is 0 where either side is
constant, as Kendall tau is (``kendall_tau_b``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rarl_fast.rewards.kendall import kendall_tau_b
from rarl_fast.rewards.parse import Parsed, parse_responses

__all__ = [
    "MetricResult",
    "column_title",
    "counting_accuracy",
    "evaluate_answers",
    "group_kendall",
    "listed_positions",
    "mae",
    "results_csv",
    "results_markdown",
    "single_predictions",
    "srcc",
    "table_columns",
]

TASK_TITLES = {"age": "UTKFace", "count": "COCO-REM", "aesthetics": "AVA"}
"""Column titles of the paper's datasets; other tasks are titled by their name."""

_HEADERS = {"mae": "MAE ↓", "accuracy": "acc. % ↑", "srcc": "SRCC ↑", "kendall_tau": "τ ↑"}


@dataclass(frozen=True)
class MetricResult:
    """One cell of the results table.

    Attributes:
        name: ``mae``, ``accuracy`` (a fraction), ``srcc`` or ``kendall_tau``.
        value: the metric over all answers, failures included by the rules above.
        failure_rate: the fraction of answers that failed to parse or did not list all N images; NaN where it is
            not known (a published number).
        count: answers evaluated (0 for a published number).
    """

    name: str
    value: float
    failure_rate: float
    count: int

    @property
    def higher_is_better(self) -> bool:
        return self.name != "mae"


def _f64(x: Tensor | Sequence[float]) -> Tensor:
    return x.detach().to("cpu", torch.float64) if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float64)


def mae(pred: Tensor | Sequence[float], truth: Tensor | Sequence[float]) -> float:
    """Mean absolute error of ``pred [B]`` against ``truth [B]``."""
    p, t = _f64(pred), _f64(truth)
    return float((p - t).abs().mean()) if p.numel() else 0.0


def counting_accuracy(pred: Tensor | Sequence[float], truth: Tensor | Sequence[float]) -> float:
    """Fraction of ``round(pred) == truth`` (half to even, as Python's ``round``) over ``[B]``."""
    p, t = _f64(pred), _f64(truth)
    return float((torch.round(p) == t).double().mean()) if p.numel() else 0.0


def _average_ranks(x: Tensor) -> Tensor:
    """[L] -> [L] float64 ranks 1..L, ties sharing their average rank (as ``scipy.stats.rankdata``)."""
    sorted_x, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def srcc(pred: Tensor | Sequence[float], truth: Tensor | Sequence[float]) -> float:
    """Spearman rank correlation of ``pred [B]`` and ``truth [B]`` (Pearson of average ranks); 0 if undefined."""
    p, t = _f64(pred), _f64(truth)
    if p.numel() < 2:
        return 0.0
    rp, rt = _average_ranks(p), _average_ranks(t)
    rp, rt = rp - rp.mean(), rt - rt.mean()
    denom = (rp.square().sum() * rt.square().sum()).sqrt()
    return float((rp * rt).sum() / denom) if denom > 0 else 0.0


def listed_positions(parsed: Parsed, n: int) -> tuple[Tensor, Tensor]:
    """Where each image id was listed, and whether the answer is complete.

    Ids outside 1..N and repeats are ignored (the first occurrence counts), as in the reward (docs/method.md 3).

    Args:
        parsed: B parsed answers.
        n: images in each prompt (N).
    Returns:
        positions: [B, N] int64, 0-based listed position of image id i + 1 among the kept elements, -1 if absent.
        first: [B, M] bool, the elements kept (in range, first occurrence).
        complete: [B] bool, the format holds and all N ids are listed.
    """
    ids, inr = parsed.ids, parsed.mask & (parsed.ids >= 1) & (parsed.ids <= n)
    rows, width = ids.shape
    earlier = torch.ones(width, width, dtype=torch.bool).tril(-1)  # [k, k'] with k' < k
    repeat = ((ids.unsqueeze(2) == ids.unsqueeze(1)) & inr.unsqueeze(1) & earlier).any(dim=2)
    first = inr & ~repeat
    pos = first.long().cumsum(dim=1) - 1
    positions = torch.full((rows, n + 1), -1, dtype=torch.long)
    positions.scatter_(1, torch.where(first, ids, 0), torch.where(first, pos, -1))
    complete = parsed.format_ok & (first.sum(dim=1) == n)
    return positions[:, 1:], first, complete


def _parsed(answers: Sequence[str] | Parsed) -> Parsed:
    return answers if isinstance(answers, Parsed) else parse_responses(list(answers))


def group_kendall(answers: Sequence[str] | Parsed, truths: Tensor | Sequence[Sequence[float]]) -> tuple[Tensor, Tensor]:
    """Kendall tau between each answer's listed order and the true order; 0 for failures.

    Args:
        answers: B response texts (or their parse).
        truths: [B, N] true values by image id.
    Returns:
        tau: [B] float64. failed: [B] bool (unparseable or not all N images listed).
    """
    parsed, truth = _parsed(answers), _f64(truths)
    if truth.dim() != 2 or truth.shape[0] != len(parsed):
        raise ValueError(f"truths must be [B={len(parsed)}, N], got {tuple(truth.shape)}")
    positions, _, complete = listed_positions(parsed, truth.shape[1])
    valid = complete.unsqueeze(1).expand_as(truth)
    tau = kendall_tau_b(positions.double(), truth, valid)
    return torch.where(complete, tau, 0.0), ~complete


def single_predictions(answers: Sequence[str] | Parsed, midpoint: float) -> tuple[Tensor, Tensor]:
    """Each 1-image answer's value for image 1 (its first occurrence); ``midpoint`` for failures.

    Returns:
        pred: [B] float64. failed: [B] bool (unparseable or image 1 not listed).
    """
    parsed = _parsed(answers)
    _, first, complete = listed_positions(parsed, 1)
    value = torch.where(first, parsed.values, 0.0).sum(dim=1)  # at most one kept element per row
    return torch.where(complete, value, midpoint), ~complete


def evaluate_answers(
    answers: Sequence[str] | Parsed,
    truths: Tensor | Sequence[Sequence[float]],
    *,
    metric: str,
    value_min: float,
    value_max: float,
) -> MetricResult:
    """The table cell for B answers to groups of one size N: the task's ``metric`` if N == 1, else Kendall tau.

    Args:
        answers: B response texts (or their parse).
        truths: [B, N] true values by image id.
        metric: the 1-image metric, ``mae``, ``accuracy`` or ``srcc``.
        value_min, value_max: the value range (failed 1-image answers count as its midpoint).
    """
    parsed, truth = _parsed(answers), _f64(truths)
    if truth.dim() != 2 or truth.shape[0] != len(parsed):
        raise ValueError(f"truths must be [B={len(parsed)}, N], got {tuple(truth.shape)}")
    rows = truth.shape[0]
    if truth.shape[1] >= 2:
        tau, failed = group_kendall(parsed, truth)
        value = float(tau.mean()) if rows else 0.0
        return MetricResult("kendall_tau", value, float(failed.double().mean()) if rows else 0.0, rows)
    pred, failed = single_predictions(parsed, (value_min + value_max) / 2)
    fns = {"mae": mae, "accuracy": counting_accuracy, "srcc": srcc}
    if metric not in fns:
        raise ValueError(f"metric must be one of {sorted(fns)}, got {metric!r}")
    if metric == "accuracy":
        pred = torch.where(failed, torch.nan, pred)  # a failure is never right
    value = fns[metric](pred, truth[:, 0])
    return MetricResult(metric, value, float(failed.double().mean()) if rows else 0.0, rows)


# ----------------------------------------------------------------------------------------------------------
# Results table: rows are models; columns are (task, N) cells
# ----------------------------------------------------------------------------------------------------------

Results = Mapping[str, Mapping[str, Mapping[int, MetricResult]]]
"""model -> task -> N -> cell."""


def table_columns(results: Results, group_sizes: Sequence[int]) -> list[tuple[str, int, str]]:
    """(task, N, metric name) per column: tasks in first-seen order, N in ``group_sizes`` order."""
    tasks: dict[str, dict[int, str]] = {}
    for per_task in results.values():
        for task, cells in per_task.items():
            for n, cell in cells.items():
                tasks.setdefault(task, {}).setdefault(n, cell.name)
    return [(task, n, names[n]) for task, names in tasks.items() for n in group_sizes if n in names]


def column_title(task: str, n: int, metric: str) -> str:
    """``UTKFace 2 imgs (τ ↑)``: the header of a (task, N) column."""
    return f"{TASK_TITLES.get(task, task)} {n} img{'s' if n > 1 else ''} ({_HEADERS.get(metric, metric)})"


def _format(cell: MetricResult) -> str:
    value = f"{100 * cell.value:.2f}" if cell.name == "accuracy" else f"{cell.value:.{2 if cell.name == 'mae' else 3}f}"
    return value if math.isnan(cell.failure_rate) else f"{value} (fail {100 * cell.failure_rate:.1f}%)"


def results_markdown(results: Results, group_sizes: Sequence[int] = (1, 2, 4, 8)) -> str:
    """The paper-shaped table as Markdown: a row per model, a column per (task, N images), each cell
    ``value (fail x%)`` with the parse-failure rate (the value alone where the rate is unknown); missing cells
    are ``-``."""
    cols = table_columns(results, group_sizes)
    head = ["Model"] + [column_title(t, n, m) for t, n, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * len(cols)) + "|"]
    for model, per_task in results.items():
        cells = [_format(per_task[t][n]) if n in per_task.get(t, {}) else "-" for t, n, _ in cols]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    return "\n".join(lines) + "\n"


def results_csv(results: Results, group_sizes: Sequence[int] = (1, 2, 4, 8)) -> str:
    """The same table as CSV: ``model`` then, per (task, N), ``<task>/<N>img/<metric>``,
    ``<task>/<N>img/parse_failure_rate`` and ``<task>/<N>img/count`` (raw values; accuracy as a fraction; an
    unknown failure rate is empty)."""
    cols = table_columns(results, group_sizes)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["model"]
    for t, n, m in cols:
        header += [f"{t}/{n}img/{m}", f"{t}/{n}img/parse_failure_rate", f"{t}/{n}img/count"]
    writer.writerow(header)
    for model, per_task in results.items():
        row: list[object] = [model]
        for t, n, _ in cols:
            cell = per_task.get(t, {}).get(n)
            if cell is None:
                row += ["", "", ""]
            else:
                rate = "" if math.isnan(cell.failure_rate) else repr(cell.failure_rate)
                row += [repr(cell.value), rate, cell.count]
        writer.writerow(row)
    return buf.getvalue()
