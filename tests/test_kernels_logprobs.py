"""fused_linear_logprobs: Triton kernels (interpreter on CPU, compiled on GPU) and the chunked torch path
against the plain-torch reference, forward and every gradient."""

import pytest
import torch

import rarl_kernels
from rarl_kernels import _utils, fused_linear_logprobs, fused_linear_logprobs_ref
from rarl_kernels.testing import LargestTensorMode, assert_rel_close, assert_three_way, contraction_orders

pytestmark = pytest.mark.usefixtures("fast_interpreter")  # conftest.py


def make_inputs(N, H, V, dtype, *, bias, seed=0, device="cpu", ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    b = torch.randn(V, generator=g) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    if ignore and N > 2:
        y[2] = -100  # ignored label: logp 0, no gradient through it
    up = torch.randn(2, N, generator=g)  # upstream gradients for logp and entropy
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()
    return cast(h), cast(w), cast(b), y.to(device), up.to(device)


def run(fn, h, w, b, y, up, temperature):
    logp, ent = fn(h, w, y, temperature=temperature, bias=b, return_entropy=True)
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad((logp * up[0]).sum() + (ent * up[1]).sum(), params)
    return [logp, ent, *grads]


def check(impl, N, H, V, dtype, bias, temperature, device="cpu", scale=None, truth64=False):
    h, w, b, y, up = make_inputs(N, H, V, dtype, bias=bias, device=device)
    if scale is not None:  # extreme logits: rescale the weight so that |logits| reaches `scale`
        with torch.no_grad():
            w *= scale / (h.float() @ w.float().t()).abs().max()
    names = ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"][: 4 + int(bias)]
    ours = run(lambda *a, **k: fused_linear_logprobs(*a, impl=impl, chunk_bytes=24 * V * 4, **k), h, w, b, y, up,
               temperature)  # fmt: skip
    ref32 = run(lambda *a, **k: fused_linear_logprobs_ref(*a, upcast=True, **k), h, w, b, y, up, temperature)
    for t in ours:
        assert torch.isfinite(t).all()
    if truth64 or scale is not None:
        # |logits| ~ 1e4 costs fp32 ~1e-3 absolute, and sums over V=151936 their own rounding: judge the kernel
        # and torch's fp32 against fp64.
        f64 = lambda t: None if t is None else t.detach().double().requires_grad_()
        ref64 = run(fused_linear_logprobs_ref, f64(h), f64(w), f64(b), y, up.double(), temperature)
        # torch's fp32 error over 9 summation orders (the hidden dimension permuted): one order's error is a
        # single draw that can land far below the typical rounding
        refs32 = [ref32]
        for p, inv in contraction_orders(H, 8):
            r = run(lambda *a, **k: fused_linear_logprobs_ref(*a, upcast=True, **k), h[:, p], w[:, p], b, y, up,
                    temperature)  # fmt: skip
            refs32.append([r[0], r[1], r[2][:, inv], r[3][:, inv], *r[4:]])
        for i, (name, a, r64) in enumerate(zip(names, ours, ref64)):
            assert_three_way(a, [r[i] for r in refs32], r64, atol=1e-5 * r64.abs().max().item(), name=name)
    elif dtype == torch.float32:
        for name, a, r in zip(names, ours, ref32):
            assert_rel_close(a, r, rtol=3e-5, name=name)
    else:
        ref_lp = run(fused_linear_logprobs_ref, h, w, b, y, up, temperature)
        for name, a, rl, r in zip(names, ours, ref_lp, ref32):
            assert_three_way(a, rl, r, atol=2**-8 * r.float().abs().max().item() + 1e-3, name=name)
    if N > 2:
        assert ours[0][2] == 0 and ref32[0][2] == 0


SHAPES = [
    pytest.param(63, 72, 1000, torch.float32, True, 0.7, id="N63-H72-V1000-fp32-bias-T0.7"),
    pytest.param(63, 72, 1000, torch.bfloat16, True, 0.7, id="N63-H72-V1000-bf16-bias-T0.7"),
    pytest.param(1, 72, 1000, torch.float32, False, 1.0, id="N1-H72-V1000-fp32"),
    pytest.param(1, 72, 1000, torch.bfloat16, False, 1.3, id="N1-H72-V1000-bf16-T1.3"),
]


@pytest.mark.parametrize("N,H,V,dtype,bias,temperature", SHAPES)
def test_triton_interpreter_matches_reference(N, H, V, dtype, bias, temperature):
    _utils.LAUNCHES.clear()
    check("triton", N, H, V, dtype, bias, temperature)
    assert _utils.LAUNCHES["linear_logprobs_fwd"] == 1
    assert _utils.LAUNCHES["linear_logprobs_dlogits"] >= 1
    assert _utils.LAUNCHES["matmul"] >= 2  # grad_hidden and grad_weight contractions


@pytest.mark.parametrize("N,H,V,dtype,bias,temperature", SHAPES)
def test_chunked_matches_reference(N, H, V, dtype, bias, temperature):
    _utils.LAUNCHES.clear()
    check("chunked", N, H, V, dtype, bias, temperature)
    assert sum(_utils.LAUNCHES.values()) == 0


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_extreme_logits(impl):
    check(impl, 20, 40, 300, torch.float32, False, 1.0, scale=1e4)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_confident_rows_keep_their_small_log_probs(impl):
    """|logits| ~ 1e4 with the top logit 15 or more above the rest: log p(top) ~ -1e-4 is below the spacing of
    fp32 numbers near the logsumexp (1e-3), so z - lse gives 0 or -1e-3. The kernels keep it, and the entropy
    (also ~1e-4), to a few fp32 epsilons near 1 (1e-6; log of a sum near 1 costs that much in torch too). One-hot
    hidden rows make the logits exactly the fp32 values chosen."""
    V, H = 300, 8
    g = torch.Generator().manual_seed(0)
    z = 1e4 - 15 - 5 * torch.rand(3, V, generator=g)
    z[0, 7], z[1, 123], z[2, 299] = 1e4, 1e4 - 2, 1e4  # row 1: top only 13 above the rest
    h, w = torch.eye(3, H), torch.zeros(V, H)
    w[:, :3] = z.t()
    y = z.argmax(-1)
    logp, ent = fused_linear_logprobs(h, w, y, impl=impl, return_entropy=True)
    truth = torch.log_softmax(z.double(), -1)
    atol = 8 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(logp, truth.gather(1, y[:, None]).squeeze(1).float(), rtol=0, atol=atol)
    torch.testing.assert_close(ent, -(truth.exp() * truth).sum(-1).float(), rtol=0, atol=atol)
    assert (logp < 0).all() and (logp > -1e-3).all()


def test_full_vocab_few_rows(monkeypatch):
    """The real Qwen2.5-VL vocabulary (151936) with 3 rows; wide tiles keep the interpreter quick."""
    monkeypatch.setitem(_utils.TILE_OVERRIDES, "BLOCK_V", 8192)
    monkeypatch.setitem(_utils.TILE_OVERRIDES, "BLOCK_M", 8192)
    monkeypatch.setitem(_utils.TILE_OVERRIDES, "BLOCK_K", 8192)
    _utils.LAUNCHES.clear()
    check("triton", 3, 24, 151936, torch.float32, True, 0.9, truth64=True)
    assert _utils.LAUNCHES["linear_logprobs_fwd"] == 1


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_never_materializes_a_quarter_of_the_logits(impl):
    N, H, V = 160, 32, 512
    h, w, b, y, up = make_inputs(N, H, V, torch.float32, bias=True)
    with LargestTensorMode() as mode:
        logp, ent = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, impl=impl, chunk_bytes=8 * V * 4)
        torch.autograd.grad((logp * up[0]).sum() + (ent * up[1]).sum(), [h, w, b])
    assert mode.largest < N * V // 4, (mode.largest, mode.largest_op)


