"""`FusedLinearGRPOLoss`: a drop-in for Liger's `LigerFusedLinearGRPOLoss` (token-level options).

Same constructor and forward arguments, same loss, gradients and metrics list (KL mean first when
beta != 0, clip ratio last), computed by `fused_linear_grpo_loss`. Options this module does not implement
raise `NotImplementedError` naming them; `compiled` and `chunk_size` are accepted and ignored (the work
buffer is bounded by `chunk_bytes` instead).
"""

from __future__ import annotations

import torch

from rarl_kernels._utils import world_size
from rarl_kernels.fused_grpo import fused_linear_grpo_loss
from rarl_kernels.grpo_loss import LOSS_TYPES

# Liger constructor options beyond the shared ones, with the value under which they change nothing.
_LIGER_ONLY_DEFAULTS = {
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "delta": None,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
}


class FusedLinearGRPOLoss(torch.nn.Module):
    """GRPO loss from hidden states and the lm_head weight; see `fused_linear_grpo_loss`.

    Supported: loss_type grpo | bnpo | dapo | dr_grpo, importance_sampling_level "token", reference
    log-probs given or computed from ref_input/ref_weight/ref_bias, old log-probs given or None (on-policy),
    vllm_is_ratio, num_items_in_batch, temperature, bias, use_bias_correction_kl (the KL term and the KL metric
    times the importance ratio exp(logp - logp_old), with its gradient, as Liger's). Extra keywords: impl
    ("triton" | "chunked" | "torch" | None) and chunk_bytes (work-buffer budget).
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        temperature: float = 1.0,
        *,
        use_bias_correction_kl: bool = False,
        impl: str | None = None,
        chunk_bytes: int | None = None,
        **liger_only,
    ):
        super().__init__()
        unknown = sorted(set(liger_only) - set(_LIGER_ONLY_DEFAULTS))
        if unknown:
            raise TypeError(f"FusedLinearGRPOLoss got unexpected keyword arguments {unknown}")
        changed = sorted(k for k, v in liger_only.items() if v != _LIGER_ONLY_DEFAULTS[k])
        if changed:
            raise NotImplementedError(f"FusedLinearGRPOLoss does not implement {changed}")
        if loss_type not in LOSS_TYPES:
            raise NotImplementedError(f"loss_type={loss_type!r} is not implemented (supported: {LOSS_TYPES})")
        if importance_sampling_level != "token":
            raise NotImplementedError(f"importance_sampling_level={importance_sampling_level!r} (only 'token')")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        self.beta, self.compiled, self.use_ref_model, self.chunk_size = beta, compiled, use_ref_model, chunk_size
        self.epsilon_low, self.epsilon_high, self.loss_type = epsilon_low, epsilon_high, loss_type
        self.max_completion_length, self.importance_sampling_level = max_completion_length, importance_sampling_level
        self.temperature, self.impl, self.chunk_bytes = temperature, impl, chunk_bytes
        self.use_bias_correction_kl = bool(use_bias_correction_kl)

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        selected_token_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        advantages: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_per_token_logps: torch.Tensor | None = None,
        old_per_token_logps: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        vllm_is_ratio: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """_input [B, T, H]; lin_weight [V, H]; selected_token_ids, attention_mask [B, T]; advantages [B];
        ref/old_per_token_logps [B, T]; ref_input [B, T, H]; vllm_is_ratio [B, T] | [B, 1] | [B].
        Returns (loss, [kl_mean (beta != 0), clip_ratio]) as fp32 scalar tensors."""
        if self.use_ref_model:
            if ref_per_token_logps is None and ref_input is None:
                raise ValueError("use_ref_model=True needs ref_per_token_logps or ref_input")
            if ref_per_token_logps is not None:
                ref_input = None
        else:  # Liger ignores the reference then: k3 = 0 (reported as such when beta != 0)
            ref_per_token_logps = ref_input = None
        ws = world_size()
        if self.loss_type == "dapo" and num_items_in_batch is None and ws > 1:
            # Liger normalizes dapo by the global token count / world size; one all-reduce, no host sync.
            num_items_in_batch = attention_mask.float().sum()
            torch.distributed.all_reduce(num_items_in_batch)
        loss, metrics = fused_linear_grpo_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages,
            bias=bias, logp_old=old_per_token_logps, logp_ref=ref_per_token_logps,
            ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias, is_ratio=vllm_is_ratio,
            eps_low=self.epsilon_low, eps_high=self.epsilon_high, beta=self.beta, loss_type=self.loss_type,
            max_completion_length=self.max_completion_length, num_items_in_batch=num_items_in_batch,
            world_size=ws, temperature=self.temperature, compute_entropy=False,
            bias_correction_kl=self.use_bias_correction_kl, impl=self.impl, chunk_bytes=self.chunk_bytes,
        )  # fmt: skip
        out = [metrics["kl_mean"]] if self.beta != 0.0 else []
        return loss, [*out, metrics["clip_ratio"]]
