"""The learning-rate schedule of every training stage (SFT and both RL stages): linear warmup, cosine decay."""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(step: int, *, peak: float, total: int, warmup_ratio: float) -> float:
    """Linear warmup over ``warmup_ratio * total`` steps, then cosine decay to 0 at ``total``."""
    warmup = max(1, round(warmup_ratio * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
