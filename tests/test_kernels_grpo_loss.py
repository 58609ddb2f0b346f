"""grpo_loss on [B, T] log-probs: the Triton per-token kernels (forward and backward) against the
plain-torch reference, every loss_type, with and without old/reference log-probs, and the aggregations."""

import pytest
import torch

from rarl_kernels import _utils, aggregate, grpo_loss, grpo_loss_ref, token_weights
from rarl_kernels.testing import assert_rel_close

LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo"]


pytestmark = pytest.mark.usefixtures("fast_interpreter")  # conftest.py


def make(B=5, T=63, seed=0, old=True, ref=True, is_ratio=False):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(B, T, generator=g) - 2).requires_grad_()
    jitter = lambda: logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[1] = 0  # a row with no completion tokens
    adv = torch.randn(B, generator=g)
    adv[3] = 0.0
    isw = torch.rand(B, T, generator=g) + 0.5 if is_ratio else None
    return logp, jitter() if old else None, jitter() if ref else None, adv, mask, isw


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("old", [True, False], ids=["old", "on-policy"])
@pytest.mark.parametrize("ref", [True, False], ids=["ref", "no-ref"])
def test_triton_matches_reference(loss_type, old, ref):
    logp, lo, lr, adv, mask, isw = make(old=old, ref=ref, is_ratio=loss_type == "dapo")
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, loss_type=loss_type, max_completion_length=80,
              num_items_in_batch=123 if loss_type == "dapo" else None, is_ratio=isw)  # fmt: skip
    _utils.LAUNCHES.clear()
    loss, metrics = grpo_loss(logp, lo, lr, adv, mask, impl="triton", **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    assert _utils.LAUNCHES["grpo_loss_fwd"] == 1 and _utils.LAUNCHES["grpo_loss_bwd"] == 1
    loss_ref, metrics_ref = grpo_loss_ref(logp, lo, lr, adv, mask, **kw)
    (grad_ref,) = torch.autograd.grad(loss_ref, logp)
    assert_rel_close(loss, loss_ref, rtol=1e-6, name="loss")
    assert_rel_close(grad, grad_ref, rtol=1e-6, name="grad")
    assert grad[1].abs().sum() == 0  # the empty row gets no gradient
    assert list(metrics) == ["kl_mean", "clip_ratio", "ratio_mean"]
    for k, v in metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0
        torch.testing.assert_close(v, metrics_ref[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("old", [True, False], ids=["old", "on-policy"])
def test_bias_correction_kl_triton_matches_reference(old):
    logp, lo, lr, adv, mask, isw = make(old=old, is_ratio=True, seed=2)
    kw = dict(eps_high=0.28, beta=0.5, loss_type="grpo", is_ratio=isw, bias_correction_kl=True)
    _utils.LAUNCHES.clear()
    loss, metrics = grpo_loss(logp, lo, lr, adv, mask, impl="triton", **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    assert _utils.LAUNCHES["grpo_loss_fwd"] == 1 and _utils.LAUNCHES["grpo_loss_bwd"] == 1
    loss_ref, metrics_ref = grpo_loss_ref(logp, lo, lr, adv, mask, **kw)
    (grad_ref,) = torch.autograd.grad(loss_ref, logp)
    assert_rel_close(loss, loss_ref, rtol=1e-6, name="loss")
    assert_rel_close(grad, grad_ref, rtol=1e-6, name="grad")
    for k, v in metrics.items():
        torch.testing.assert_close(v, metrics_ref[k], rtol=1e-6, atol=1e-7)


def test_bias_correction_kl_by_hand():
    # kl = r * k3 with r = exp(logp - old) carrying gradient: d/dlogp = r * (k3 + 1 - exp(ref - logp))
    # = r * (logp - ref). One token, A = 0 (no policy term): logp = log 0.5, old = log 0.25 (r = 2), ref = log 1.
    logp = torch.log(torch.tensor([[0.5]])).requires_grad_()
    old, ref = torch.log(torch.tensor([[0.25]])), torch.zeros(1, 1)
    k3 = 2.0 - torch.log(torch.tensor(2.0)) - 1.0
    for impl in ("triton", "chunked"):
        for on_policy in (False, True):
            r = 1.0 if on_policy else 2.0
            loss, m = grpo_loss(logp, None if on_policy else old, ref, torch.zeros(1), torch.ones(1, 1), beta=1.0,
                                bias_correction_kl=True, impl=impl)  # fmt: skip
            (g,) = torch.autograd.grad(loss, logp)
            torch.testing.assert_close(loss, r * k3)
            torch.testing.assert_close(m["kl_mean"], r * k3)  # Liger reports the corrected KL
            torch.testing.assert_close(g, r * logp.detach())  # nonzero on-policy too: the ratio is not detached


def test_triton_bf16_logp_and_beta_zero():
    logp, lo, lr, adv, mask, _ = make(seed=1)
    logp16 = logp.detach().bfloat16().requires_grad_()
    loss, metrics = grpo_loss(logp16, lo, lr, adv, mask, beta=0.0, impl="triton")
    (g,) = torch.autograd.grad(loss, logp16)
    loss_ref, _ = grpo_loss_ref(logp16.float(), lo, lr, adv, mask, beta=0.0)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
    assert g.dtype == torch.bfloat16 and "kl_mean" not in metrics


def test_clipping_and_metrics_by_hand():
    # One row, four tokens: ratio 1.5 with A>0 (clipped, no gradient), ratio 0.5 with A>0 (unclipped),
    # and the same two ratios in a row with A<0.
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]])).requires_grad_()
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    for impl in ("triton", "torch"):
        loss, m = grpo_loss(logp, old, None, adv, mask, beta=0.0, loss_type="bnpo", impl=impl)
        (g,) = torch.autograd.grad(loss, logp)
        # per token: -min(r A, clip(r) A): [-1.2, -0.5], [1.5, 0.8] -> mean 0.15
        torch.testing.assert_close(loss, torch.tensor(0.15))
        torch.testing.assert_close(g, torch.tensor([[0.0, -0.5], [1.5, 0.0]]) / 4)
        torch.testing.assert_close(m["clip_ratio"], torch.tensor(0.5))
        torch.testing.assert_close(m["ratio_mean"], torch.tensor(1.0))


def test_aggregations_by_hand():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(aggregate(loss_mat, mask, "bnpo"), torch.tensor(7.0 / 3))
    torch.testing.assert_close(aggregate(loss_mat, mask, "dapo"), torch.tensor(7.0 / 3))
    dapo_global = aggregate(loss_mat, mask, "dapo", num_items_in_batch=14, world_size=2)
    torch.testing.assert_close(dapo_global, torch.tensor(1.0))
    torch.testing.assert_close(aggregate(loss_mat, mask, "grpo"), torch.tensor((1.5 + 4.0 + 0.0) / 3))
    torch.testing.assert_close(aggregate(loss_mat, mask, "dr_grpo", max_completion_length=7), torch.tensor(7.0 / 21))
    assert token_weights(mask, "bnpo", num_items_in_batch=1000).sum() == 1.0  # bnpo ignores it, as Liger
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(loss_mat, mask, "dr_grpo")
    with pytest.raises(NotImplementedError, match="cispo"):
        grpo_loss(loss_mat, None, None, torch.zeros(3), mask, loss_type="cispo")
