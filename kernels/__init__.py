"""rarl_kernels: fused lm_head + log-prob + GRPO-family loss kernels (Triton) with plain-torch references.

Standalone: depends on torch and triton only, and never imports ``rarl_fast``. Every op takes
``impl="triton" | "chunked" | "torch"``; the default is Triton on CUDA and the chunked torch path elsewhere.
"""

from rarl_kernels._utils import LAUNCHES
from rarl_kernels.aggregation import aggregate, token_weights
from rarl_kernels.fused_grpo import fused_linear_grpo_loss
from rarl_kernels.grpo_loss import grpo_loss
from rarl_kernels.linear_logprobs import STATISTICS, LogprobStats, fused_linear_logprob_stats, fused_linear_logprobs
from rarl_kernels.loss_types import LOSS_TYPES, LossOptions
from rarl_kernels.module import FusedLinearGRPOLoss
from rarl_kernels.reference import (
    fused_linear_grpo_loss_ref,
    fused_linear_logprob_stats_ref,
    fused_linear_logprobs_ref,
    grpo_loss_ref,
)

__version__ = "0.1.0"

__all__ = [
    "LAUNCHES",
    "LOSS_TYPES",
    "STATISTICS",
    "FusedLinearGRPOLoss",
    "LogprobStats",
    "LossOptions",
    "aggregate",
    "fused_linear_grpo_loss",
    "fused_linear_grpo_loss_ref",
    "fused_linear_logprob_stats",
    "fused_linear_logprob_stats_ref",
    "fused_linear_logprobs",
    "fused_linear_logprobs_ref",
    "grpo_loss",
    "grpo_loss_ref",
    "token_weights",
]
