"""Next-token sampling with transformers' semantics (temperature -> top-k -> top-p), seeded, plus the
sampling log-prob of METHOD.md section 4 (from ``logits / T`` before any truncation)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["filter_logits", "sample_next"]


def filter_logits(scaled: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``scaled`` ([R, V] logits / T) with the tokens outside top-k / the top-p nucleus set to -inf.

    Same rules as transformers' ``TopKLogitsWarper`` and ``TopPLogitsWarper`` (at least one token kept; a token
    is cut from the nucleus when the ascending cumulative probability up to it is <= 1 - top_p).
    """
    out = scaled
    if top_k > 0 and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(out, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        out = out.masked_fill(remove, float("-inf"))
    return out


def sample_next(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One token per row and its log-prob.

    Args:
        logits: [R, V] raw next-token logits (any float dtype; computed in float32).
    Returns:
        tokens: [R] long; logp: [R] float32, ``log_softmax(logits / temperature)[token]``.
    """
    scaled = logits.float() / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    if greedy:
        tokens = scaled.argmax(dim=-1)
    else:
        probs = filter_logits(scaled, top_k, top_p).softmax(dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens, logp_all.gather(1, tokens.unsqueeze(1)).squeeze(1)
