"""``rarl-fast plot RUN_DIR``: the training curves of ``metrics.jsonl`` as one PNG (Pillow only, no matplotlib).

One panel per metric: the raw values as a thin line and a moving average as a thick one; stage boundaries
are marked. Metrics that were never logged are left out; the periodic held-out eval's are added.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rarl_fast.tracking import read_metrics

__all__ = ["DEFAULT_KEYS", "plot_run"]

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
