"""`FusedLinearGRPOLoss`: a drop-in for Liger's `LigerFusedLinearGRPOLoss`.

The same constructor (positional order, names and defaults) and forward arguments, the same loss, gradients and
metrics list (KL mean first when beta != 0, clip ratio last), computed by `fused_linear_grpo_loss`; invalid
options raise the exception type Liger raises (ValueError; where Liger asserts, a ValueError too). `compiled` and
`chunk_size` are accepted and ignored (the work buffer is bounded by `chunk_bytes` instead).

A drop-in gives the numbers of what it replaces: where Liger's luspo differs from TRL's (a per-token term over
padded rows, `loss_types.LUSPO_REDUCTIONS`), this module computes Liger's by default; `luspo_reduction="row_sum"`
gives TRL's, which `fused_linear_grpo_loss`, the TRL integration and rarl-fast's trainer use.
"""

from __future__ import annotations

import torch

from rarl_kernels._utils import world_size
from rarl_kernels.fused_grpo import fused_linear_grpo_loss
from rarl_kernels.loss_types import AGGREGATION, LuspoReduction, check_loss_params


class FusedLinearGRPOLoss(torch.nn.Module):
    """GRPO-family loss from hidden states and the lm_head weight; see `fused_linear_grpo_loss`.

    Every loss type (grpo, bnpo, dapo, dr_grpo, cispo, sapo, luspo, vespo), token- and sequence-level importance
    sampling, delta, reference log-probs given or computed from ref_input/ref_weight/ref_bias, old log-probs given
    or None (on-policy), vllm_is_ratio, num_items_in_batch, temperature, bias, use_bias_correction_kl. Extra
    keyword-only arguments: impl ("triton" | "chunked" | "torch" | None), chunk_bytes (work-buffer budget) and
    luspo_reduction (default Liger's "length_weighted_mean"; "row_sum" is TRL's, see the module docstring).
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
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        impl: str | None = None,
        chunk_bytes: int | None = None,
        luspo_reduction: LuspoReduction = "length_weighted_mean",
    ):
        super().__init__()
        check_loss_params(delta=delta, sapo_temperature_pos=sapo_temperature_pos,
                          sapo_temperature_neg=sapo_temperature_neg, luspo_reduction=luspo_reduction)  # fmt: skip
        self.beta, self.compiled, self.use_ref_model, self.chunk_size = beta, compiled, use_ref_model, chunk_size
        self.epsilon_low, self.epsilon_high, self.loss_type = epsilon_low, epsilon_high, loss_type
        self.max_completion_length, self.importance_sampling_level = max_completion_length, importance_sampling_level
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg
        self.temperature, self.delta, self.use_bias_correction_kl = temperature, delta, bool(use_bias_correction_kl)
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg
        self.impl, self.chunk_bytes, self.luspo_reduction = impl, chunk_bytes, luspo_reduction

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
        if vllm_is_ratio is not None and vllm_is_ratio.reshape(attention_mask.shape[0], -1).shape[1] not in (
            1, attention_mask.shape[1]
        ):  # fmt: skip
            raise ValueError(f"vllm_is_ratio must be [B], [B, 1] or [B, T], got {tuple(vllm_is_ratio.shape)}")
        ws = world_size()
        if AGGREGATION.get(self.loss_type) == "global_tokens" and num_items_in_batch is None and ws > 1:
            # Liger normalizes by the global token count / world size; one all-reduce, no host sync.
            num_items_in_batch = attention_mask.float().sum()
            torch.distributed.all_reduce(num_items_in_batch)
        loss, metrics = fused_linear_grpo_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages,
            bias=bias, logp_old=old_per_token_logps, logp_ref=ref_per_token_logps,
            ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias, is_ratio=vllm_is_ratio,
            eps_low=self.epsilon_low, eps_high=self.epsilon_high, beta=self.beta, loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level, delta=self.delta,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos, vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg, bias_correction_kl=self.use_bias_correction_kl,
            max_completion_length=self.max_completion_length, num_items_in_batch=num_items_in_batch,
            world_size=ws, luspo_reduction=self.luspo_reduction, temperature=self.temperature, compute_entropy=False,
            impl=self.impl, chunk_bytes=self.chunk_bytes,
        )  # fmt: skip
        out = [metrics["kl_mean"]] if self.beta != 0.0 else []
        return loss, [*out, metrics["clip_ratio"]]
