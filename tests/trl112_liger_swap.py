"""TRL 1.12's GRPOTrainer trains two steps on CPU with our FusedLinearGRPOLoss bound where it looks up Liger's
LigerFusedLinearGRPOLoss (as kernels/README.md documents), and gives the run it gives with Liger's.

TRL 1.12 is the newest release whose GRPOTrainer calls Liger's loss (1.13 calls a copy vendored into
`trl.losses`, 1.14+ has no Liger-style loss); the venv has TRL 1.16. This module is therefore not collected by
the suite: tests/test_trainer_releases.py runs it in a subprocess with TRL 1.12's overlay (`make trainers`) in
front of the venv's packages.
"""

import math

import pytest
import torch
import trl
import trl.trainer.grpo_trainer as grpo_trainer
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
from safetensors.torch import load_file

from rarl_kernels import FusedLinearGRPOLoss
from tests.helpers.tiny_lm import PROMPTS, distinct_characters, save_tiny_lm

# GRPOConfig overrides per case.
CASES = [
    # Reference model, KL metric, on- and off-policy steps, with TRL 1.12's default use_bias_correction_kl=True:
    # the KL term (and the logged KL) times the importance ratio, whose gradient counts on-policy too.
    pytest.param({"beta": 0.1}, id="beta0.1"),
    # The same without the correction (plain k3 KL).
    pytest.param({"beta": 0.1, "use_bias_correction_kl": False}, id="beta0.1-no-bias-correction"),
    # TRL's defaults as they are (beta=0, use_bias_correction_kl=True: the flag changes nothing without a KL term).
    pytest.param({}, id="trl-defaults"),
    # luspo (at TRL's default token level) with a KL term over padded completions: where Liger's luspo differs from
    # TRL's own loss, the drop-in gives Liger's numbers (its default luspo_reduction): the run TRL 1.12 gives with
    # Liger.
    pytest.param({"beta": 0.1, "loss_type": "luspo"}, id="luspo-beta0.1"),
]


def _counting(cls, *, eager=False):
    """Subclass of `cls` whose forward counts its calls (`calls`); `eager` forces Liger's compiled=False."""

    class Counting(cls):
        calls = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **({**kwargs, "compiled": False} if eager else kwargs))

        def forward(self, *args, **kwargs):
            type(self).calls += 1
            return super().forward(*args, **kwargs)

    Counting.__name__ = Counting.__qualname__ = f"Counting{cls.__name__}"
    return Counting


