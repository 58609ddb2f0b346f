"""The embedded synthetic ordinal benchmark (version 1, frozen: changing it needs its own issue).

Two tasks of different kinds, drawn with Pillow, deterministic by seed, needing no files: black ink
(0, 0, 0) on white paper (255, 255, 255). They are sized for the tiny VLM: images are small multiples of
28 px (8 or 9 visual tokens each at their own size), and every object has a fixed size, so the amount of ink
is proportional to the value; what varies is where the objects are (and, for counting, their kind). The
objects are large so that a 1 M-parameter model can learn to see them. ``configs/demo_cpu.yaml`` also has the
processor upscale every image 2x (``min_pixels`` = 168 * 168: 36 visual tokens for ``shapes``): the tiny VLM
reads an image only when its tokens are a sizeable share of the ~190-token prompt.

Randomness: sample ``index`` of split ``split`` (train = 0, test = 1) of task ``t`` (shapes = 1, bar = 2)
under seed ``s`` uses ``numpy.random.default_rng([1, t, split, s mod 2**64, index])``; the value is its first
draw and the layout the draws after it, in the order written below. Train and test are separate streams.

``shapes`` (a count; rule "number of shapes", "an integer from 0 to 9", tolerance 2, 1-image metric accuracy)
    84 x 84 px (9 visual tokens). Draws: k = integers(0, 10) (the value, uniform on 0..9); then k shapes,
    each: kind = circle if random() < 0.5 else square; then centre x, centre y = integers(8, 76) each
    (half-size r = 6: the box [c - 6, c + 6] is 13 x 13 px within 2..81), redrawn (up to 1000 times) until the
    box leaves at least 3 empty pixel columns or rows to every earlier shape's box; if a shape finds no
    place, all shapes are discarded and placement starts over with the next draws. Circles are
    ``ImageDraw.ellipse`` and squares ``ImageDraw.rectangle`` on that box, filled, no outline. The shapes
    never touch, so the number of connected ink blobs is the value.

``bar`` (a length; rule "length of the bar", "a number from 0 to 10", tolerance 1, 1-image metric MAE)
    112 x 56 px (width x height; 8 visual tokens). Draws: L = integers(5, 101) (bar length in px, uniform on
    5..100; the value is L / 10, so 0.5..10.0 in steps of 0.1); left column x0 = integers(6, 107 - L); top
    row y0 = integers(4, 37). The bar is the filled rectangle of columns x0..x0 + L - 1 and rows
    y0..y0 + 15 (16 px thick), so it lies within columns 6..105 and rows 4..51, and its length (horizontal
    extent, whatever its thickness) in pixels is exactly 10 * value.

Pixels are exact for a given Pillow version; the values and layouts (:meth:`SyntheticImage.layout`) are exact
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from rarl_fast.data.samples import LoadReport, Sample

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["SYNTHETIC_TASKS", "SYNTHETIC_VERSION", "SyntheticImage", "load_synthetic", "synthetic_samples"]

SYNTHETIC_VERSION = 1
SyntheticTask = Literal["shapes", "bar"]
SYNTHETIC_TASKS: dict[str, int] = {"shapes": 1, "bar": 2}
_SPLITS = {"train": 0, "test": 1}

_SHAPES_SIZE = (84, 84)
_BAR_SIZE = (112, 56)  # (width, height)
_SHAPE_HALF_SIZE = 6  # every shape's box is 13 x 13 px
_BAR_THICKNESS = 16
_GAP = 3  # empty pixels required between two shapes' boxes
_MAX_TRIES = 1000
_PAPER = (255, 255, 255)
_INK = (0, 0, 0)


def _rng(task: str, split: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([SYNTHETIC_VERSION, SYNTHETIC_TASKS[task], _SPLITS[split], seed % 2**64, index])


def _draw_value(task: str, rng: np.random.Generator) -> float:
    if task == "shapes":
        return float(rng.integers(0, 10))
    return int(rng.integers(5, 101)) / 10


def _shapes_layout(rng: np.random.Generator, k: int) -> dict[str, Any]:
    width, height = _SHAPES_SIZE
    r = _SHAPE_HALF_SIZE
    shapes: list[dict[str, Any]] = []
    while len(shapes) < k:
        kind = "circle" if rng.random() < 0.5 else "square"
        for _ in range(_MAX_TRIES):
            cx = int(rng.integers(2 + r, width - 2 - r))
            cy = int(rng.integers(2 + r, height - 2 - r))
            if all(abs(cx - o["cx"]) > 2 * r + _GAP or abs(cy - o["cy"]) > 2 * r + _GAP for o in shapes):
                shapes.append({"kind": kind, "r": r, "colour": _INK, "cx": cx, "cy": cy})
                break
        else:
            shapes.clear()
    return {"size": _SHAPES_SIZE, "background": _PAPER, "shapes": shapes}


def _bar_layout(rng: np.random.Generator, length: int) -> dict[str, Any]:
    width, height = _BAR_SIZE
    x0 = int(rng.integers(6, width - 5 - length))
    y0 = int(rng.integers(4, height - 3 - _BAR_THICKNESS))
    bar = {"x0": x0, "y0": y0, "length": length, "thickness": _BAR_THICKNESS, "colour": _INK}
    return {"size": _BAR_SIZE, "background": _PAPER, "bar": bar}


@dataclass(frozen=True)
class SyntheticImage:
    """The recipe of one synthetic image: rendering it twice gives the same pixels.

    Attributes:
        task: ``shapes`` or ``bar``.
        split: ``train`` or ``test``.
        seed: the dataset seed.
        index: the sample's index in its split.
        value: its true value (the first draw of its generator; kept here so groups need no rendering).
    """

    task: str
    split: str
    seed: int
    index: int
    value: float

    def layout(self) -> dict[str, Any]:
        """Everything that is drawn: canvas ``size`` (w, h), ``background``, and ``shapes`` or ``bar``."""
        rng = _rng(self.task, self.split, self.seed, self.index)
        value = _draw_value(self.task, rng)
        if value != self.value:
            raise ValueError(f"{self} does not match its generator (value {value}); was the spec edited?")
        if self.task == "shapes":
            return _shapes_layout(rng, int(value))
        return _bar_layout(rng, round(value * 10))

    def render(self) -> Image.Image:
        """The RGB image (84 x 84 for shapes, 112 x 56 for bar)."""
        from PIL import Image, ImageDraw

        spec = self.layout()
        im = Image.new("RGB", spec["size"], spec["background"])
        draw = ImageDraw.Draw(im)
        for s in spec.get("shapes", ()):
            box = (s["cx"] - s["r"], s["cy"] - s["r"], s["cx"] + s["r"], s["cy"] + s["r"])
            (draw.ellipse if s["kind"] == "circle" else draw.rectangle)(box, fill=s["colour"])
        if "bar" in spec:
            b = spec["bar"]
            draw.rectangle(
                (b["x0"], b["y0"], b["x0"] + b["length"] - 1, b["y0"] + b["thickness"] - 1), fill=b["colour"]
            )
        return im


def synthetic_samples(task: str, split: str, size: int, seed: int) -> list[Sample]:
    """The first ``size`` samples of a synthetic task's split (ids ``<task>-<split>-<index>``)."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(SYNTHETIC_TASKS)}")
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    out = []
    for i in range(size):
        value = _draw_value(task, _rng(task, split, seed, i))
        spec = SyntheticImage(task=task, split=split, seed=seed, index=i, value=value)
        out.append(Sample(sample_id=f"{task}-{split}-{i:06d}", value=value, image=spec))
    return out


def load_synthetic(
    task: str, *, train_size: int, test_size: int, seed: int
) -> tuple[list[Sample], list[Sample], LoadReport]:
    """Train and test samples of synthetic ``task`` and a report (nothing is skipped: the data is generated)."""
    train = synthetic_samples(task, "train", train_size, seed)
    test = synthetic_samples(task, "test", test_size, seed)
    report = LoadReport(source=f"synthetic:{task} (version {SYNTHETIC_VERSION}, seed {seed})")
    report.counts = {"train": len(train), "test": len(test)}
    return train, test, report
