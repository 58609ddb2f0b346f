"""fused_linear_grpo_loss and FusedLinearGRPOLoss: Triton kernels (interpreter on CPU), the chunked torch
path, the plain-torch reference, Liger's LigerFusedLinearGRPOLoss, and the memory bound."""

import inspect

import pytest
import torch

from rarl_kernels import FusedLinearGRPOLoss, _utils, fused_linear_grpo_loss, fused_linear_grpo_loss_ref
from rarl_kernels.reference import fused_linear_logprobs_ref, grpo_token_loss_ref
from rarl_kernels.testing import LargestTensorMode, assert_rel_close, assert_three_way, contraction_orders

LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo"]
FUSED_KERNELS = ("grpo_logits_partials", "grpo_rows", "grpo_token", "grpo_dz", "matmul")


pytestmark = pytest.mark.usefixtures("fast_interpreter")  # conftest.py


def make_batch(B, T, H, V, *, dtype=torch.float32, seed=0, device="cpu", bias=True, temperature=1.0, scale=None):
    """hidden, weight, bias (leaves in `dtype`), labels, mask (one empty row), advantages, old/ref logps, ref_hidden."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    if scale is not None:
        w *= scale / (h @ w.t()).abs().max()
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    if B > 1:
        mask[1] = 0
    adv = torch.randn(B, generator=g)
    noise = torch.randn(2, B, T, generator=g).to(device)
    ref_h = h + 0.05 * torch.randn(B, T, H, generator=g)
    dev = lambda t: None if t is None else t.to(device)
    with torch.no_grad():  # on the device: at the GPU sizes this is a big matmul
        base = fused_linear_logprobs_ref(dev(h), dev(w), dev(y), bias=dev(b), temperature=temperature)
    leaf = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()
    return dict(hidden=leaf(h), weight=leaf(w), bias=leaf(b), labels=dev(y), mask=dev(mask), adv=dev(adv),
                old=base + 0.2 * noise[0], ref=base + 0.2 * noise[1], ref_hidden=dev(ref_h).to(dtype))  # fmt: skip


def run_fused(fn, d, **kw):
    loss, metrics = fn(d["hidden"], d["weight"], d["labels"], d["mask"], d["adv"], bias=d["bias"], **kw)
    params = [t for t in (d["hidden"], d["weight"], d["bias"]) if t is not None]
    return [loss, *torch.autograd.grad(loss, params)], metrics


def run_reference_reordered(d, kw, perm, inverse):
    """The fp32 reference on the hidden dimension permuted: the same values, summed in another order."""
    dp = dict(d, hidden=d["hidden"][..., perm], weight=d["weight"][:, perm])
    ref = lambda *a, **k: fused_linear_grpo_loss_ref(*a, upcast=True, **k)
    (loss, g_hidden, g_weight, *rest), _ = run_fused(ref, dp, **kw)
    return [loss, g_hidden[..., inverse], g_weight[:, inverse], *rest]


NAMES = ["loss", "grad_hidden", "grad_weight", "grad_bias"]
INTERP_CASES = [
    pytest.param(3, 21, 72, 1000, torch.float32, "dapo", 0.7, id="B3-T21-H72-V1000-fp32-dapo-T0.7"),
    pytest.param(3, 21, 72, 1000, torch.bfloat16, "grpo", 0.7, id="B3-T21-H72-V1000-bf16-grpo-T0.7"),
    pytest.param(1, 1, 72, 1000, torch.float32, "bnpo", 1.0, id="B1-T1-H72-V1000-fp32-bnpo"),
    pytest.param(3, 21, 72, 1000, torch.float32, "dr_grpo", 1.0, id="B3-T21-H72-V1000-fp32-dr_grpo"),
]


def check_against_reference(impl, B, T, H, V, dtype, loss_type, temperature, *, device="cpu", scale=None,
                            truth64=False, chunk_rows=24, **options):  # fmt: skip
    d = make_batch(B, T, H, V, dtype=dtype, device=device, temperature=temperature, scale=scale)
    if B > 2:  # both advantage signs (SAPO's temperatures, VESPO's gamma parameters)
        d["adv"][0], d["adv"][2] = -d["adv"][0].abs(), d["adv"][2].abs()
    kw = dict(logp_old=d["old"], logp_ref=d["ref"], loss_type=loss_type, temperature=temperature, beta=0.04,
              eps_high=0.28, max_completion_length=2 * T, num_items_in_batch=B * T - 3,
              is_ratio=torch.rand(B, T, generator=torch.Generator().manual_seed(1)).to(device) + 0.5)  # fmt: skip
    kw.update(options)
    fused = lambda *a, **k: fused_linear_grpo_loss(*a, impl=impl, chunk_bytes=chunk_rows * V * 4, **k)
    ours, metrics = run_fused(fused, d, **kw)
    ref32, metrics_ref = run_fused(lambda *a, **k: fused_linear_grpo_loss_ref(*a, upcast=True, **k), d, **kw)
    for t in ours:
        assert torch.isfinite(t).all()
    if truth64 or scale is not None:
        d64 = {k: (v.detach().double().requires_grad_() if v is not None and v.is_floating_point() and v.requires_grad
                   else v) for k, v in d.items()}  # fmt: skip
        ref64, _ = run_fused(fused_linear_grpo_loss_ref, d64, **kw)
        # torch's fp32 error over 9 summation orders: at |logits| ~ 1e4 one order's error alone swings 20x
        refs32 = [ref32] + [run_reference_reordered(d, kw, p, inv) for p, inv in contraction_orders(H, 8)]
        for i, (name, a, r64) in enumerate(zip(NAMES, ours, ref64)):
            assert_three_way(a, [r[i] for r in refs32], r64, atol=1e-5 * r64.abs().max().item(), name=name)
    elif dtype == torch.float32:
        for name, a, r in zip(NAMES, ours, ref32):
            assert_rel_close(a, r, rtol=3e-5, name=name)
        for k, v in metrics_ref.items():
            torch.testing.assert_close(metrics[k], v, rtol=1e-5, atol=1e-6)
    else:
        ref_lp, _ = run_fused(fused_linear_grpo_loss_ref, d, **kw)
        for name, a, rl, r in zip(NAMES, ours, ref_lp, ref32):
            assert_three_way(a, rl, r, atol=2**-8 * r.float().abs().max().item() + 1e-4, name=name)
    assert sorted(metrics) == ["clip_ratio", "entropy_mean", "kl_mean", "ratio_mean"]


@pytest.mark.parametrize("B,T,H,V,dtype,loss_type,temperature", INTERP_CASES)
def test_triton_interpreter_matches_reference(B, T, H, V, dtype, loss_type, temperature):
    _utils.LAUNCHES.clear()
    check_against_reference("triton", B, T, H, V, dtype, loss_type, temperature)
    for name in FUSED_KERNELS:
        assert _utils.LAUNCHES[name] >= 1, name


@pytest.mark.parametrize("B,T,H,V,dtype,loss_type,temperature", INTERP_CASES)
def test_chunked_matches_reference(B, T, H, V, dtype, loss_type, temperature):
    check_against_reference("chunked", B, T, H, V, dtype, loss_type, temperature)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_extreme_logits(impl):
    check_against_reference(impl, 2, 10, 40, 300, torch.float32, "dapo", 1.0, scale=1e4, truth64=True)


def test_full_vocab_few_rows(monkeypatch):
    for k in ("BLOCK_V", "BLOCK_M", "BLOCK_K"):
        monkeypatch.setitem(_utils.TILE_OVERRIDES, k, 8192)
    _utils.LAUNCHES.clear()
    check_against_reference("triton", 1, 3, 24, 151936, torch.float32, "grpo", 0.9, truth64=True)
    assert _utils.LAUNCHES["grpo_logits_partials"] == 1


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_never_materializes_a_quarter_of_the_logits(impl):
    B, T, H, V = 5, 32, 32, 512
    d = make_batch(B, T, H, V)
    with LargestTensorMode() as mode:
        run_fused(lambda *a, **k: fused_linear_grpo_loss(*a, impl=impl, chunk_bytes=8 * V * 4, **k), d,
                  logp_old=d["old"], ref_hidden=d["ref_hidden"], ref_weight=d["weight"].detach())  # fmt: skip
    assert mode.largest < B * T * V // 4, (mode.largest, mode.largest_op)


def test_gradient_scales_with_grad_output_and_skips_work_without_grad():
    d = make_batch(2, 7, 16, 100)
    loss, _ = fused_linear_grpo_loss(d["hidden"], d["weight"], d["labels"], d["mask"], d["adv"], logp_old=d["old"])
    g1 = torch.autograd.grad(3.0 * loss, [d["hidden"], d["weight"]])
    loss, _ = fused_linear_grpo_loss(d["hidden"], d["weight"], d["labels"], d["mask"], d["adv"], logp_old=d["old"])
    g2 = torch.autograd.grad(loss, [d["hidden"], d["weight"]])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, 3.0 * b)
    _utils.LAUNCHES.clear()
    with torch.no_grad():
        loss_ng, _ = fused_linear_grpo_loss(d["hidden"], d["weight"], d["labels"], d["mask"], d["adv"],
                                            logp_old=d["old"], impl="triton")  # fmt: skip
    torch.testing.assert_close(loss_ng, loss.detach(), rtol=1e-5, atol=1e-7)
    assert _utils.LAUNCHES["matmul"] == 0 and _utils.LAUNCHES["grpo_dz"] == 0


# ---- drop-in equivalence with Liger --------------------------------------------------------------------------


def liger_and_ours(ctor, fwd, impl=None):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    results = []
    for module in (LigerFusedLinearGRPOLoss(**ctor, compiled=False), FusedLinearGRPOLoss(**ctor, impl=impl)):
        h, w, b = (t.clone().requires_grad_() for t in (fwd["_input"], fwd["lin_weight"], fwd["bias"]))
        loss, metrics = module(**{**fwd, "_input": h, "lin_weight": w, "bias": b})
        results.append((loss, metrics, torch.autograd.grad(loss, [h, w, b])))
    return results


def liger_case(loss_type, old, ref_mode, num_items, beta=0.04, seed=0):
    B, T, H, V = 4, 13, 40, 300
    d = make_batch(B, T, H, V, seed=seed, temperature=0.9)
    ctor = dict(beta=beta, use_ref_model=ref_mode != "none", epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                max_completion_length=20, temperature=0.9)  # fmt: skip
    fwd = dict(_input=d["hidden"].detach(), lin_weight=d["weight"].detach(), selected_token_ids=d["labels"],
               attention_mask=d["mask"], advantages=d["adv"], bias=d["bias"].detach(),
               ref_per_token_logps=d["ref"] if ref_mode == "logps" else None,
               old_per_token_logps=d["old"] if old else None,
               ref_input=d["ref_hidden"] if ref_mode == "input" else None,
               ref_weight=d["weight"].detach() * 1.01 if ref_mode == "input" else None,
               num_items_in_batch=num_items)  # fmt: skip
    return ctor, fwd


def assert_matches_liger(results, beta):
    (l_liger, m_liger, g_liger), (l_ours, m_ours, g_ours) = results
    assert_rel_close(l_ours, l_liger, rtol=1e-5, name="loss")
    for name, a, r in zip(["grad_input", "grad_weight", "grad_bias"], g_ours, g_liger):
        assert_rel_close(a, r, rtol=1e-5, name=name)
    assert isinstance(m_ours, list) and len(m_ours) == len(m_liger) == (2 if beta != 0 else 1)
    for a, r in zip(m_ours, m_liger):
        assert isinstance(a, torch.Tensor) and a.dim() == 0
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_items", [None, 40], ids=["count", "num_items"])
@pytest.mark.parametrize("ref_mode", ["none", "logps", "input"])
@pytest.mark.parametrize("old", [False, True], ids=["on-policy", "old"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_liger_chunked(loss_type, old, ref_mode, num_items):
    ctor, fwd = liger_case(loss_type, old, ref_mode, num_items)
    assert_matches_liger(liger_and_ours(ctor, fwd), ctor["beta"])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_liger_triton_interpreter(loss_type):
    ctor, fwd = liger_case(loss_type, True, "input", 40 if loss_type == "dapo" else None, seed=1)
    _utils.LAUNCHES.clear()
    assert_matches_liger(liger_and_ours(ctor, fwd, impl="triton"), ctor["beta"])
    assert _utils.LAUNCHES["grpo_rows"] >= 1 and _utils.LAUNCHES["linear_logprobs_fwd"] == 1  # ref logps too


def test_matches_liger_beta_zero_and_vllm_ratio():
    ctor, fwd = liger_case("dapo", True, "none", None, beta=0.0)
    fwd["vllm_is_ratio"] = torch.rand(4, 13) + 0.5
    assert_matches_liger(liger_and_ours(ctor, fwd), 0.0)


@pytest.mark.parametrize("old", [False, True], ids=["on-policy", "old"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_liger_bias_correction_kl(loss_type, old):
    """use_bias_correction_kl=True (TRL's default): KL term and KL metric times the ratio, whose gradient
    also counts on-policy (value 1). beta=0.3 makes the KL gradient a visible part of the total."""
    ctor, fwd = liger_case(loss_type, old, "logps", 40 if loss_type == "dapo" else None, beta=0.3, seed=2)
    ctor["use_bias_correction_kl"] = True
    results = liger_and_ours(ctor, fwd)
    assert_matches_liger(results, ctor["beta"])
    # Not vacuous: without the correction the input gradient differs well beyond the tolerance.
    (_, _, g_plain), _ = liger_and_ours({**ctor, "use_bias_correction_kl": False}, fwd, impl="torch")
    g_corr = results[1][2][0]
    assert (g_plain[0] - g_corr).abs().max() > 1e-3 * g_corr.abs().max()


def test_bias_correction_kl_triton_interpreter():
    """The Triton path with the flag on (BIAS_CORR constexpr) against the torch reference and Liger."""
    B, T, H, V = 2, 9, 40, 300
    d = make_batch(B, T, H, V, temperature=0.9)
    kw = dict(logp_old=d["old"], logp_ref=d["ref"], beta=0.3, eps_high=0.28, temperature=0.9,
              is_ratio=torch.rand(B, T) + 0.5, bias_correction_kl=True)  # fmt: skip
    _utils.LAUNCHES.clear()
    ours, metrics = run_fused(lambda *a, **k: fused_linear_grpo_loss(*a, impl="triton", chunk_bytes=8 * V * 4, **k),
                              d, **kw)  # fmt: skip
    assert all(_utils.LAUNCHES[name] >= 1 for name in FUSED_KERNELS), dict(_utils.LAUNCHES)
    ref, metrics_ref = run_fused(lambda *a, **k: fused_linear_grpo_loss_ref(*a, upcast=True, **k), d, **kw)
    for name, a, r in zip(NAMES, ours, ref):
        assert_rel_close(a, r, rtol=3e-5, name=name)
    for k, v in metrics_ref.items():
        torch.testing.assert_close(metrics[k], v, rtol=1e-5, atol=1e-6)
    plain, _ = run_fused(fused_linear_grpo_loss_ref, d, **{**kw, "bias_correction_kl": False})
    assert (plain[1] - ref[1]).abs().max() > 1e-3 * ref[1].abs().max()  # the flag reaches the kernel's gradient
    ctor, fwd = liger_case("grpo", False, "input", None, beta=0.3, seed=3)
    _utils.LAUNCHES.clear()
    assert_matches_liger(liger_and_ours({**ctor, "use_bias_correction_kl": True}, fwd, impl="triton"), 0.3)
    assert _utils.LAUNCHES["grpo_rows"] >= 1


def _liger_module():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss


def test_constructor_and_forward_bind_like_liger():
    """Liger's constructor and forward signatures, positional order, names and defaults, are ours; a positional
    call sets the same attributes (our extra arguments are keyword-only)."""
    liger = _liger_module()
    for fn in ("__init__", "forward"):
        theirs = list(inspect.signature(getattr(liger, fn)).parameters.values())
        ours = [p for p in inspect.signature(getattr(FusedLinearGRPOLoss, fn)).parameters.values()
                if p.kind is not inspect.Parameter.KEYWORD_ONLY]  # fmt: skip
        assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs], fn
    args = (0.1, False, False, 2, 0.3, 0.4, "sapo", 77, "token", 0.7, 1.4, 0.9, 3.0, True, 1.5, 2.5, 3.5, 4.5)
    names = list(inspect.signature(liger.__init__).parameters)[1:]
    assert len(args) == len(names)
    a, b = liger(*args), FusedLinearGRPOLoss(*args)
    assert [getattr(b, n) for n in names] == [getattr(a, n) for n in names] == list(args)


INVALID = [
    pytest.param(dict(sapo_temperature_pos=0.0), True, id="sapo_temperature_pos"),
    pytest.param(dict(sapo_temperature_neg=-1.0), True, id="sapo_temperature_neg"),
    pytest.param(dict(delta=0.0), True, id="delta"),
    pytest.param(dict(loss_type="cispo", importance_sampling_level="sequence"), False, id="sequence-cispo"),
    pytest.param(dict(loss_type="sapo", importance_sampling_level="sequence"), False, id="sequence-sapo"),
    pytest.param(dict(loss_type="vespo", importance_sampling_level="sequence"), False, id="sequence-vespo"),
    pytest.param(dict(loss_type="ppo"), False, id="unknown-loss-type"),
    pytest.param(dict(importance_sampling_level="batch"), False, id="unknown-level"),
]


@pytest.mark.parametrize("options,at_init", INVALID)
def test_invalid_options_raise_what_liger_raises(options, at_init):
    """ValueError from the constructor or the forward, where Liger raises it."""
    _, fwd = liger_case("dapo", False, "none", None)
    for cls, extra in ((_liger_module(), dict(compiled=False)), (FusedLinearGRPOLoss, {})):
        if at_init:
            with pytest.raises(ValueError):
                cls(**options, **extra)
            continue
        module = cls(**options, **extra, use_ref_model=False)
        with pytest.raises(ValueError):
            module(**fwd)


def test_module_errors():
    with pytest.raises(TypeError, match="bogus"):
        FusedLinearGRPOLoss(bogus=1)
    FusedLinearGRPOLoss(compiled=True, chunk_size=4)  # accepted, ignored
    _, fwd = liger_case("dapo", False, "none", None)
    with pytest.raises(ValueError, match="ref_per_token_logps or ref_input"):
        FusedLinearGRPOLoss(use_ref_model=True)(**fwd)
    with pytest.raises(ValueError, match="max_completion_length"):
        FusedLinearGRPOLoss(loss_type="dr_grpo", use_ref_model=False)(**fwd)
    with pytest.raises(ValueError, match="vllm_is_ratio"):
        FusedLinearGRPOLoss(use_ref_model=False)(**{**fwd, "vllm_is_ratio": torch.ones(4, 5)})


# Liger options per loss type (luspo: `test_luspo_reductions_liger_and_trl`).
LIGER_OPTIONS = [
    ("grpo", dict(delta=1.2), "logps"),
    ("dapo", dict(importance_sampling_level="sequence"), "input"),
    ("bnpo", dict(importance_sampling_level="sequence", delta=1.1), "logps"),
    ("dr_grpo", dict(importance_sampling_level="sequence", use_bias_correction_kl=True), "logps"),
    ("cispo", dict(epsilon_high=1.1), "logps"),
    ("cispo", dict(epsilon_high=1.1, use_bias_correction_kl=True), "input"),
    ("sapo", dict(sapo_temperature_pos=0.7, sapo_temperature_neg=1.6), "logps"),
    ("sapo", dict(use_bias_correction_kl=True), "input"),
    ("vespo", dict(vespo_k_pos=1.5, vespo_lambda_neg=1.0), "logps"),
    ("vespo", dict(use_bias_correction_kl=True), "input"),
]


@pytest.mark.parametrize("vllm", [None, "token", "row"], ids=["", "vllm-token", "vllm-row"])
@pytest.mark.parametrize("old", [False, True], ids=["on-policy", "old"])
@pytest.mark.parametrize("loss_type,options,ref_mode", LIGER_OPTIONS,
                         ids=[f"{t}-{'-'.join(o)}-{r}" for t, o, r in LIGER_OPTIONS])  # fmt: skip
def test_new_options_match_liger(loss_type, options, ref_mode, old, vllm):
    ctor, fwd = liger_case(loss_type, old, ref_mode, 40 if loss_type in ("dapo", "cispo", "vespo") else None, beta=0.3)
    fwd["advantages"][0], fwd["advantages"][1] = -fwd["advantages"][0].abs(), fwd["advantages"][1].abs()
    if vllm is not None:
        g = torch.Generator().manual_seed(5)
        fwd["vllm_is_ratio"] = torch.rand(4, 13 if vllm == "token" else 1, generator=g) + 0.5
    assert_matches_liger(liger_and_ours({**ctor, **options}, fwd), ctor["beta"])


@pytest.mark.parametrize("loss_type,options,ref_mode", [LIGER_OPTIONS[i] for i in (2, 5, 7, 9)],
                         ids=["sequence", "cispo", "sapo", "vespo"])  # fmt: skip
def test_new_options_match_liger_triton_interpreter(loss_type, options, ref_mode):
    ctor, fwd = liger_case(loss_type, True, ref_mode, None, beta=0.3, seed=4)
    fwd["vllm_is_ratio"] = torch.rand(4, 13, generator=torch.Generator().manual_seed(6)) + 0.5
    _utils.LAUNCHES.clear()
    assert_matches_liger(liger_and_ours({**ctor, **options}, fwd, impl="triton"), ctor["beta"])
    assert _utils.LAUNCHES["grpo_token"] >= 1


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_luspo_reductions_liger_and_trl(level, impl):
    """luspo where Liger and TRL differ (a KL term over padded rows): the drop-in module gives Liger's loss and
    gradients by default, and TRL's (each row's masked sum averaged over rows) with luspo_reduction="row_sum", which
    is `fused_linear_grpo_loss`'s default."""
    from rarl_kernels import LossOptions

    ctor, fwd = liger_case("luspo", True, "logps", None, beta=0.3)
    ctor["importance_sampling_level"] = level
    assert (fwd["attention_mask"] == 0).any()
    assert_matches_liger(liger_and_ours(ctor, fwd, impl=impl), ctor["beta"])

    h = fwd["_input"].clone().requires_grad_()
    logp = fused_linear_logprobs_ref(h, fwd["lin_weight"], fwd["selected_token_ids"], temperature=0.9,
                                     bias=fwd["bias"])  # fmt: skip
    o = LossOptions("luspo", level, eps_high=0.28, beta=0.3)
    loss_tok, *_ = grpo_token_loss_ref(logp, fwd["old_per_token_logps"], fwd["ref_per_token_logps"],
                                       fwd["advantages"], fwd["attention_mask"], o)  # fmt: skip
    m = fwd["attention_mask"].float()
    trl = (loss_tok * m).sum(-1).mean()
    liger = (loss_tok * m.sum(-1, keepdim=True)).mean()
    assert (trl - liger).abs() > 1e-3 * trl.abs()  # the case tells the two apart
    (g_trl,) = torch.autograd.grad(trl, h)
    h_ours = fwd["_input"].clone().requires_grad_()
    module = FusedLinearGRPOLoss(**ctor, impl=impl, luspo_reduction="row_sum")
    loss, _ = module(**{**fwd, "_input": h_ours})
    assert_rel_close(loss, trl, rtol=1e-5, name="row_sum vs TRL")
    assert_rel_close(torch.autograd.grad(loss, h_ours)[0], g_trl, rtol=1e-5, name="grad row_sum vs TRL")
    functional, _ = fused_linear_grpo_loss(
        fwd["_input"], fwd["lin_weight"], fwd["selected_token_ids"], fwd["attention_mask"], fwd["advantages"],
        bias=fwd["bias"], logp_old=fwd["old_per_token_logps"], logp_ref=fwd["ref_per_token_logps"], beta=0.3,
        eps_high=0.28, loss_type="luspo", importance_sampling_level=level, temperature=0.9, impl=impl,
    )  # fmt: skip
    assert_rel_close(functional, trl, rtol=1e-5, name="fused_linear_grpo_loss vs TRL")
    with pytest.raises(ValueError, match="Unknown luspo reduction"):
        FusedLinearGRPOLoss(luspo_reduction="trl")


