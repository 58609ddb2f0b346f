"""grpo_loss on [B, T] log-probs: the Triton token kernel (loss and gradient) against the plain-torch reference,
every loss_type and option, with and without old/reference log-probs, the math by hand, and the aggregations."""

import math

import pytest
import torch

from rarl_kernels import LOSS_TYPES, _utils, aggregate, grpo_loss, grpo_loss_ref, token_weights
from rarl_kernels.testing import assert_rel_close

CLIP_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo"]


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


@pytest.mark.parametrize("loss_type", CLIP_TYPES)
@pytest.mark.parametrize("old", [True, False], ids=["old", "on-policy"])
@pytest.mark.parametrize("ref", [True, False], ids=["ref", "no-ref"])
def test_triton_matches_reference(loss_type, old, ref):
    logp, lo, lr, adv, mask, isw = make(old=old, ref=ref, is_ratio=loss_type == "dapo")
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, loss_type=loss_type, max_completion_length=80,
              num_items_in_batch=123 if loss_type == "dapo" else None, is_ratio=isw)  # fmt: skip
    _utils.LAUNCHES.clear()
    loss, metrics = grpo_loss(logp, lo, lr, adv, mask, impl="triton", **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    assert _utils.LAUNCHES["grpo_token"] == 1
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
    assert _utils.LAUNCHES["grpo_token"] == 1
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
    # luspo (TRL): each row's masked sum, averaged over rows: (3 + 4 + 0) / 3
    torch.testing.assert_close(aggregate(loss_mat, mask, "luspo"), torch.tensor(7.0 / 3))
    # luspo (Liger): every position times its row's length, over B * T: (2 * 6 + 1 * 15 + 0 * 24) / 9
    liger = aggregate(loss_mat, mask, "luspo", luspo_reduction="length_weighted_mean")
    torch.testing.assert_close(liger, torch.tensor(27.0 / 9))
    # ... the same as TRL's when the loss is one value per row (sequence-level ratio, no per-token term)
    per_row = loss_mat[:, :1].expand(3, 3)
    torch.testing.assert_close(aggregate(per_row, mask, "luspo", luspo_reduction="length_weighted_mean"),
                               aggregate(per_row, mask, "luspo"))  # fmt: skip
    with pytest.raises(ValueError, match="Unknown luspo reduction"):
        aggregate(loss_mat, mask, "luspo", luspo_reduction="mean")
    torch.testing.assert_close(aggregate(loss_mat, mask, "sapo"), aggregate(loss_mat, mask, "grpo"))
    for token_mean in ("cispo", "vespo"):
        torch.testing.assert_close(aggregate(loss_mat, mask, token_mean, num_items_in_batch=14, world_size=2),
                                   dapo_global)  # fmt: skip
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(loss_mat, mask, "dr_grpo")
    with pytest.raises(ValueError, match="Unknown loss type"):
        grpo_loss(loss_mat, None, None, torch.zeros(3), mask, loss_type="ppo")


# ---- the loss types and options beyond the clipped token-level surrogate ---------------------------------------

OPTIONS = [
    pytest.param(dict(loss_type="grpo", delta=1.15), id="delta"),
    pytest.param(dict(loss_type="dapo", importance_sampling_level="sequence"), id="sequence"),
    pytest.param(dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.05, bias_correction_kl=True),
                 id="sequence-delta-bias-corr"),
    pytest.param(dict(loss_type="luspo", importance_sampling_level="sequence"), id="luspo"),
    pytest.param(dict(loss_type="luspo", bias_correction_kl=True), id="luspo-token"),
    pytest.param(dict(loss_type="luspo", importance_sampling_level="sequence", luspo_reduction="length_weighted_mean"),
                 id="luspo-liger"),
    pytest.param(dict(loss_type="luspo", luspo_reduction="length_weighted_mean"), id="luspo-token-liger"),
    pytest.param(dict(loss_type="cispo", eps_high=1.1), id="cispo"),
    pytest.param(dict(loss_type="cispo", eps_high=1.1, bias_correction_kl=True), id="cispo-bias-corr"),
    pytest.param(dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.6), id="sapo"),
    pytest.param(dict(loss_type="sapo", bias_correction_kl=True), id="sapo-bias-corr"),
    pytest.param(dict(loss_type="vespo"), id="vespo"),
    pytest.param(dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=1.0, vespo_k_neg=2.5, vespo_lambda_neg=0.5,
                      bias_correction_kl=True), id="vespo-params-bias-corr"),
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("is_ratio", [False, True], ids=["", "is_ratio"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_options_triton_match_reference(options, is_ratio, dtype):
    """Every new option, forward and backward: the Triton kernel against the autograd reference (TRL's math), on
    fp32 and bf16 log-probs (the kernel computes in fp32 either way; the gradient comes back in the input dtype)."""
    logp, lo, lr, adv, mask, isw = make(seed=3, is_ratio=is_ratio)
    adv[0], adv[2] = -abs(adv[0]), abs(adv[2])  # both signs: SAPO's temperatures, VESPO's (k, lambda) pairs
    x = logp.detach().to(dtype).requires_grad_()
    kw = dict(beta=0.2, max_completion_length=80, num_items_in_batch=200, is_ratio=isw, **options)
    _utils.LAUNCHES.clear()
    loss, metrics = grpo_loss(x, lo, lr, adv, mask, impl="triton", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    assert _utils.LAUNCHES["grpo_token"] == 1 and grad.dtype == dtype
    x32 = x.detach().float().requires_grad_()
    loss_ref, metrics_ref = grpo_loss_ref(x32, lo, lr, adv, mask, **kw)
    (grad_ref,) = torch.autograd.grad(loss_ref, x32)
    assert_rel_close(loss, loss_ref, rtol=1e-5, name="loss")
    assert_rel_close(grad, grad_ref, rtol=1e-5 if dtype == torch.float32 else 2**-8, name="grad")
    assert grad[1].abs().sum() == 0 and grad_ref.abs().max() > 0
    assert sorted(metrics) == sorted(metrics_ref)
    for k, v in metrics.items():
        torch.testing.assert_close(v, metrics_ref[k], rtol=1e-5, atol=1e-7)


def test_delta_caps_the_unclipped_ratio_by_hand():
    # ratio 3 with A = 1: clipped at 1.2 (loss -1.2, no gradient), delta or not. With A = -1 the unclipped branch
    # is the min: loss -min(-3, -1.2) = 3 with gradient -A r = 3; delta = 2 caps the ratio at 2: loss 2, and no
    # gradient. Token mean over the two tokens (bnpo) halves both.
    logp = torch.log(torch.tensor([[3.0], [3.0]])).requires_grad_()
    old, adv, mask = torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1)
    for impl in ("triton", "torch"):
        for delta, want_loss, want_grad in ((None, (-1.2 + 3.0) / 2, [0.0, 1.5]), (2.0, (-1.2 + 2.0) / 2, [0.0, 0.0])):
            loss, m = grpo_loss(logp, old, None, adv, mask, beta=0.0, loss_type="bnpo", delta=delta, impl=impl)
            (g,) = torch.autograd.grad(loss, logp)
            torch.testing.assert_close(loss, torch.tensor(want_loss))
            torch.testing.assert_close(g, torch.tensor(want_grad)[:, None])
            torch.testing.assert_close(m["clip_ratio"], torch.tensor(0.5))  # the clip flag ignores delta


def test_sequence_level_ratio_by_hand():
    """One row, log-ratios 0.1 and 0.3 (and a padded token): s = 0.2, r = e^0.2 for every token, and the policy
    term's gradient -A r reaches each unpadded token through s with weight 1/2."""
    logp = torch.tensor([[0.1, 0.3, 5.0]]).requires_grad_()
    old, mask, adv = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0.5])
    r = math.exp(0.2)
    for impl in ("triton", "torch"):
        loss, m = grpo_loss(logp, old, None, adv, mask, beta=0.0, eps_high=0.5, loss_type="grpo",
                            importance_sampling_level="sequence", impl=impl)  # fmt: skip
        (g,) = torch.autograd.grad(loss, logp)
        torch.testing.assert_close(loss, torch.tensor(-0.5 * r))
        torch.testing.assert_close(g, torch.tensor([[-0.5 * r / 2, -0.5 * r / 2, 0.0]]))
        torch.testing.assert_close(m["ratio_mean"], torch.tensor(r))


