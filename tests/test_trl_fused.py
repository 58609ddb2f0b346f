"""TRL 1.16's GRPOTrainer, two steps on a tiny model on the CPU, three ways: as shipped, with our kernel in TRL's
fused lm-head (`patch_trl()`), and with our fused GRPO loss (`FusedGRPOTrainer`). Losses, logged metrics and final
weights agree within 1e-5 (fp32), and our kernels are the ones that ran.
"""

import functools
import math
import warnings

import pytest
import torch
import trl
import trl.trainer.utils as trl_utils
from safetensors.torch import load_file
from trl.kernels import ChunkedLogProbFunction as TRLKernel

import rarl_kernels.integrations.trl as rarl_trl
from tests.helpers.tiny_lm import PROMPTS, distinct_characters, save_tiny_lm

TRL_VERSION = "1.16.0"

ACCUMULATE = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2, "steps_per_generation": 4}
# GRPOConfig overrides per case, and the words of the one warning when FusedGRPOTrainer must run TRL's own loss
# (None: the fused loss runs). Every TRL 1.16 loss type and option the fused kernels implement is here.
CASES = [
    # TRL's defaults (dapo, beta 0); step 2 is off-policy (old log-probs, clipped ratios)
    pytest.param({}, None, id="defaults"),
    # a reference model and KL term, with TRL's default bias correction (KL times the ratio)
    pytest.param({"beta": 0.1, "loss_type": "grpo"}, None, id="grpo-beta0.1"),
    pytest.param({"beta": 0.1, "use_bias_correction_kl": False, "loss_type": "bnpo", "epsilon_high": 0.28}, None,
                 id="bnpo-beta0.1-plain-kl"),
    # two accumulation steps per optimizer step (the loss scaled per micro-batch), one rollout for both steps
    pytest.param({"loss_type": "dr_grpo", **ACCUMULATE}, None, id="dr_grpo-accumulate2"),
    pytest.param({"beta": 0.05, **ACCUMULATE}, None, id="dapo-beta0.05-accumulate2"),
    # two-sided clipping: the unclipped ratio capped at delta
    pytest.param({"delta": 1.25}, None, id="dapo-delta1.25"),
    # sequence-level ratios (GSPO), with delta and the KL bias correction by the sequence's ratio
    # (a small epsilon: a sequence's mean log-ratio moves less than its tokens')
    pytest.param({"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 0.02, "delta": 1.1,
                  "beta": 0.1}, None, id="grpo-sequence-delta-beta0.1"),
    pytest.param({"loss_type": "cispo", "epsilon_high": 5.0}, None, id="cispo"),
    pytest.param({"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0, "beta": 0.1}, None,
                 id="sapo-temperatures-beta0.1"),
    pytest.param({"loss_type": "luspo", "importance_sampling_level": "sequence"}, None, id="luspo-sequence"),
    # with KL, TRL masks the padded positions before its row sums (Liger 0.8.5's luspo does not)
    pytest.param({"loss_type": "luspo", "importance_sampling_level": "sequence", "beta": 0.1}, None,
                 id="luspo-sequence-beta0.1"),
    pytest.param({"loss_type": "vespo", "vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.0,
                  "vespo_lambda_neg": 1.5, **ACCUMULATE}, None, id="vespo-params-accumulate2"),
    # TRL defines CISPO with one ratio per sequence; the fused kernels (as Liger's) do not: TRL's loss runs
    pytest.param({"loss_type": "cispo", "epsilon_high": 5.0, "importance_sampling_level": "sequence"},
                 "loss_type='cispo' with importance_sampling_level='sequence'", id="cispo-sequence-falls-back"),
]
# GRPOConfig fields that are parameters of `fused_linear_grpo_loss` under the same name.
KERNEL_OPTIONS = {"loss_type", "delta", "importance_sampling_level", "sapo_temperature_pos", "sapo_temperature_neg",
                  "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "beta"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    assert trl.__version__ == TRL_VERSION, f"constraints.txt pins TRL {TRL_VERSION}, found {trl.__version__}"
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def tiny_lm_capped(tmp_path_factory):
    """The tiny model with a logit soft cap and scale in its config: TRL's fused lm-head applies both."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm_capped"), final_logit_softcapping=3.0, logit_scale=0.8)


class KernelCalls:
    """Counts, per kernel, the lm-head passes that ran with gradient (the loss) and without (old/ref log-probs), and
    keeps the keyword arguments of each kernel's last call."""

    def __init__(self, monkeypatch):
        self.calls = {"trl": [0, 0], "ours-logprobs": [0, 0], "ours-grpo": [0, 0]}
        self.kwargs = {}
        self._wrap(monkeypatch, TRLKernel, "apply", "trl")
        self._wrap(monkeypatch, rarl_trl, "fused_linear_logprob_stats", "ours-logprobs")
        self._wrap(monkeypatch, rarl_trl, "fused_linear_grpo_loss", "ours-grpo")

    def _wrap(self, monkeypatch, owner, name, key):
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def counted(*args, **kwargs):
            self.calls[key][torch.is_grad_enabled()] += 1
            self.kwargs[key] = kwargs
            return inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, staticmethod(counted) if isinstance(owner, type) else counted)


def _train(model_dir, out_dir, overrides, way, monkeypatch, *, compact_rows=False, rows=None, processor=None):
    """Two GRPO steps, `way` = "trl" | "patch_trl" | "fused_loss"; returns (trainer, kernel calls, warnings).
    `compact_rows`: TRL's head scores only the labelled positions, as it does on Triton devices. `rows` and
    `processor`: the dataset rows and processing class (default: the text prompts and the model's tokenizer)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = processor or AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    eos = getattr(tok, "tokenizer", tok).eos_token_id
    settings = dict(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, seed=7, per_device_train_batch_size=4,
        num_generations=4,
        steps_per_generation=2,  # one rollout of 8 completions for two optimizer steps: the second is off-policy
        max_completion_length=8, max_steps=2,
        # Plain SGD: the weights differ by lr x the gradient difference (AdamW's g / sqrt(v) would turn gradients
        # that are zero up to rounding into lr-sized steps). A large lr (the gradient is clipped to norm 1) makes
        # step 2 see a moved policy: KL > 0 and clipped ratios.
        optim="sgd", learning_rate=2.0,
        # a random model almost never samples EOS: favour it while sampling, so that the loss mask has padding
        generation_kwargs={"sequence_bias": [[[eos], 4.0]]},
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    args = trl.GRPOConfig(**(settings | overrides))
    with monkeypatch.context() as mp:
        calls = KernelCalls(mp)
        if compact_rows:
            mp.setattr(trl_utils, "_use_triton", lambda device: True)  # the layout only: TRL's kernel stays in torch
        if way == "patch_trl":
            mp.setattr(trl_utils, "_ChunkedLogProbFunction", TRLKernel)  # restored on exit, after patch_trl()
            rarl_trl.patch_trl()
        cls = rarl_trl.FusedGRPOTrainer if way == "fused_loss" else trl.GRPOTrainer
        data = Dataset.from_list(rows or [{"prompt": p} for p in PROMPTS])
        trainer = cls(model=str(model_dir), reward_funcs=distinct_characters, args=args, train_dataset=data,
                      processing_class=tok)  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    assert trl_utils._ChunkedLogProbFunction is TRLKernel
    warned = [str(w.message) for w in caught if "FusedGRPOLossMixin" in str(w.message)]
    return trainer, calls.calls | {"kwargs": calls.kwargs}, warned


def _logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def _assert_same_run(ours, trl_run, overrides):
    """Same completions and rewards, losses and TRL's metrics within 1e-5, weights within 1e-5 after two steps."""
    ours_logs, trl_logs = _logs(ours), _logs(trl_run)
    assert len(ours_logs) == len(trl_logs) == 2
    for step, (o, r) in enumerate(zip(ours_logs, trl_logs), 1):
        assert sorted(o) == sorted(r), (step, sorted(set(o) ^ set(r)))
        assert o.get("completions/mean_length") == r.get("completions/mean_length"), step  # the same samples
        assert o.get("reward") == r.get("reward"), step
        for key, value in r.items():
            if key in ("step_time", "epoch", "step") or not isinstance(value, float):
                continue
            assert math.isclose(o[key], value, rel_tol=1e-5, abs_tol=1e-5), (step, key, o[key], value)
        assert ("kl" in r) == (overrides.get("beta", 0.0) != 0.0)
    if overrides.get("loss_type", "dapo") in ("grpo", "bnpo", "dr_grpo", "dapo"):
        assert max(e["clip_ratio/region_mean"] for e in trl_logs) > 0  # step 2 is off-policy with clipped ratios
    trl_sd = trl_run.model.state_dict()
    for name, p in ours.model.state_dict().items():
        torch.testing.assert_close(p, trl_sd[name], rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("overrides,fallback", CASES)
def test_grpo_trainer_three_ways(tiny_lm, tmp_path, monkeypatch, overrides, fallback):
    shipped, trl_calls, _ = _train(tiny_lm, tmp_path / "trl", overrides, "trl", monkeypatch)
    initial = load_file(tiny_lm / "model.safetensors")
    moved = max((p - initial[name]).abs().max().item() for name, p in shipped.model.state_dict().items())
    assert moved > 1e-2, moved  # the weight comparisons are not vacuous
    assert trl_calls["ours-logprobs"] == trl_calls["ours-grpo"] == [0, 0]
    losses = trl_calls["trl"][1]  # TRL's head with gradient: one per loss computation
    assert losses >= 2

    # 1. patch_trl(): every lm-head pass (loss, old and reference log-probs) is ours, none is TRL's
    patched, calls, _ = _train(tiny_lm, tmp_path / "patched", overrides, "patch_trl", monkeypatch)
    assert calls["trl"] == [0, 0] and calls["ours-logprobs"] == trl_calls["trl"], calls
    _assert_same_run(patched, shipped, overrides)

    # 2. FusedGRPOTrainer: the loss passes are our fused GRPO loss (TRL's kernel runs only without gradient, for
    # the old and reference log-probs), or TRL's own loss, with one warning, where the kernels lack the loss
    fused, calls, warned = _train(tiny_lm, tmp_path / "fused", overrides, "fused_loss", monkeypatch)
    if fallback is None:
        assert not warned and calls["ours-grpo"] == [0, losses] and calls["trl"] == [trl_calls["trl"][0], 0], calls
        # TRL's loss options reach the kernel under its names
        passed = calls["kwargs"]["ours-grpo"]
        for key in KERNEL_OPTIONS & set(overrides):
            assert passed[key] == overrides[key], (key, passed.get(key))
    else:
        assert len(warned) == 1 and fallback in warned[0], warned
        assert calls["ours-grpo"] == [0, 0] and calls["trl"] == trl_calls["trl"], calls
    _assert_same_run(fused, shipped, overrides)


def test_fused_loss_with_compact_lm_head_rows(tiny_lm, tmp_path, monkeypatch):
    """TRL's head on Triton devices passes only the labelled rows; the fused loss places them back."""
    overrides = {"beta": 0.1, "loss_type": "grpo"}
    shipped, trl_calls, _ = _train(tiny_lm, tmp_path / "trl", overrides, "trl", monkeypatch, compact_rows=True)
    fused, calls, warned = _train(tiny_lm, tmp_path / "fused", overrides, "fused_loss", monkeypatch,
                                  compact_rows=True)  # fmt: skip
    assert not warned and calls["ours-grpo"] == [0, trl_calls["trl"][1]]
    _assert_same_run(fused, shipped, overrides)


def test_soft_capped_scaled_logits(tiny_lm_capped, tmp_path, monkeypatch):
    """A model whose config sets a logit soft cap and scale: patch_trl() computes them in our kernel; the fused loss
    (plain logits only) warns once and runs TRL's loss from then on."""
    overrides = {"beta": 0.1}
    shipped, trl_calls, _ = _train(tiny_lm_capped, tmp_path / "trl", overrides, "trl", monkeypatch)
    patched, calls, _ = _train(tiny_lm_capped, tmp_path / "patched", overrides, "patch_trl", monkeypatch)
    assert calls["trl"] == [0, 0] and calls["ours-logprobs"] == trl_calls["trl"]
    _assert_same_run(patched, shipped, overrides)
    fused, calls, warned = _train(tiny_lm_capped, tmp_path / "fused", overrides, "fused_loss", monkeypatch)
    assert len(warned) == 1 and "soft-capped" in warned[0], warned
    # the first loss pass finds the cap, hands that forward to TRL's kernel and discards it: one pass more
    assert calls["ours-grpo"] == [0, 0] and calls["trl"] == [trl_calls["trl"][0], trl_calls["trl"][1] + 1], calls
    _assert_same_run(fused, shipped, overrides)


@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (3.0, 0.8)])
@pytest.mark.parametrize("outputs", [("log_probs", *rarl_trl.TRL_OUTPUTS), ("log_probs",), ("log_probs", "is_top1")])
def test_chunked_logprob_function_matches_trls(outputs, softcap, scale):
    """Our `ChunkedLogProbFunction.apply` against TRL's on the same arguments (fp32, bias, temperature 0.7, some
    targets the argmax): the five outputs (None where TRL gives None) and the gradients of the log-probs and the
    entropy w.r.t. hidden, weight and bias within 1e-5 of the largest value."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 50, 32, 500
    h, w, b = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) / 3, torch.randn(V, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = (h @ w.t() + b).argmax(-1)[::4]
    up = torch.randn(2, N, generator=g)
    results = []
    for kernel in (rarl_trl.ChunkedLogProbFunction, TRLKernel):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        out = kernel.apply(*leaves, targets, 0.7, 128, softcap, scale, outputs)
        loss = (out[0] * up[0]).sum() + ((out[1] * up[1]).sum() if out[1] is not None else 0)
        results.append((out, torch.autograd.grad(loss, leaves)))
    (ours, ours_grads), (theirs, their_grads) = results
    for name, a, r in zip(("log_probs", *rarl_trl.TRL_OUTPUTS), ours, theirs):
        assert (a is None) == (r is None) == (name not in outputs), name
        if r is not None:
            assert a.dtype == r.dtype and a.shape == r.shape and a.requires_grad == r.requires_grad, name
            if r.dtype == torch.bool:
                assert torch.equal(a, r) and r.any(), name
            else:
                torch.testing.assert_close(a, r, rtol=0, atol=1e-5 * r.abs().max().item(), msg=name)
    for name, a, r in zip("hwb", ours_grads, their_grads):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-5 * r.abs().max().item(), msg=f"grad {name}")


def test_chunked_logprob_function_under_autocast():
    """Under autocast TRL multiplies in the autocast dtype and returns fp32 per-token values; so do we (bf16:
    values within bf16 rounding of TRL's, gradients in the inputs' dtype)."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(40, 32, generator=g), torch.randn(300, 32, generator=g) / 3
    targets = torch.randint(0, 300, (40,), generator=g)
    outs = []
    for kernel in (rarl_trl.ChunkedLogProbFunction, TRLKernel):
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, ent, *_ = kernel.apply(hl, wl, None, targets, 1.0, 128, None, 1.0, ("log_probs", "entropy"))
        (logp.sum() + ent.sum()).backward()
        outs.append((logp, ent, hl.grad, wl.grad))
    for a, r in zip(*outs):
        assert a.dtype == r.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=0, atol=2e-2 * r.abs().max().item())


