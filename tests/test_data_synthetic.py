"""The embedded synthetic benchmark: deterministic, frozen, and its pixels encode exactly the stated value."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from rarl_fast.config_loader import load_config
from rarl_fast.data import SyntheticImage, load_task
from rarl_fast.data.synthetic import load_synthetic, synthetic_samples

# Version 1 of the definition, seed 0. If these change, the benchmark changed: that needs its own issue.
FROZEN_VALUES = {
    ("shapes", "train"): [7.0, 0.0, 7.0, 6.0, 9.0, 9.0, 2.0, 3.0, 2.0, 0.0],
    ("shapes", "test"): [8.0, 1.0, 1.0, 8.0, 5.0, 3.0, 5.0, 6.0, 1.0, 7.0],
    ("bar", "train"): [3.6, 7.0, 2.4, 1.1, 8.3, 9.8, 6.2, 7.6, 4.3, 2.8],
    ("bar", "test"): [5.3, 3.0, 1.6, 7.1, 9.6, 6.5, 2.6, 5.8, 9.6, 7.1],
}
FROZEN_BAR_LAYOUT = {
    "size": (112, 56),
    "background": (255, 255, 255),
    "bar": {"x0": 44, "y0": 13, "length": 36, "thickness": 16, "colour": (0, 0, 0)},
}
FROZEN_SHAPES_FIRST = {"kind": "square", "r": 6, "colour": (0, 0, 0), "cx": 17, "cy": 12}


@pytest.mark.parametrize("task, split", list(FROZEN_VALUES))
def test_definition_is_frozen(task: str, split: str):
    assert [s.value for s in synthetic_samples(task, split, 10, seed=0)] == FROZEN_VALUES[(task, split)]


def test_layouts_are_frozen():
    assert synthetic_samples("bar", "train", 1, 0)[0].image.layout() == FROZEN_BAR_LAYOUT
    shapes = synthetic_samples("shapes", "train", 1, 0)[0].image.layout()
    assert shapes["size"] == (84, 84) and shapes["background"] == (255, 255, 255)
    assert len(shapes["shapes"]) == 7 and shapes["shapes"][0] == FROZEN_SHAPES_FIRST


def _dark(im) -> np.ndarray:
    """[H, W] bool: ink pixels (black on white)."""
    return np.asarray(im).max(axis=2) == 0


@pytest.mark.parametrize("split", ["train", "test"])
def test_shapes_pixels_hold_exactly_value_blobs(split: str):
    for sample in synthetic_samples("shapes", split, 60, seed=5):
        im = sample.image.render()
        assert im.size == (84, 84) and im.mode == "RGB"
        dark = _dark(im)
        assert ((np.asarray(im).min(axis=2) == 255) | dark).all()  # nothing but paper and ink
        labels, blobs = ndimage.label(dark, structure=np.ones((3, 3)))
        assert blobs == sample.value, sample.sample_id
        assert all(np.ptp(np.argwhere(labels == i), axis=0).tolist() == [12, 12] for i in range(1, blobs + 1))


@pytest.mark.parametrize("split", ["train", "test"])
def test_bar_pixels_are_ten_times_the_value_long(split: str):
    for sample in synthetic_samples("bar", split, 60, seed=5):
        im = sample.image.render()
        assert im.size == (112, 56)
        cols = np.flatnonzero(_dark(im).any(axis=0))
        rows = np.flatnonzero(_dark(im).any(axis=1))
        assert len(cols) == round(10 * sample.value) and cols[-1] - cols[0] + 1 == len(cols)
        assert cols[0] >= 6 and cols[-1] <= 105 and len(rows) == 16 and rows[0] >= 4 and rows[-1] <= 51
        assert int(_dark(im).sum()) == 16 * len(cols)  # a solid rectangle


def test_deterministic_and_seeded():
    a = synthetic_samples("shapes", "train", 30, seed=1)
    b = synthetic_samples("shapes", "train", 30, seed=1)
    assert a == b
    assert a[3].image.render().tobytes() == b[3].image.render().tobytes()
    assert [s.value for s in synthetic_samples("shapes", "train", 30, seed=2)] != [s.value for s in a]
    spec = a[0].image
    tampered = SyntheticImage(spec.task, spec.split, spec.seed, spec.index, spec.value + 1)
    with pytest.raises(ValueError, match="does not match"):
        tampered.layout()


def test_splits_are_separate_streams_and_values_cover_the_range():
    train, test, report = load_synthetic("shapes", train_size=2000, test_size=300, seed=0)
    assert report.counts == {"train": 2000, "test": 300} and not report.skipped
    assert not {s.sample_id for s in train} & {s.sample_id for s in test}
    assert {s.value for s in train} == set(map(float, range(10)))
    bars = synthetic_samples("bar", "train", 2000, seed=0)
    values = {s.value for s in bars}
    assert min(values) == 0.5 and max(values) == 10.0 and len(values) > 90
    assert all(abs(v * 10 - round(v * 10)) < 1e-9 for v in values)


@pytest.mark.parametrize(
    "name, rule, value_range, tolerance, metric, bounds",
    [
        ("shapes", "number of shapes", "an integer from 0 to 9", 2.0, "accuracy", (0.0, 9.0)),
        ("bar", "length of the bar", "a number from 0 to 10", 1.0, "mae", (0.0, 10.0)),
    ],
)
def test_task_defaults_through_the_config(name, rule, value_range, tolerance, metric, bounds):
    cfg = load_config(
        None, [f"data.synthetic_task={name}", "data.synthetic_train_size=20", "data.synthetic_test_size=10"]
    )
    assert cfg.tolerance() == tolerance
    task = load_task(cfg.data)
    assert task.task == f"synthetic:{name}"
    assert (task.rule, task.value_range, task.tolerance, task.metric) == (rule, value_range, tolerance, metric)
    assert (task.value_min, task.value_max) == bounds and task.midpoint == sum(bounds) / 2
    assert len(task.train) == 20 and len(task.test) == 10
    assert load_task(cfg.data, tolerance=3.5).tolerance == 3.5


def test_rendered_sizes_need_no_resampling_by_the_processor():
    from rarl_fast.data.images import resized_size

    for task in ("shapes", "bar"):
        im = synthetic_samples(task, "train", 1, 0)[0].image.render()
        for lo, hi in ((56 * 56, 112 * 112), (56 * 56, 448 * 448)):
            assert resized_size(im.height, im.width, min_pixels=lo, max_pixels=hi) == (im.height, im.width)
