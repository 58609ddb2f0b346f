"""Group-normalized GRPO advantages (docs/method.md section 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rarl_fast.rl import group_advantages, group_std


def _manual(rows: list[list[float]], scale_by_std: bool, unbiased: bool, eps: float = 1e-6) -> list[np.ndarray]:
    out = []
    for r in rows:
        r = np.asarray(r, dtype=np.float64)
        centered = r - r.mean()
        if scale_by_std:
            std = r.std(ddof=int(unbiased)) if len(r) > int(unbiased) else 0.0
            centered = centered / (std + eps)
        out.append(centered)
    return out


@pytest.mark.parametrize("scale_by_std", [True, False], ids=["grpo", "dr_grpo"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["population", "bessel"])
def test_matches_formula(scale_by_std, unbiased):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(6, 8, generator=gen, dtype=torch.float64)
    rewards[2] = 0.25  # a stagnant group
    got = group_advantages(rewards, scale_by_std=scale_by_std, unbiased=unbiased)
    want = np.stack(_manual(rewards.tolist(), scale_by_std, unbiased))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    assert got.shape == (6, 8) and got.dtype == torch.float64
    assert bool((got[2] == 0).all())
    np.testing.assert_allclose(got.sum(dim=1).numpy(), 0.0, atol=1e-12)


def test_default_is_population_std_with_eps():
    rewards = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    got = group_advantages(rewards)
    assert got[0].tolist() == pytest.approx([-0.5 / (0.5 + 1e-6), 0.5 / (0.5 + 1e-6)], abs=1e-15)
    assert group_std(rewards).item() == 0.5
    assert group_std(rewards, unbiased=True).item() == pytest.approx(2**-0.5)


@pytest.mark.parametrize("unbiased", [False, True])
def test_flat_layout_matches_grouped(unbiased):
    gen = torch.Generator().manual_seed(3)
    rewards = torch.rand(5, 4, generator=gen, dtype=torch.float64)
    grouped = group_advantages(rewards, unbiased=unbiased)
    perm = torch.randperm(20, generator=gen)
    flat = rewards.flatten()[perm]
    index = torch.arange(5).repeat_interleave(4)[perm]
    got = group_advantages(flat, index, unbiased=unbiased)
    torch.testing.assert_close(got, grouped.flatten()[perm], atol=1e-12, rtol=0)
    torch.testing.assert_close(group_advantages(flat, index, 5, unbiased=unbiased), got, atol=0, rtol=0)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_flat_layout_unequal_groups(scale_by_std):
    rows = [[0.1, 0.9, 0.4], [0.7], [0.2, 0.2, 0.2, 0.2, 0.8], [0.5, 0.0]]
    flat = torch.tensor([v for r in rows for v in r], dtype=torch.float64)
    index = torch.tensor([g for g, r in enumerate(rows) for _ in r])
    for unbiased in (False, True):
        got = group_advantages(flat, index, scale_by_std=scale_by_std, unbiased=unbiased)
        want = np.concatenate(_manual(rows, scale_by_std, unbiased))
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
        assert bool(torch.isfinite(got).all())


def test_single_response_group_is_zero_not_nan():
    one = torch.tensor([[0.3]], dtype=torch.float64)
    assert group_advantages(one, unbiased=True).tolist() == [[0.0]]
    assert group_std(one, unbiased=True).tolist() == [0.0]
    assert group_advantages(torch.tensor([0.3]), torch.tensor([0]), unbiased=True).tolist() == [0.0]


def test_keeps_dtype_and_shape_errors():
    r32 = torch.rand(2, 3)
    assert group_advantages(r32).dtype == torch.float32
    with pytest.raises(ValueError):
        group_advantages(torch.rand(6))
    with pytest.raises(ValueError):
        group_advantages(torch.rand(6), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        group_std(torch.rand(6))