@pytest.mark.parametrize("vllm", [None, "row"], ids=["", "vllm-row"])
@pytest.mark.parametrize("old", [False, True], ids=["on-policy", "old"])
def test_luspo_matches_liger_where_they_agree(old, vllm):
    """Sequence-level ratio, no reference (the KL term is 0), rollout weights per row: Liger's and TRL's luspo agree."""
    ctor, fwd = liger_case("luspo", old, "none", None, beta=0.3)
    if vllm is not None:
        fwd["vllm_is_ratio"] = torch.rand(4, 1, generator=torch.Generator().manual_seed(5)) + 0.5
    ctor.update(importance_sampling_level="sequence", delta=1.1)
    assert_matches_liger(liger_and_ours(ctor, fwd), ctor["beta"])


# ---- the loss types and options beyond the clipped token-level surrogate ---------------------------------------

OPTIONS = [
    pytest.param("grpo", dict(delta=1.1), id="delta"),
    pytest.param("dapo", dict(importance_sampling_level="sequence"), id="sequence"),
    pytest.param("grpo", dict(importance_sampling_level="sequence", delta=1.05, bias_correction_kl=True, beta=0.3),
                 id="sequence-delta-bias-corr"),
    pytest.param("luspo", dict(importance_sampling_level="sequence"), id="luspo"),
    pytest.param("luspo", dict(luspo_reduction="length_weighted_mean"), id="luspo-liger"),
    pytest.param("cispo", dict(eps_high=1.1, bias_correction_kl=True), id="cispo"),
    pytest.param("sapo", dict(sapo_temperature_pos=0.7, sapo_temperature_neg=1.6), id="sapo"),
    pytest.param("vespo", dict(vespo_k_pos=1.5, vespo_lambda_pos=1.0), id="vespo"),
]


