"""Ranking-aware verifiable reward: parsing, batched Kendall tau-b and the eq. 3-8 reward (docs/method.md 2-3)."""

from rarl_fast.rewards.kendall import kendall_tau_b
from rarl_fast.rewards.parse import MAX_ELEMENTS, MAX_RESPONSE_CHARS, Parsed, parse_responses
from rarl_fast.rewards.score import RANKING_FIELDS, RewardBreakdown, reward_means, score, score_parsed

__all__ = [
    "MAX_ELEMENTS",
    "MAX_RESPONSE_CHARS",
    "RANKING_FIELDS",
    "Parsed",
    "RewardBreakdown",
    "kendall_tau_b",
    "parse_responses",
    "reward_means",
    "score",
    "score_parsed",
]
