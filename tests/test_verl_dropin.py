"""verl drop-in: our `linear_cross_entropy` and `FusedLinearForPPO` against verl 0.9.1's own torch implementation,
and `patch_verl()` on verl's own modules.

verl pins transformers<5.11 and its package __init__ imports ray, so it is not installed: `make trainers` downloads
its wheel (tests/data/trainer_releases.txt) and the tests import verl's module files straight from the wheel
(zipimport), with empty packages standing in for `verl`, `verl.utils`, ... so that verl's __init__ never runs.
Nothing of verl's is copied into the project.
"""

import importlib
import sys
import types

import pytest
import torch

from rarl_kernels.integrations import verl as ours
from tests.helpers import trainer_releases

VERL_VERSION = "0.9.1"
PACKAGES = ("verl", "verl.utils", "verl.utils.kernel", "verl.utils.experimental")


@pytest.fixture
def verl():
    """verl's modules from its wheel, without the packages' __init__ (dropped again afterwards)."""
    wheel = trainer_releases.wheel("verl", VERL_VERSION)
    if wheel is None:
        pytest.skip(f"verl {VERL_VERSION} {trainer_releases.MISSING}")
    with trainer_releases.packages_from_wheel(wheel, PACKAGES):
        yield types.SimpleNamespace(
            torch_functional=importlib.import_module("verl.utils.experimental.torch_functional"),
            linear_cross_entropy=importlib.import_module("verl.utils.kernel.linear_cross_entropy"),
        )


def inputs(shape, H, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, shape, generator=g)
    upstream = torch.randn(2, *shape, generator=g)
    return hidden, weight, labels, upstream


def grads(logp, entropy, upstream, params):
    shape = upstream.shape[1:]
    loss = (logp.reshape(shape) * upstream[0]).sum() + (entropy.reshape(shape) * upstream[1]).sum()
    return torch.autograd.grad(loss, params)


def assert_close(a, r, name):
    """Within 1e-5 of the largest value (fp32)."""
    torch.testing.assert_close(a, r, rtol=0, atol=1e-5 * max(r.abs().max().item(), 1e-30), msg=name)


SHAPES = [
    pytest.param((1, 37), 64, 1000, 0.7, id="remove-padding-1x37-V1000-T0.7"),
    pytest.param((3, 21), 72, 513, 1.3, id="3x21-V513-T1.3"),
    pytest.param((50,), 32, 300, 1.0, id="2d-50-V300"),
]


@pytest.mark.parametrize("shape,H,V,temperature", SHAPES)
def test_linear_cross_entropy_matches_verls_torch_implementation(verl, shape, H, V, temperature):
    """Our `linear_cross_entropy` (verl's Triton-backend signature) against verl's torch backend,
    `FusedLinearForPPOFunction`: log-probs, entropies and their gradients w.r.t. hidden and weight (fp32)."""
    hidden, weight, labels, upstream = inputs(shape, H, V, seed=len(shape) + V)
    logp, ent = ours.linear_cross_entropy(hidden, weight, labels, temperature, "none")
    assert logp.shape == ent.shape == (labels.numel(),) and logp.dtype == ent.dtype == torch.float32
    ref_logp, ref_ent = verl.torch_functional.FusedLinearForPPOFunction.apply(hidden, weight, labels, temperature, 16)
    assert_close(logp, ref_logp.reshape(-1), "log-probs")
    assert_close(ent, ref_ent.reshape(-1), "entropy")
    got, want = grads(logp, ent, upstream, [hidden, weight]), grads(ref_logp, ref_ent, upstream, [hidden, weight])
    assert got[0].shape == hidden.shape
    for name, a, r in zip(("grad hidden", "grad weight"), got, want):
        assert_close(a, r, name)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_linear_cross_entropy_reductions(verl, reduction):
    """"sum" / "mean" give the scalar sum / mean of the log-probs, with its gradient (verl's kernel's reductions)."""
    hidden, weight, labels, upstream = inputs((2, 9), 40, 200, seed=3)
    logp, ent = ours.linear_cross_entropy(hidden, weight, labels, 0.9, reduction)
    ref_logp, ref_ent = verl.torch_functional.FusedLinearForPPOFunction.apply(hidden, weight, labels, 0.9, 16)
    ref = getattr(ref_logp, reduction)()
    assert logp.shape == () and ent.shape == (18,)
    assert_close(logp, ref, reduction)
    got = torch.autograd.grad(logp * 1.7 + (ent * upstream[1].reshape(-1)).sum(), [hidden, weight])
    want = torch.autograd.grad(ref * 1.7 + (ref_ent * upstream[1]).sum(), [hidden, weight])
    for name, a, r in zip(("grad hidden", "grad weight"), got, want):
        assert_close(a, r, name)


def test_linear_cross_entropy_refuses_what_it_does_not_implement():
    h, w, y, _ = inputs((4,), 8, 32, seed=0)
    with pytest.raises(ValueError, match="Invalid reduction"):
        ours.linear_cross_entropy(h, w, y, 1.0, "max")
    with pytest.raises(NotImplementedError, match="vocabulary-parallel"):
        ours.linear_cross_entropy(h, w, y, 1.0, "none", dist_process_group=object())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_for_ppo_matches_verls_module(verl, dtype):
    """Our `FusedLinearForPPO` against verl's (torch backend): shapes, dtypes (entropy in the hidden states'
    dtype), values and gradients (fp32: within 1e-5; bf16: within bf16 rounding of the largest value)."""
    hidden, weight, labels, upstream = inputs((2, 15), 48, 400, seed=5, dtype=dtype)
    params = [hidden, weight]
    out = ours.FusedLinearForPPO(chunk_size=8)(hidden, weight, labels, temperature=0.8)
    ref = verl.torch_functional.FusedLinearForPPO(chunk_size=8, impl_backend="torch")(hidden, weight, labels, 0.8)
    results = [(out, grads(*out, upstream, params)), (ref, grads(*ref, upstream, params))]
    (values, gradients), (ref_values, ref_gradients) = results
    for name, a, r in zip(("log-probs", "entropy", "grad hidden", "grad weight"),
                          [*values, *gradients], [*ref_values, *ref_gradients]):  # fmt: skip
        assert a.shape == r.shape and a.dtype == r.dtype, name
        if dtype == torch.float32:
            assert_close(a, r, name)
        else:
            torch.testing.assert_close(a.float(), r.float(), rtol=0, atol=2**-6 * r.float().abs().max().item())
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend"):
        ours.FusedLinearForPPO(impl_backend="cuda")


def test_patch_verl_binds_ours_in_verls_modules(verl, monkeypatch):
    """After `import rarl_kernels.integrations.verl_patch` (verl's external_lib hook), the names verl's fused forwards
    look up are ours, in verl's modules and in a verl module that imported verl's function before the patch."""
    consumer = types.ModuleType("verl.models.consumer")
    consumer.linear_cross_entropy = verl.linear_cross_entropy.linear_cross_entropy  # imported at module level
    monkeypatch.setitem(sys.modules, "verl.models.consumer", consumer)
    monkeypatch.delitem(sys.modules, "rarl_kernels.integrations.verl_patch", raising=False)
    importlib.import_module("rarl_kernels.integrations.verl_patch")
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    assert linear_cross_entropy is consumer.linear_cross_entropy is ours.linear_cross_entropy
    assert FusedLinearForPPO is ours.FusedLinearForPPO