def test_cispo_sapo_vespo_by_hand():
    """One token, A = 2, log-ratio log 3: cispo caps the ratio at eps_high = 2.5 and detaches it (loss -2.5 A logp,
    gradient -2.5 A); sapo (tau 1) gives -(4 / tau) sigmoid(tau (r - 1)) A, gradient -4 s (1 - s) r A; vespo's
    weight at w = 3 is exp(lam + k log w - lam w) = exp(3 + 2 log 3 - 9) for (k, lam) = (2, 3)."""
    lp = math.log(0.3)
    logp = torch.tensor([[lp]]).requires_grad_()
    old, mask, adv = torch.tensor([[lp - math.log(3.0)]]), torch.ones(1, 1), torch.tensor([2.0])
    sig = 1 / (1 + math.exp(-2.0))
    phi = math.exp(3 + 2 * math.log(3.0) - 9)
    cases = {"cispo": (-2.5 * 2 * lp, -2.5 * 2), "sapo": (-4 * sig * 2, -4 * sig * (1 - sig) * 3 * 2),
             "vespo": (-phi * 2 * lp, -phi * 2)}  # fmt: skip
    for impl in ("triton", "torch"):
        for loss_type, (want_loss, want_grad) in cases.items():
            loss, m = grpo_loss(logp, old, None, adv, mask, beta=0.0, eps_high=2.5, loss_type=loss_type, impl=impl)
            (g,) = torch.autograd.grad(loss, logp)
            torch.testing.assert_close(loss, torch.tensor(want_loss), msg=f"{impl} {loss_type}")
            torch.testing.assert_close(g, torch.tensor([[want_grad]]), msg=f"{impl} {loss_type}")
            torch.testing.assert_close(m["clip_ratio"], torch.tensor(1.0 if loss_type == "cispo" else 0.0))


