"""PNG figures with Pillow only (no matplotlib): a run's training curves and a results table.

``rarl-fast plot RUN_DIR`` (:func:`plot_run`): one panel per metric of ``metrics.jsonl``, the raw values as a thin
line and a moving average as a thick one; stage boundaries are marked. Metrics that were never logged are left
out; the periodic held-out eval's are added. ``rarl-fast report`` (:func:`plot_results`): per task, the 1-image
metric as bars and Kendall tau against the number of images as lines, one colour per row.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rarl_fast.tracking import read_metrics

__all__ = ["DEFAULT_KEYS", "plot_results", "plot_run"]

DEFAULT_KEYS = (
    "reward/total",
    "reward/regression",
    "reward/ranking",
    "parse_failure_rate",
    "rmo/stagnant_before",
    "rmo/mutated",
    "loss",
    "loss/kl_mean",
    "loss/clip_ratio",
    "loss/entropy_mean",
    "response_length",
    "grad_norm",
    "sft/loss",
)

_W, _H, _PAD = 420, 240, 40


def _moving_average(values: Sequence[float], window: int, restart: Sequence[bool] = ()) -> list[float]:
    """Trailing mean over ``window`` values; it starts afresh where ``restart`` is True (a new stage)."""
    out, acc = [], []
    for i, v in enumerate(values):
        if i < len(restart) and restart[i]:
            acc = []
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _panel(draw: Any, box: tuple[int, int], title: str, xs: list[int], ys: list[float], marks: list[int]) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default()
    x0, y0 = box
    left, top, right, bottom = x0 + _PAD, y0 + 22, x0 + _W - 10, y0 + _H - 24
    draw.rectangle([x0, y0, x0 + _W - 1, y0 + _H - 1], outline=(210, 210, 210))
    draw.text((x0 + 8, y0 + 5), title, fill=(0, 0, 0), font=font)
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def pt(x: float, y: float) -> tuple[float, float]:
        return (left + (x - xmin) / (xmax - xmin) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))

    draw.line([left, bottom, right, bottom], fill=(120, 120, 120))
    draw.line([left, top, left, bottom], fill=(120, 120, 120))
    for m in marks:
        if xmin < m < xmax:
            x, _ = pt(m, lo)
            draw.line([x, top, x, bottom], fill=(240, 160, 160))
    draw.text((x0 + 2, top - 4), f"{hi:.3g}", fill=(90, 90, 90), font=font)
    draw.text((x0 + 2, bottom - 8), f"{lo:.3g}", fill=(90, 90, 90), font=font)
    draw.text((left, bottom + 6), f"{xmin}", fill=(90, 90, 90), font=font)
    draw.text((right - 30, bottom + 6), f"{xmax}", fill=(90, 90, 90), font=font)
    if len(xs) > 1:
        draw.line([pt(x, y) for x, y in zip(xs, ys)], fill=(150, 180, 230), width=1)
        smooth = _moving_average(ys, max(1, len(ys) // 10), [x in marks for x in xs])
        draw.line([pt(x, y) for x, y in zip(xs, smooth)], fill=(20, 70, 170), width=3)
    else:
        x, y = pt(xs[0], ys[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 70, 170))


def plot_run(run_dir: str | Path, out: str | Path | None = None, keys: Sequence[str] = DEFAULT_KEYS) -> Path:
    """Render the run's curves to ``out`` (default ``RUN_DIR/curves.png``); returns the path. The periodic
    held-out eval's metrics (``eval/...``) get panels after ``keys`` whenever they were logged."""
    from PIL import Image, ImageDraw

    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"no metrics.jsonl lines in {run_dir}")
    keys = list(keys) + sorted({k for r in rows for k in r if k.startswith("eval/")} - set(keys))
    series = []
    for key in keys:
        pts = [(int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), int | float) and "step" in r]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if pts:
            series.append((key, pts))
    if not series:
        raise ValueError(f"none of {list(keys)} was logged in {run_dir}")
    marks = [int(b["step"]) for a, b in itertools.pairwise(rows) if a.get("stage") != b.get("stage") and "step" in b]
    cols = 3
    nrows = math.ceil(len(series) / cols)
    image = Image.new("RGB", (cols * _W, nrows * _H + 30), "white")
    draw = ImageDraw.Draw(image)
    steps = len({r.get("step") for r in rows})  # an eval line shares its step with a training line
    draw.text((10, 8), f"{Path(run_dir).name}: {steps} logged steps (red: stage change)", fill=(0, 0, 0))
    for i, (key, pts) in enumerate(series):
        _panel(draw, ((i % cols) * _W, 30 + (i // cols) * _H), key, [p[0] for p in pts], [p[1] for p in pts], marks)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
_LEGEND_W = 330
Colour = tuple[int, int, int]


def _bars(draw: Any, box: tuple[int, int], title: str, bars: list[tuple[Colour, float, bool]]) -> None:
    """Horizontal bars of (colour, value, published) from 0 (values below 0 are drawn as 0, labelled)."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    x0, y0 = box
    draw.rectangle([x0, y0, x0 + _W - 1, y0 + _H - 1], outline=(210, 210, 210))
    draw.text((x0 + 8, y0 + 5), title, fill=(0, 0, 0), font=font)
    if not bars:
        return
    left, right, top = x0 + 12, x0 + _W - 70, y0 + 24
    step = min(22, (_H - 32) // len(bars))
    hi = max(max(v for _, v, _ in bars), 1e-12)
    for i, (colour, value, published) in enumerate(bars):
        y = top + i * step
        x = left + max(value, 0.0) / hi * (right - left)
        if published:
            draw.rectangle([left, y, x, y + step - 5], outline=colour, width=2)
        else:
            draw.rectangle([left, y, x, y + step - 5], fill=colour)
        draw.text((x + 4, y), f"{value:.3g}", fill=(60, 60, 60), font=font)


def _lines(draw: Any, box: tuple[int, int], title: str, series: list[tuple[Colour, dict[int, float], bool]]) -> None:
    """Kendall tau against N: a polyline per row, filled markers for ours and hollow ones for published rows."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    x0, y0 = box
    left, top, right, bottom = x0 + _PAD, y0 + 22, x0 + _W - 16, y0 + _H - 24
    draw.rectangle([x0, y0, x0 + _W - 1, y0 + _H - 1], outline=(210, 210, 210))
    draw.text((x0 + 8, y0 + 5), title, fill=(0, 0, 0), font=font)
    ns = sorted({n for _, pts, _ in series for n in pts})
    if not ns:
        return
    values = [v for _, pts, _ in series for v in pts.values()]
    lo, hi = min([0.0, *values]), max([1.0, *values])

    def pt(n: int, v: float) -> tuple[float, float]:
        x = left + (ns.index(n) + 0.5) / len(ns) * (right - left)
        return x, bottom - (v - lo) / (hi - lo) * (bottom - top)

    for tick in (lo, (lo + hi) / 2, hi):
        _, y = pt(ns[0], tick)
        draw.line([left, y, right, y], fill=(230, 230, 230))
        draw.text((x0 + 4, y - 6), f"{tick:.2g}", fill=(90, 90, 90), font=font)
    for n in ns:
        x, _ = pt(n, lo)
        draw.text((x - 12, bottom + 6), f"N={n}", fill=(90, 90, 90), font=font)
    for colour, pts, published in series:
        xy = [pt(n, pts[n]) for n in ns if n in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=1 if published else 3)
        for x, y in xy:
            if published:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=colour, width=2)
            else:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)


def plot_results(results: Any, out: str | Path, *, published: Sequence[str] = ()) -> Path:
    """The results table (model -> task -> N -> cell, :mod:`rarl_fast.metrics`) as one PNG at ``out``: a line of
    two panels per task, then a legend; rows named in ``published`` are drawn hollow. Returns the path."""
    from PIL import Image, ImageDraw

    from rarl_fast.metrics import TASK_TITLES

    rows = list(results)
    colour = {row: _PALETTE[i % len(_PALETTE)] for i, row in enumerate(rows)}
    tasks = list(dict.fromkeys(t for per_task in results.values() for t in per_task))
    height = max(len(tasks) * _H, 22 * len(rows) + 20) + 30
    image = Image.new("RGB", (2 * _W + _LEGEND_W, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), "Results: 1-image metric (bars) and Kendall tau (lines); hollow = published", fill=(0, 0, 0))
    for i, task in enumerate(tasks):
        y = 30 + i * _H
        title = TASK_TITLES.get(task, task)
        bars, names = [], []
        for row in rows:
            cell = results[row].get(task, {}).get(1)
            if cell is not None:
                bars.append((colour[row], cell.value, row in published))
                names.append(cell.name)
        metric = names[0] if names else ""
        better = " (lower is better)" if metric == "mae" else ""
        _bars(draw, (0, y), f"{title} 1 img: {metric}{better}", bars)
        series = [
            (colour[row], {n: c.value for n, c in results[row].get(task, {}).items() if n >= 2}, row in published)
            for row in rows
        ]
        _lines(draw, (_W, y), f"{title}: Kendall tau vs images per prompt", [s for s in series if s[1]])
    for j, row in enumerate(rows):
        x, y = 2 * _W + 12, 34 + 22 * j
        if row in published:
            draw.rectangle([x, y, x + 14, y + 14], outline=colour[row], width=2)
        else:
            draw.rectangle([x, y, x + 14, y + 14], fill=colour[row])
        draw.text((x + 22, y + 2), row if len(row) <= 48 else row[:45] + "...", fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
