"""Batched Kendall tau-b against scipy.stats.kendalltau (docs/method.md section 3)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import kendalltau

from rarl_fast.rewards import kendall, kendall_tau_b


def _scipy(x, y, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kendalltau(x, y, variant="b", axis=axis).statistic


def _embed(xs: list[np.ndarray], ys: list[np.ndarray], width: int, rng: np.random.Generator):
    """Scatter each case's (x, y), in order, into random columns of [B, width] tensors with garbage elsewhere."""
    lengths = torch.tensor([len(r) for r in xs])
    rank = torch.as_tensor(rng.random((len(xs), width))).argsort(dim=1).argsort(dim=1)
    valid = rank < lengths.unsqueeze(1)  # a random subset of `length` columns per row
    x = torch.as_tensor(rng.normal(size=(len(xs), width)) * 1e6, dtype=torch.float64)
    y = torch.as_tensor(rng.normal(size=(len(xs), width)), dtype=torch.float64)
    x[valid] = torch.as_tensor(np.concatenate(xs), dtype=torch.float64)  # row-major: each row's values in order
    y[valid] = torch.as_tensor(np.concatenate(ys), dtype=torch.float64)
    return x, y, valid


def test_ten_thousand_random_cases_with_ties():
    """>= 10,000 cases: lengths 0..12, heavy ties (values from a few levels), all-tied rows, gaps in `valid`."""
    rng = np.random.default_rng(0)
    width, per_length = 16, 800
    xs, ys, want = [], [], []
    for length in range(13):
        levels_x = rng.choice([1, 2, 3, 4, 8, 1 << 20], size=(per_length, 1), p=[0.05, 0.15, 0.2, 0.2, 0.2, 0.2])
        levels_y = rng.choice([1, 2, 3, 4, 8, 1 << 20], size=(per_length, 1), p=[0.05, 0.15, 0.2, 0.2, 0.2, 0.2])
        x = rng.integers(0, 1 << 30, size=(per_length, length)) % levels_x
        y = (rng.integers(0, 1 << 30, size=(per_length, length)) % levels_y).astype(np.float64)
        y[: per_length // 8] = rng.normal(size=(per_length // 8, length))  # some rows without ties
        ref = _scipy(x, y, axis=1) if length else np.full(per_length, np.nan)
        xs += list(x)
        ys += list(y)
        want += list(np.atleast_1d(ref))
    assert len(want) >= 10_000
    x_t, y_t, valid = _embed(xs, ys, width, rng)
    got = kendall_tau_b(x_t, y_t, valid)
    want_t = torch.tensor(want, dtype=torch.float64)
    finite = torch.isfinite(want_t)
    assert got.dtype == torch.float64 and got.shape == (len(want),)
    assert int(finite.sum()) > 7_000 and int((~finite).sum()) > 500, (int(finite.sum()), int((~finite).sum()))
    torch.testing.assert_close(got[finite], want_t[finite], atol=1e-6, rtol=0)
    assert bool((got[~finite] == 0).all())


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(-3, 3), st.floats(allow_nan=False), st.sampled_from([math.inf, -math.inf])),
            st.one_of(st.integers(-3, 3), st.floats(allow_nan=False, width=32)),
            st.booleans(),
        ),
        max_size=12,
    )
)
def test_property_matches_scipy(cols):
    x = torch.tensor([float(c[0]) for c in cols], dtype=torch.float64).reshape(1, -1)
    y = torch.tensor([float(c[1]) for c in cols], dtype=torch.float64).reshape(1, -1)
    valid = torch.tensor([c[2] for c in cols], dtype=torch.bool).reshape(1, -1)
    got = kendall_tau_b(x, y, valid).item()
    xv, yv = x[valid].numpy(), y[valid].numpy()
    want = _scipy(xv, yv) if len(xv) >= 2 else math.nan
    if math.isfinite(want):
        assert got == pytest.approx(want, abs=1e-6)
        assert -1.0 <= got <= 1.0
    else:
        assert got == 0.0


@pytest.mark.parametrize("length", [2, 3, 8, 31, 64])
def test_exact_extremes(length):
    pos = torch.arange(length, dtype=torch.float64).expand(2, -1)
    vals = torch.stack([pos[0] * 2.5 + 1, -(pos[0] ** 3)])
    assert kendall_tau_b(pos, vals).tolist() == [1.0, -1.0]


def test_undefined_is_zero():
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [5.0, 6.0, 7.0]])
    y = torch.tensor([[4.0, 4.0, 4.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    valid = torch.tensor([[True] * 3, [True] * 3, [True, False, False], [False] * 3])
    assert kendall_tau_b(x, y, valid).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert kendall_tau_b(torch.zeros(3, 0), torch.zeros(3, 0)).tolist() == [0.0] * 3
    assert kendall_tau_b(torch.zeros(0, 5), torch.zeros(0, 5)).shape == (0,)


def test_integer_inputs_and_default_valid():
    x = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    y = torch.tensor([[1, 3, 2, 4], [1, 3, 2, 4]])
    assert kendall_tau_b(x, y).tolist() == pytest.approx([_scipy([1, 2, 3, 4], [1, 3, 2, 4]), -2 / 3])


def test_chunked_path_matches_single_call(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4, (257, 9), generator=gen).double()
    y = torch.randint(0, 4, (257, 9), generator=gen).double()
    valid = torch.rand(257, 9, generator=gen) < 0.8
    whole = kendall_tau_b(x, y, valid)
    monkeypatch.setattr(kendall, "_CHUNK_ELEMENTS", 81 * 10)
    torch.testing.assert_close(kendall_tau_b(x, y, valid), whole, atol=0, rtol=0)


def test_width_buckets_match_per_row_scipy():
    """Rows of widths 0..40 in one batch (several buckets) each equal scipy on their own valid columns."""
    gen = torch.Generator().manual_seed(2)
    rows, length = 120, 40
    x = torch.randint(0, 6, (rows, length), generator=gen).double()
    y = torch.randn(rows, length, generator=gen, dtype=torch.float64).round(decimals=1)
    width = torch.arange(rows) % (length + 1)
    valid = (torch.arange(length) < width.unsqueeze(1)) & (torch.rand(rows, length, generator=gen) < 0.9)
    got = kendall_tau_b(x, y, valid)
    for b in range(rows):
        xv, yv = x[b, valid[b]].numpy(), y[b, valid[b]].numpy()
        want = _scipy(xv, yv) if len(xv) >= 2 else math.nan
        assert got[b].item() == (pytest.approx(want, abs=1e-12) if math.isfinite(want) else 0.0), b


@pytest.mark.parametrize(
    ("x", "y", "valid"),
    [((2, 3), (2, 4), None), ((3,), (3,), None), ((2, 3), (2, 3), (2, 2))],
    ids=["shape-mismatch", "1d", "valid-shape"],
)
def test_bad_shapes_raise(x, y, valid):
    with pytest.raises(ValueError):
        kendall_tau_b(torch.zeros(x), torch.zeros(y), None if valid is None else torch.ones(valid, dtype=torch.bool))