def test_vespo_weight_is_one_on_policy():
    """phi(1) = 1: on-policy without a rollout correction VESPO is REINFORCE, loss -A logp."""
    logp, _, _, adv, mask, _ = make(seed=4, old=False, ref=False)
    for impl in ("triton", "torch"):
        loss, _ = grpo_loss(logp, None, None, adv, mask, beta=0.0, loss_type="vespo", impl=impl)
        want = (-adv[:, None] * logp * token_weights(mask, "vespo")).sum()
        torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo"])
def test_sequence_level_rejected_for_token_only_surrogates(loss_type):
    logp, lo, _, adv, mask, _ = make()
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match="Sequence-level importance sampling is not supported"):
            grpo_loss(logp, lo, None, adv, mask, loss_type=loss_type, importance_sampling_level="sequence", impl=impl)
    with pytest.raises(ValueError, match="importance sampling level"):
        grpo_loss(logp, lo, None, adv, mask, importance_sampling_level="batch")
    with pytest.raises(ValueError, match="delta must be positive"):
        grpo_loss(logp, lo, None, adv, mask, delta=0.0)
    with pytest.raises(ValueError, match="sapo_temperature_neg"):
        grpo_loss(logp, lo, None, adv, mask, loss_type="sapo", sapo_temperature_neg=-1.0)


def test_loss_types_are_liger_and_trl_names():
    from rarl_kernels.loss_types import AGGREGATION, SURROGATE

    assert set(LOSS_TYPES) == set(SURROGATE) == set(AGGREGATION)
    assert set(LOSS_TYPES) == {"grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo"}


def test_ops_take_the_options_with_their_one_default():
    """Both ops spell the loss options out as keywords; their defaults are `LossOptions`'."""
    import inspect

    from rarl_kernels import LossOptions, fused_linear_grpo_loss

    for fn in (grpo_loss, fused_linear_grpo_loss):
        params = inspect.signature(fn).parameters
        for name, default in LossOptions._field_defaults.items():
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == default, name
