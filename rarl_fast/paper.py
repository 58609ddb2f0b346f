"""The method paper's published results (``paper_results.yaml`` beside this module) as table cells.

``rarl-fast report --paper`` puts these rows beside ours for the benchmarks and model sizes of our runs. The
file holds only numbers transcribed from the paper, each with its table; rows not transcribed are absent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from rarl_fast.config import TASK_DEFAULTS
from rarl_fast.metrics import MetricResult

__all__ = ["PaperRow", "model_size", "paper_rows"]

_SIZE_RE = re.compile(r"(?<![0-9.])(\d+(?:\.\d+)?)[Bb](?![A-Za-z0-9])")
"""A parameter count such as ``3B`` or ``7b`` inside a model name."""


@dataclass(frozen=True)
class PaperRow:
    """One published row: ``values`` maps N to the number as printed (accuracy in percent)."""

    benchmark: str
    model: str
    variant: str
    label: str
    table: int
    values: dict[int, float]

    def cells(self) -> dict[int, MetricResult]:
        """The row as table cells (accuracy as a fraction, as our cells hold it); the paper gives no failure
        rate and no count, so they are NaN and 0."""
        metric = TASK_DEFAULTS[self.benchmark]["metric"]
        out = {}
        for n, v in sorted(self.values.items()):
            name = metric if n == 1 else "kendall_tau"
            out[n] = MetricResult(name, v / 100 if name == "accuracy" else v, math.nan, 0)
        return out


def model_size(name_or_path: str) -> str | None:
    """``3B`` for ``Qwen/Qwen2.5-VL-3B-Instruct`` (the last path part's parameter count); None when it names none."""
    found = _SIZE_RE.findall(Path(name_or_path).name)
    return f"{found[-1]}B" if found else None


def _load(path: Path | None = None) -> list[PaperRow]:
    text = path.read_text() if path else resources.files("rarl_fast").joinpath("paper_results.yaml").read_text()
    rows = []
    for i, r in enumerate(yaml.safe_load(text)["rows"]):
        if r["benchmark"] not in TASK_DEFAULTS or any(int(n) not in (1, 2, 4, 8) for n in r["values"]):
            raise ValueError(f"paper_results.yaml row {i}: unknown benchmark or N in {r}")
        values = {int(n): float(v) for n, v in r["values"].items()}
        rows.append(PaperRow(r["benchmark"], str(r["model"]), r["variant"], r["label"], int(r["table"]), values))
    return rows


def paper_rows(benchmark: str, size: str | None = None, *, path: Path | None = None) -> list[PaperRow]:
    """The published rows of ``benchmark`` (a ``data.task``) for model ``size`` (``3B``); every size when ``size``
    is None (a model whose name gives none, such as a local folder)."""
    return [r for r in _load(path) if r.benchmark == benchmark and (size is None or r.model == size)]