def test_patch_trl_refuses_trl_without_a_fused_head(monkeypatch):
    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    with pytest.raises(RuntimeError, match="has no fused lm-head"):
        rarl_trl.patch_trl()


def test_vision_language_model(tiny_vlm_dir, tmp_path, monkeypatch):
    """A tiny Qwen2.5-VL with an image per prompt: TRL's own multimodal input handling feeds both of our paths."""
    from PIL import Image

    from rarl_fast.model import load_processor

    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(4)]  # fmt: skip
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How old?"}]}],
             "image": image} for image in images]  # fmt: skip
    kw = dict(rows=rows, processor=load_processor(tiny_vlm_dir))
    overrides = {"beta": 0.1}
    shipped, trl_calls, _ = _train(tiny_vlm_dir, tmp_path / "trl", overrides, "trl", monkeypatch, **kw)
    assert shipped.state.log_history[0]["num_tokens"] > 4 * 4 * 16  # the prompts carry the image tokens
    patched, calls, _ = _train(tiny_vlm_dir, tmp_path / "patched", overrides, "patch_trl", monkeypatch, **kw)
    assert calls["trl"] == [0, 0] and calls["ours-logprobs"] == trl_calls["trl"]
    _assert_same_run(patched, shipped, overrides)
    fused, calls, warned = _train(tiny_vlm_dir, tmp_path / "fused", overrides, "fused_loss", monkeypatch, **kw)
    assert not warned and calls["ours-grpo"] == [0, trl_calls["trl"][1]]
    _assert_same_run(fused, shipped, overrides)