@pytest.mark.parametrize("loss_type,options", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_options_match_reference(impl, dtype, loss_type, options):
    """Every new option, loss and the three gradients, against the reference (fp32: 3e-5 relative; bf16: at most
    twice torch's own bf16 error from the fp32 truth). Sequence-level losses and VESPO cut the 24-row budget at
    sequence ends (three chunks of 21 rows); the others take 32-row chunks (the interpreter's row tile)."""
    _utils.LAUNCHES.clear()
    check_against_reference(impl, 3, 21, 72, 1000, dtype, loss_type, 0.7, **options)
    if impl == "triton":
        whole = options.get("importance_sampling_level") == "sequence" or loss_type == "vespo"
        assert all(_utils.LAUNCHES[name] == (3 if whole else 2) for name in FUSED_KERNELS[:-1]), dict(_utils.LAUNCHES)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("loss_type,options", [OPTIONS[1], OPTIONS[-1]])
def test_sequences_longer_than_a_chunk(impl, loss_type, options):
    """A sequence-level loss whose sequences (T = 40) do not fit the chunk (8 rows) takes the log-prob pre-pass;
    one that fits (45 rows) cuts chunks at sequence ends (40 rows: three chunks for three sequences)."""
    for rows, chunks, prepass in ((8, None, 1), (45, 3, 0)):
        _utils.LAUNCHES.clear()
        check_against_reference(impl, 3, 40, 24, 300, torch.float32, loss_type, 1.0, chunk_rows=rows, **options)
        if impl == "triton":
            assert _utils.LAUNCHES["linear_logprobs_fwd"] == prepass
            assert chunks is None or _utils.LAUNCHES["grpo_logits_partials"] == chunks


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,V", [(4, 1024, 2048, 151936), (3, 333, 3584, 151936)])
def test_gpu_compiled_matches_reference(B, T, H, V):
    assert not _utils.interpreting(), "run GPU tests with TRITON_INTERPRET=0"
    _utils.LAUNCHES.clear()
    check_against_reference("triton", B, T, H, V, torch.bfloat16, "dapo", 1.0, device="cuda")
    for name in FUSED_KERNELS:
        assert _utils.LAUNCHES[name] >= 1, name


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_confident_rows_keep_their_small_log_probs(impl):
    """The label log p of confident rows at |logits| ~ 1e4 (see test_kernels_logprobs.py's twin): with the old
    log p set to the fp64 truth the ratio is 1 to a few fp32 epsilons; z - lse would put it 1e-4 off."""
    V, H = 300, 8
    g = torch.Generator().manual_seed(0)
    z = 1e4 - 15 - 5 * torch.rand(3, V, generator=g)
    z[0, 7], z[1, 123], z[2, 299] = 1e4, 1e4 - 2, 1e4
    h, w = torch.eye(3, H)[None], torch.zeros(V, H)
    w[:, :3] = z.t()
    y = z.argmax(-1)[None]
    truth = torch.log_softmax(z.double(), -1).gather(1, y.t()).t().float()
    _, metrics = fused_linear_grpo_loss(h, w, y, torch.ones_like(y), torch.ones(1), logp_old=truth, beta=0.0,
                                        impl=impl)  # fmt: skip
    assert abs(metrics["ratio_mean"].item() - 1.0) <= 8 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("bias_correction_kl", [False, True])
@pytest.mark.parametrize("impl", ["triton", "chunked", "torch"])
def test_per_token_values(impl, bias_correction_kl):
    """return_per_token: the per-token log-probs, entropy, KL, ratio and clip flags of the pass, without gradient,
    equal to the reference's; the loss and gradients are those of the plain call."""
    B, T, H, V = 3, 21, 72, 1000
    d = make_batch(B, T, H, V, temperature=0.7)
    kw = dict(logp_old=d["old"], logp_ref=d["ref"], temperature=0.7, beta=0.04, eps_high=0.28,
              bias_correction_kl=bias_correction_kl)  # fmt: skip
    args = (d["hidden"], d["weight"], d["labels"], d["mask"], d["adv"])
    loss, metrics, per_token = fused_linear_grpo_loss(*args, bias=d["bias"], impl=impl, chunk_bytes=24 * V * 4,
                                                      return_per_token=True, **kw)  # fmt: skip
    plain, _ = fused_linear_grpo_loss(*args, bias=d["bias"], impl=impl, chunk_bytes=24 * V * 4, **kw)
    assert loss.item() == plain.item() and loss.requires_grad
    assert sorted(per_token) == ["clipped", "entropy", "kl", "logp", "ratio"]
    logp, ent = fused_linear_logprobs_ref(d["hidden"], d["weight"], d["labels"], bias=d["bias"], temperature=0.7,
                                          return_entropy=True)  # fmt: skip
    ratio = torch.exp(logp - d["old"])
    k3 = torch.exp(d["ref"] - logp) - (d["ref"] - logp) - 1
    adv = d["adv"][:, None]
    clipped = ((ratio < 0.8) & (adv < 0)) | ((ratio > 1.28) & (adv > 0))
    expected = dict(logp=logp, entropy=ent, ratio=ratio, kl=k3 * ratio if bias_correction_kl else k3,
                    clipped=clipped.float())  # fmt: skip
    for name, value in per_token.items():
        assert value.shape == (B, T) and not value.requires_grad, name
        torch.testing.assert_close(value, expected[name].detach(), rtol=2e-5, atol=2e-6, msg=name)
    torch.testing.assert_close(metrics["kl_mean"], (per_token["kl"] * d["mask"]).sum() / d["mask"].sum())
    _, _, without_entropy = fused_linear_grpo_loss(*args, impl=impl, compute_entropy=False, return_per_token=True)
    assert "entropy" not in without_entropy
