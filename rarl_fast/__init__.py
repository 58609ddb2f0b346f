"""rarl-fast: ranking-aware RL (GRPO + RMO) for ordinal regression and ranking with vision-language models."""

__version__ = "0.1.0"