def test_default_impl_on_cpu_is_chunked():
    _utils.LAUNCHES.clear()
    h, w, _, y, _ = make_inputs(8, 16, 64, torch.float32, bias=False)
    logp = fused_linear_logprobs(h, w, y)
    assert logp.shape == (8,) and logp.dtype == torch.float32
    assert sum(_utils.LAUNCHES.values()) == 0
    assert rarl_kernels._utils.resolve_impl(None, torch.device("cpu")) == "chunked"


def test_batched_shapes_and_no_grad_for_frozen_weight():
    h, w, _, y, _ = make_inputs(12, 16, 64, torch.float32, bias=False, ignore=False)
    w = w.detach()
    logp = fused_linear_logprobs(h.view(3, 4, 16), w, y.view(3, 4))
    assert logp.shape == (3, 4)
    (gh,) = torch.autograd.grad(logp.sum(), [h])
    ref = fused_linear_logprobs_ref(h, w, y)
    (gr,) = torch.autograd.grad(ref.sum(), [h])
    assert_rel_close(gh, gr, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("N,H,V", [(1, 2048, 151936), (1000, 2048, 151936), (4093, 3584, 32003)])
def test_gpu_compiled_matches_reference(N, H, V):
    assert not _utils.interpreting(), "run GPU tests with TRITON_INTERPRET=0"
    _utils.LAUNCHES.clear()
    check("triton", N, H, V, torch.bfloat16, False, 0.9, device="cuda")
    assert _utils.LAUNCHES["linear_logprobs_fwd"] == 1


def test_memory_probe_catches_materialized_logits():
    """The probe above is meaningful: the torch reference does create [N, V] tensors."""
    N, H, V = 160, 32, 512
    h, w, b, y, _ = make_inputs(N, H, V, torch.float32, bias=True)
    with LargestTensorMode() as mode:
        fused_linear_logprobs(h, w, y, bias=b, impl="torch").sum().backward()
    assert mode.largest >= N * V


FORMS = [
    pytest.param({}, id="plain"),
    pytest.param({"logit_scale": 2.5}, id="scale"),
    pytest.param({"softcap": 3.0, "logit_scale": 0.7}, id="softcap-scale"),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_statistics_match_reference(impl, form):
    """Every per-row statistic, in one pass, with a logit scale and soft cap; gradients through logp and the
    entropy (fp32, relative 3e-5 of the largest value, as the plain log-probs)."""
    N, H, V = 63, 72, 1000
    h, w, b, y, up = make_inputs(N, H, V, torch.float32, bias=True)
    with torch.no_grad():  # a third of the labels are the argmax, so that is_argmax is True somewhere
        z = (h @ w.t() + b) * form.get("logit_scale", 1.0)
        y[::3] = z.argmax(-1)[::3]
    y[2] = -100
    params = [h, w, b]
    ours = rarl_kernels.fused_linear_logprob_stats(h, w, y, bias=b, temperature=0.7, stats=rarl_kernels.STATISTICS,
                                                   impl=impl, chunk_bytes=24 * V * 4, **form)  # fmt: skip
    ref = rarl_kernels.fused_linear_logprob_stats_ref(h, w, y, bias=b, temperature=0.7, **form)
    assert ours.is_argmax.dtype == torch.bool and ours.is_argmax.sum() >= N // 3 - 1
    assert torch.equal(ours.is_argmax, ref[4]) and not ours.is_argmax[2]
    for name, a, r in zip(ours._fields[:4], ours[:4], ref[:4]):
        assert_rel_close(a, r, rtol=3e-5, name=name)
    assert not any(t.requires_grad for t in ours[2:]) and ours.logp.requires_grad and ours.entropy.requires_grad
    loss = lambda out: (out[0] * up[0]).sum() + (out[1] * up[1]).sum()
    grads = torch.autograd.grad(loss(ours), params, retain_graph=True)
    for name, a, r in zip("hwb", grads, torch.autograd.grad(loss(ref), params, retain_graph=True)):
        assert_rel_close(a, r, rtol=3e-5, name=f"grad_{name}")
    # only logp trained on (the entropy logged): the same gradients as of logp alone
    ga = torch.autograd.grad(ours.logp.sum(), params)
    gr = torch.autograd.grad(ref[0].sum(), params)
    for name, a, r in zip("hwb", ga, gr):
        assert_rel_close(a, r, rtol=3e-5, name=f"grad_{name} of logp")


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_argmax_is_the_first_maximum(impl):
    """A label tied with an earlier column is not the argmax (torch.argmax and TRL's convention); one tied with a
    later column is; an ignored label never is. One-hot hidden rows make the logits exactly the values chosen."""
    V, H = 300, 8
    z = torch.linspace(-3, 3, V).repeat(4, 1)
    z[:, [10, 200]] = 5.0
    h, w = torch.eye(4, H), torch.zeros(V, H)
    w[:, :4] = z.t()
    y = torch.tensor([200, 10, 150, -100])
    out = rarl_kernels.fused_linear_logprob_stats(h, w, y, stats=("is_argmax",), impl=impl)
    assert out.is_argmax.tolist() == [False, True, False, False]
    assert out.entropy is None and out.mean_logit is None


def test_statistics_reject_unknown_names():
    h, w, _, y, _ = make_inputs(4, 8, 32, torch.float32, bias=False)
    with pytest.raises(ValueError, match="unknown statistics"):
        rarl_kernels.fused_linear_logprob_stats(h, w, y, stats=("entropy", "perplexity"))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_statistics_never_materialize_a_quarter_of_the_logits(impl):
    N, H, V = 160, 32, 512
    h, w, b, y, up = make_inputs(N, H, V, torch.float32, bias=True)
    with LargestTensorMode() as mode:
        out = rarl_kernels.fused_linear_logprob_stats(h, w, y, bias=b, softcap=4.0, stats=rarl_kernels.STATISTICS,
                                                      impl=impl, chunk_bytes=8 * V * 4)  # fmt: skip
        torch.autograd.grad((out.logp * up[0]).sum() + (out.entropy * up[1]).sum(), [h, w, b])
    assert mode.largest < N * V // 4, (mode.largest, mode.largest_op)
