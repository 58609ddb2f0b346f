"""Splice RMO's reference answers into :class:`Rollouts` (docs/method.md section 5).

The replaced rows get the tokenized reference (EOS included), the completion tensors are re-padded to the
longest row, ``is_mutated`` is set and their sampling log-probs are zeroed: mutated responses are off-policy
and their ``logp_old`` must come from the policy's own forward pass, never from the rollout engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from rarl_fast.rollout.base import Rollouts

__all__ = ["completion_texts", "splice_references"]


def completion_texts(rollouts: Rollouts, tokenizer: Any) -> list[str]:
    """[R] decoded completions (real tokens only, special tokens dropped) for the reward."""
    ids = [row[mask].tolist() for row, mask in zip(rollouts.completion_ids.cpu(), rollouts.completion_mask.cpu())]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def splice_references(rollouts: Rollouts, mutated: Tensor, ref_texts: Sequence[str | None], tokenizer: Any) -> Rollouts:
    """Replace the rows flagged in ``mutated`` with their group's reference.

    Args:
        mutated: [B, G] bool (prompt-major like the rows).
        ref_texts: [B] the reference of each group (EOS text included), None where the group was not mutated.
    """
    flat = mutated.reshape(-1).to(rollouts.completion_ids.device)
    if flat.numel() != rollouts.num_rows:
        raise ValueError(f"mutated has {flat.numel()} entries for {rollouts.num_rows} rows")
    rows = torch.nonzero(flat).flatten().tolist()  # host sync: which rows to rewrite (a few per step)
    if not rows:
        return rollouts
    G = rollouts.num_generations
    tokens: dict[int, list[int]] = {}
    for r in rows:
        text = ref_texts[r // G]
        if text is None:
            raise ValueError(f"row {r} is mutated but group {r // G} has no reference text")
        tokens[r] = tokenizer(text, add_special_tokens=False)["input_ids"]
    R, T = rollouts.completion_ids.shape
    width = max(T, *(len(t) for t in tokens.values()))
    pad_id = tokenizer.pad_token_id
    device = rollouts.completion_ids.device

    def widen(t: Tensor, fill: float | int | bool) -> Tensor:
        if width == T:
            return t.clone()
        extra = torch.full((R, width - T), fill, dtype=t.dtype, device=device)
        return torch.cat([t, extra], dim=1)

    ids = widen(rollouts.completion_ids, pad_id)
    mask = widen(rollouts.completion_mask, False)
    logp = widen(rollouts.sampling_logp, 0.0) if rollouts.sampling_logp is not None else None
    for r, toks in tokens.items():
        ids[r] = pad_id
        ids[r, : len(toks)] = torch.tensor(toks, dtype=ids.dtype, device=device)
        mask[r] = False
        mask[r, : len(toks)] = True
        if logp is not None:
            logp[r] = 0.0
    return replace(
        rollouts,
        completion_ids=ids,
        completion_mask=mask,
        sampling_logp=logp,
        is_mutated=rollouts.is_mutated | flat,
        truncated=rollouts.truncated & ~flat,
        vision_cut=rollouts.vision_cut & ~flat,
    )
