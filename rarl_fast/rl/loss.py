"""The policy as the optimizer sees it: one module forward = re-score + fused lm_head + GRPO loss.

Everything runs inside :class:`PolicyModule.forward`, so DDP's gradient hooks and FSDP's unsharding of the
root module's parameters (the lm_head among them) cover the fused loss, which reads ``lm_head.weight``
directly instead of calling the lm_head. The [tokens x vocab] logits are never stored (``rarl_kernels``).

Aggregation over a whole optimizer step (METHOD.md section 4): every micro-batch's loss is scaled so that the
gradients summed over micro-batches and averaged over ranks (DDP) equal the gradient of the step's loss:
token-mean over all completion tokens of the step (``bnpo``/``dapo``, via ``num_items_in_batch``), mean of
row means over all rows (``grpo``), or sum / (all rows * max_completion_length) (``dr_grpo``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rarl_fast.rollout.base import Rollouts
from rarl_fast.rollout.policy import completion_states
from rarl_kernels import fused_linear_grpo_loss, fused_linear_logprobs

__all__ = ["LossSettings", "PolicyModule", "StepCounts"]


@dataclass(frozen=True)
class LossSettings:
    """Plain values of ``cfg.loss`` plus the sampling temperature (METHOD.md section 4)."""

    beta_kl: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_type: str = "bnpo"
    temperature: float = 1.0
    max_completion_length: int = 512
    impl: str | None = None


@dataclass(frozen=True)
class StepCounts:
    """Global sizes of one optimizer step (all micro-batches, all ranks)."""

    tokens: int  # completion tokens
    rows: int  # completions
    world_size: int = 1


class PolicyModule(nn.Module):
    """Wraps a transformers Qwen2.5-VL model; what accelerate prepares for training."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _head(self) -> tuple[Tensor, Tensor | None]:
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def forward(
        self,
        rollouts: Rollouts,
        *,
        mode: str = "loss",
        advantages: Tensor | None = None,
        logp_old: Tensor | None = None,
        logp_ref: Tensor | None = None,
        settings: LossSettings | None = None,
        counts: StepCounts | None = None,
        temperature: float = 1.0,
        impl: str | None = None,
    ):
        """``mode="loss"``: (scaled loss, metrics) of the rows; ``"logprobs"``: [R, T] fp32 log-probs (0 off mask);
        ``"nll"``: (summed negative log-likelihood of the completion tokens, token count) for SFT.

        Args:
            rollouts: R rows (a micro-batch); advantages [R]; logp_old, logp_ref [R, T] or None.
        """
        states = completion_states(self.model, rollouts)
        weight, bias = self._head()
        R, T, H = states.hidden.shape
        if mode in ("logprobs", "nll"):
            labels = torch.where(states.mask, states.labels, -100)
            logp = fused_linear_logprobs(
                states.hidden.reshape(R * T, H),
                weight,
                labels.reshape(-1),
                temperature=temperature,
                bias=bias,
                impl=impl,
            ).view(R, T)
            if mode == "logprobs":
                return logp
            return -logp.sum(), states.mask.sum()
        if mode != "loss":
            raise ValueError(f"unknown mode {mode!r}")
        s = settings or LossSettings()
        c = counts or StepCounts(tokens=int(states.mask.sum()), rows=R)
        kernel_type = "dapo" if s.loss_type in ("bnpo", "dapo") else s.loss_type
        loss, metrics = fused_linear_grpo_loss(
            states.hidden,
            weight,
            states.labels,
            states.mask,
            advantages,
            bias=bias,
            logp_old=logp_old,
            logp_ref=logp_ref,
            eps_low=s.eps_low,
            eps_high=s.eps_high,
            beta=s.beta_kl,
            loss_type=kernel_type,
            max_completion_length=s.max_completion_length,
            num_items_in_batch=c.tokens,
            world_size=c.world_size,
            temperature=s.temperature,
            impl=s.impl,
        )
        if kernel_type in ("grpo", "dr_grpo"):  # the kernel divides by this call's rows: rescale to the step's
            loss = loss * (R * c.world_size / max(c.rows, 1))
        return loss, metrics