class _TRLLuspo(FusedLinearGRPOLoss):
    """Ours with TRL's luspo aggregation (masked row sums) instead of the drop-in's default, Liger's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, luspo_reduction="row_sum", **kwargs)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    assert trl.__version__ == "1.12.0", f"run under TRL 1.12 (make trainers), not {trl.__version__}"
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def _train(model_dir, out_dir, loss_cls, overrides, monkeypatch):
    """Two GRPO steps with `loss_cls` bound where TRL looks up Liger's loss; returns the trainer."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    assert hasattr(grpo_trainer, "LigerFusedLinearGRPOLoss"), f"TRL {trl.__version__} no longer uses Liger's loss"
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    args = trl.GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=7,
        per_device_train_batch_size=4,
        num_generations=4,
        steps_per_generation=2,  # one rollout of 8 completions, two optimizer steps: the second is off-policy
        max_completion_length=8,
        max_steps=2,
        # Plain SGD, so that the weights differ by lr x the gradient difference: AdamW's g / sqrt(v) turns gradients
        # that are zero up to rounding (k_proj.bias: softmax is shift-invariant) into lr-sized steps, amplifying
        # rounding noise (seen: 3e-6 after two AdamW steps, 6e-8 with SGD). lr is large (the gradient is clipped to
        # norm 1) so that step 2 sees a moved policy: KL > 0 and clipped ratios.
        optim="sgd",
        learning_rate=2.0,
        use_liger_kernel=True,
        # use_liger_kernel also makes transformers' Trainer patch Liger's Triton layers into the model, some
        # (rope, swiglu) by rebinding names in modeling_qwen2 for the whole process; they are not under test
        # (and on CPU run only in the Triton interpreter), so none is applied: only the GRPO loss differs.
        liger_kernel_config=dict.fromkeys(
            ("rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy"), False
        ),
        # A random model almost never samples EOS: favour it while sampling, so that some completions end
        # early and the loss mask has padding (the loss uses the model's own log-probs, without this bias).
        generation_kwargs={"sequence_bias": [[[tok.eos_token_id], 4.0]]},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **overrides,
    )
    with monkeypatch.context() as mp:
        mp.setattr(grpo_trainer, "LigerFusedLinearGRPOLoss", loss_cls)  # before the trainer is built
        trainer = trl.GRPOTrainer(
            model=str(model_dir),
            reward_funcs=distinct_characters,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
            processing_class=tok,
        )
    assert type(trainer.liger_loss) is loss_cls
    assert trainer.liger_loss.use_bias_correction_kl is args.use_bias_correction_kl  # TRL passes it through
    trainer.train()
    return trainer


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides", CASES)
def test_grpo_trainer_with_our_loss_matches_liger(tiny_lm, tmp_path, monkeypatch, overrides):
    ours_cls = _counting(FusedLinearGRPOLoss)
    # Liger's with compiled=False: the same torch code without torch.compile's ~20 s first call on CPU.
    liger_cls = _counting(LigerFusedLinearGRPOLoss, eager=True)
    ours = _train(tiny_lm, tmp_path / "ours", ours_cls, overrides, monkeypatch)
    liger = _train(tiny_lm, tmp_path / "liger", liger_cls, overrides, monkeypatch)

    assert ours_cls.calls == liger_cls.calls >= 2  # one loss call per optimizer step
    # Both runs start from the same checkpoint and seed and consume the RNG identically (the losses draw no
    # random numbers), so they sample the same completions; per call the two losses agree to ~1e-6 in fp32,
    # so the logged losses/metrics agree far inside rel 1e-4 (seen: ~1e-7) and the weights after two SGD steps
    # within atol 1e-5 (seen: 6e-8; the steps move them by up to ~1e-1).
    ours_logs = [e for e in ours.state.log_history if "loss" in e]
    liger_logs = [e for e in liger.state.log_history if "loss" in e]
    assert len(ours_logs) == len(liger_logs) == 2
    assert liger_logs[1]["clip_ratio"] > 0  # step 2 is off-policy: old log-probs given, some ratios clipped
    # completions of different lengths, so the loss mask has padding (where Liger's and TRL's luspo differ)
    assert liger_logs[0]["completions/min_length"] < liger_logs[0]["completions/max_length"]
    for step, (o, r) in enumerate(zip(ours_logs, liger_logs), 1):
        assert o.get("completions/mean_length") == r.get("completions/mean_length"), step  # same samples
        assert o.get("reward") == r.get("reward"), step
        assert ("kl" in o) == ("kl" in r) == (overrides.get("beta", 0.0) != 0.0), step
        for key in ("loss", "grad_norm", "kl", "clip_ratio"):
            if key in r:
                assert math.isclose(o[key], r[key], rel_tol=1e-4, abs_tol=1e-6), (step, key, o[key], r[key])
    if overrides.get("loss_type") == "luspo":  # the run tells Liger's luspo from TRL's: ours matched the former
        trl_form = _train(tiny_lm, tmp_path / "row_sum", _counting(_TRLLuspo), overrides, monkeypatch)
        trl_logs = [e for e in trl_form.state.log_history if "loss" in e]
        assert any(not math.isclose(t["loss"], r["loss"], rel_tol=1e-3) for t, r in zip(trl_logs, liger_logs))
    initial = load_file(tiny_lm / "model.safetensors")
    liger_sd = liger.model.state_dict()
    moved = max((p - initial[name]).abs().max().item() for name, p in liger_sd.items())
    assert moved > 1e-2, moved  # the weight check below is not vacuous
    for name, p in ours.model.state_dict().items():
        torch.testing.assert_close(p, liger_sd[name], rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