@pytest.mark.parametrize("loss_type", ["vespo", "cispo", "grpo"])
def test_vllm_importance_weights(tiny_lm, tmp_path, monkeypatch, loss_type):
    """vLLM's importance weights (TRL multiplies each token's policy term by them; VESPO folds them into its sequence
    weight instead): FusedGRPOTrainer's `_compute_loss` against TRL's on the same inputs (the rollout's, with the
    weights TRL sets when it samples with vLLM): loss, gradients and logged metrics within 1e-5, our kernel called."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm, padding_side="left")
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=8, loss_type=loss_type, beta=0.1,
                          epsilon_high=5.0 if loss_type == "cispo" else 0.2, report_to="none")  # fmt: skip
    trainer = rarl_trl.FusedGRPOTrainer(model=str(tiny_lm), reward_funcs=distinct_characters, args=args,
                                        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                                        processing_class=tok)  # fmt: skip
    monkeypatch.setattr(trainer, "use_vllm", True, raising=False)
    monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True, raising=False)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model.train()
    g = torch.Generator().manual_seed(3)
    B, P, T = 4, 6, 8
    V = model.config.vocab_size
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 5:] = 0
    completion_mask[3, 3:] = 0
    inputs = dict(prompt_ids=torch.randint(0, V, (B, P), generator=g), prompt_mask=prompt_mask,
                  completion_ids=torch.randint(0, V, (B, T), generator=g), completion_mask=completion_mask,
                  advantages=torch.randn(B, generator=g), num_items_in_batch=completion_mask.sum().float(),
                  importance_sampling_ratio=torch.exp(0.2 * torch.randn(B, T, generator=g)))  # fmt: skip
    with torch.no_grad():
        logp, *_ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([prompt_mask, completion_mask], 1), T,
        )  # fmt: skip
    inputs["old_per_token_logps"] = logp + 0.1 * torch.randn(B, T, generator=g)
    inputs["ref_per_token_logps"] = logp + 0.1 * torch.randn(B, T, generator=g)
    results = []
    for compute_loss in (trainer._compute_loss, lambda m, x: trl.GRPOTrainer._compute_loss(trainer, m, x)):
        with monkeypatch.context() as mp:
            calls = KernelCalls(mp)
            trainer._metrics["train"].clear()
            model.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a fallback would warn
                loss = compute_loss(model, inputs)
            loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, dict(trainer._metrics["train"]), calls.calls))
    (ours, ours_grads, ours_metrics, calls), (theirs, their_grads, their_metrics, trl_calls) = results
    assert calls["ours-grpo"] == [0, 1] and calls["trl"] == [0, 0] and trl_calls["ours-grpo"] == [0, 0], calls
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert sorted(ours_grads) == sorted(their_grads) and len(ours_grads) > 0
    for name, r in their_grads.items():
        torch.testing.assert_close(ours_grads[name], r, rtol=0, atol=1e-5 * r.abs().max().item(), msg=name)
    assert sorted(ours_metrics) == sorted(their_metrics)
    for key, values in their_metrics.items():
        assert ours_metrics[key] == pytest.approx(values, rel=1e-5, abs=1e-6), key
