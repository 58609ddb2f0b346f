"""The GRPO-family loss types: their names, the surrogate and aggregation each uses, and the option checks.

Plain Python (no torch): the one place these facts are written. docs/method.md section 4 gives the math.

Surrogate (the per-token policy term, `grpo_loss.grpo_token`):
    clip   PPO's clipped ratio, optionally capped at `delta`: grpo, bnpo, dapo, dr_grpo, luspo
    cispo  the capped ratio, detached, times the log-prob (CISPO)
    sapo   a sigmoid gate on the ratio instead of a clip (SAPO)
    vespo  a detached gamma weight of the sequence's ratio times the log-prob (VESPO)
Aggregation (the per-token weights, `aggregation.token_weights`):
    sequence_mean   mean over rows of each row's token mean: grpo, sapo
    call_tokens     token mean over this call's mask: bnpo
    global_tokens   token sum / (num_items_in_batch / world size), or this call's count: dapo, cispo, vespo
    fixed_length    token sum / (rows * max_completion_length): dr_grpo
    sequence_sum    token sum / rows, each row counting with its length: luspo (`LUSPO_REDUCTIONS`)
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

SURROGATE = {
    "grpo": "clip",
    "bnpo": "clip",
    "dapo": "clip",
    "dr_grpo": "clip",
    "cispo": "cispo",
    "sapo": "sapo",
    "luspo": "clip",
    "vespo": "vespo",
}
AGGREGATION = {
    "grpo": "sequence_mean",
    "sapo": "sequence_mean",
    "bnpo": "call_tokens",
    "dapo": "global_tokens",
    "cispo": "global_tokens",
    "vespo": "global_tokens",
    "dr_grpo": "fixed_length",
    "luspo": "sequence_sum",
}
LOSS_TYPES = tuple(SURROGATE)
"""Every loss type."""
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
TOKEN_LEVEL_ONLY = ("cispo", "sapo", "vespo")
"""Loss types without a sequence-level form (Liger rejects the combination; VESPO builds its own sequence weight)."""
LuspoReduction = Literal["row_sum", "length_weighted_mean"]
LUSPO_REDUCTIONS = get_args(LuspoReduction)
"""How luspo sums its per-token losses. "row_sum": each row's sum over its completion tokens, averaged over the
rows (TRL 1.12 and later, and rarl-fast's default). "length_weighted_mean": every position of the [B, T] losses,
padding included, times its row's completion length, averaged over B * T (Liger 0.8.5, and TRL's luspo before it
masked the padding). The two agree when the per-token loss is one value per row (sequence-level ratio, no KL term,
rollout weights per row or none) and differ when a per-token term (the KL, token-level ratios or rollout weights)
meets padding."""
ROW_NORMALIZED = ("sequence_mean", "fixed_length", "sequence_sum")
"""Aggregations that divide by the rows of the call (a trainer splitting a step into micro-batches rescales them)."""


def check_loss_options(loss_type: str, importance_sampling_level: str = "token") -> None:
    """Raise ValueError, with Liger's wording, for an unknown loss type or level or a combination without a
    definition."""
    if loss_type not in SURROGATE:
        raise ValueError(f"Unknown loss type: {loss_type!r} (one of {LOSS_TYPES})")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"Unknown importance sampling level: {importance_sampling_level!r}. Possible values are 'token' and "
            "'sequence'."
        )
    if importance_sampling_level == "sequence" and loss_type in TOKEN_LEVEL_ONLY:
        raise ValueError(
            f"Sequence-level importance sampling is not supported for loss_type={loss_type!r}. "
            "Use importance_sampling_level='token' instead."
        )


def check_loss_params(*, delta: float | None = None, sapo_temperature_pos: float = 1.0,
                      sapo_temperature_neg: float = 1.05, luspo_reduction: str = "row_sum") -> None:  # fmt: skip
    """Raise ValueError for a non-positive SAPO temperature or delta (as Liger's constructor does) or an unknown
    luspo reduction."""
    if luspo_reduction not in LUSPO_REDUCTIONS:
        raise ValueError(f"Unknown luspo reduction: {luspo_reduction!r} (one of {LUSPO_REDUCTIONS})")
    if sapo_temperature_pos <= 0:
        raise ValueError(f"sapo_temperature_pos must be positive, got {sapo_temperature_pos}")
    if sapo_temperature_neg <= 0:
        raise ValueError(f"sapo_temperature_neg must be positive, got {sapo_temperature_neg}")
    if delta is not None and delta <= 0:
        raise ValueError(f"delta must be positive, got {delta}")


class LossOptions(NamedTuple):
    """The options of the GRPO-family loss, named as Liger's and TRL's (TRL's `epsilon` is `eps_low` here)."""

    loss_type: str = "dapo"
    """one of LOSS_TYPES: picks the surrogate and the aggregation"""
    importance_sampling_level: str = "token"
    """"token": one ratio per token; "sequence": one per sequence, exp(mean log-ratio over its tokens) (GSPO)"""
    eps_low: float = 0.2
    """clip: the ratio's lower clip bound is 1 - eps_low"""
    eps_high: float = 0.2
    """clip: the upper clip bound is 1 + eps_high; cispo: the cap of the ratio itself (e.g. 5.0)"""
    beta: float = 0.04
    """weight of the k3 KL term to the reference"""
    delta: float | None = None
    """clip: cap of the unclipped ratio (two-sided clipping, INTELLECT-2); None: no cap"""
    sapo_temperature_pos: float = 1.0
    """sapo: gate temperature for tokens with a positive advantage"""
    sapo_temperature_neg: float = 1.05
    """sapo: gate temperature for the other tokens"""
    vespo_k_pos: float = 2.0
    """vespo: shape k of the gamma weight for advantages >= 0"""
    vespo_lambda_pos: float = 3.0
    """vespo: rate lambda of the gamma weight for advantages >= 0"""
    vespo_k_neg: float = 3.0
    """vespo: shape k for negative advantages"""
    vespo_lambda_neg: float = 2.0
    """vespo: rate lambda for negative advantages"""
    bias_correction_kl: bool = False
    """the KL term times the importance ratio, with its gradient (DeepSeek-V3.2; Liger's use_bias_correction_kl)"""

    def checked(self) -> LossOptions:
        """These options, after `check_loss_options` and `check_loss_params`."""
        check_loss_options(self.loss_type, self.importance_sampling_level)
        check_loss_params(delta=self.delta, sapo_temperature_pos=self.sapo_temperature_pos,
                          sapo_temperature_neg=self.sapo_temperature_neg)  # fmt: skip
        return self

    @property
    def surrogate(self) -> str:
        return SURROGATE[self.loss_type]

    @property
    def needs_whole_sequences(self) -> bool:
        """True when a token's loss depends on the other tokens of its sequence (sequence-level ratio, VESPO)."""
        return self.importance_sampling_level == "sequence" or self.surrogate == "vespo"
