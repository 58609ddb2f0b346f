"""Next-token sampling with transformers' semantics (temperature -> top-k -> top-p), seeded, plus the
sampling log-prob of docs/method.md section 4 (from ``logits / T`` before any truncation).

Seeded sampling is counter-based: the uniform number that picks row r's token at step t is a hash of
(row seed, t), and a row's seed is a hash of (seed, its group's key, its sample index). A row's completion
therefore does not depend on which other prompts share its batch or on which rank generates it, so a
1-process and an N-process run sample the same completions.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["filter_logits", "hashed_uniforms", "row_seeds", "sample_next", "stable_seed"]

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64 constants as signed int64
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, identical across processes and Python runs (no ``hash()``)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_seeds(seed: int, group_keys: list[tuple[str, ...]], n: int) -> Tensor:
    """[len(group_keys) * n] int64 seeds, prompt-major: row ``b * n + j`` gets ``stable_seed(seed, key_b, j)``."""
    return torch.tensor([stable_seed(seed, tuple(key), j) for key in group_keys for j in range(n)], dtype=torch.long)


def _lsr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: Tensor) -> Tensor:
    """splitmix64 on int64 tensors (two's-complement wrap-around)."""
    x = x + _GOLDEN
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def hashed_uniforms(seeds: Tensor, step: int | Tensor) -> Tensor:
    """[R] float64 uniforms in (0, 1), a pure function of (seeds[r], step); ``step`` an int or a one-element
    long tensor (inside a compiled decode step)."""
    h = _mix64(seeds ^ _mix64(torch.zeros_like(seeds) + step))
    return (_lsr(h, 11).double() + 0.5) / float(1 << 53)


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
    greedy: bool | Tensor = False,
    uniforms: Tensor,
) -> tuple[Tensor, Tensor]:
    """One token per row and its log-prob. No host sync and no generator state: the same code runs eagerly
    and inside a compiled (CUDA-graphed) decode step.

    Args:
        logits: [R, V] raw next-token logits (any float dtype; computed in float32).
        greedy: True for argmax everywhere, or [R] bool per row (a tensor, so that greedy and sampled calls
            share one compiled step; both tokens are then computed).
        uniforms: [R] float64 in (0, 1) from :func:`hashed_uniforms`: the token is drawn by inverse CDF with
            them.
    Returns:
        tokens: [R] long; logp: [R] float32, ``log_softmax(logits / temperature)[token]``.
    """
    scaled = logits.float() / temperature
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
    if greedy is True:
        tokens = scaled.argmax(dim=-1)
    else:
        if top_k > 0 or top_p < 1.0:
            probs = filter_logits(scaled, top_k, top_p).softmax(dim=-1)
        else:
            probs = (scaled - lse).exp_()
        cdf = probs.cumsum_(dim=-1)  # float32: its rounding (~1e-7) is far below any sampling resolution we need
        target = (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(1)
        tokens = torch.searchsorted(cdf, target).squeeze(1).clamp_max(probs.shape[-1] - 1)
        if isinstance(greedy, Tensor):
            tokens = torch.where(greedy, scaled.argmax(dim=-1), tokens)
    return tokens, (scaled.gather(1, tokens.unsqueeze(1)) - lse).squeeze(1)
