"""RMO, the Response Mutation Operation (METHOD.md section 5, eq. 9).

After rewards and before advantages: in an eligible group (stagnant, or any group in mode `always`,
whose mean reward is below the reference's reward minus `sigma_min`), with probability `p_mut` the
`k_mut` lowest-reward responses are replaced by a reference answer, which is scored by the same
reward, and the group's advantages are recomputed over the mutated group (with `baseline="sampled"`, our
extension, the sampled responses are normalized among themselves and only the references take eq. 9's).

References: `gt` renders the truth (`gt_answer`); `best` takes the highest-reward response seen so far
for the same group key (`BestCache`) when it beats the group's best, else falls back to `gt`.
Where the paper leaves a choice open we fix it: the cache is consulted before this step's responses
are added to it (a group's own best can never beat itself), references are scored without the EOS
string and returned with it appended, and a cached response is re-scored with the current reward
arguments rather than trusting its stored reward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rarl_fast.rewards.score import score
from rarl_fast.rl.advantages import group_advantages, group_std

__all__ = [
    "RMO_BASELINES",
    "RMO_MODES",
    "RMO_SOURCES",
    "THINK_STYLES",
    "BestCache",
    "RMOResult",
    "gt_answer",
    "longest_gt_answer",
    "mutate_responses",
]

RMO_MODES = ("stagnant", "always")
RMO_SOURCES = ("gt", "best")
RMO_BASELINES = ("group", "sampled")
GT_THINK = "Reference answer."
THINK_STYLES = ("fixed", "readings")


def _json_number(v: float) -> int | float:
    """Integers print as integers, other floats by Python's shortest round-trip repr (via json.dumps)."""
    f = float(v)
    return int(f) if f.is_integer() else f


def gt_answer(truth: Sequence[float], think: str = "fixed") -> str:
    """The `gt` reference for a truth `y_1..y_N`, without EOS; it scores the maximum reward.

    `<think>Reference answer.</think> <answer>[{"image_id": i, "value": v}, ...]</answer>` with ids
    ascending by true value (ties by id). `think="readings"` (our extension; METHOD.md's text is `fixed`)
    writes each image's value in prompt order as the reasoning instead, `<think>Image 1: 7. Image 2: 3.</think>`,
    so a model trained on it reads every image before it sorts; the answer part and its reward are the same.
    """
    if think not in THINK_STYLES:
        raise ValueError(f"think must be one of {THINK_STYLES}, got {think!r}")
    order = sorted(range(len(truth)), key=lambda i: (float(truth[i]), i))
    items = [{"image_id": i + 1, "value": _json_number(truth[i])} for i in order]
    if think == "fixed":
        reasoning = GT_THINK
    else:
        reasoning = " ".join(f"Image {i + 1}: {json.dumps(_json_number(v))}." for i, v in enumerate(truth))
    return f"<think>{reasoning}</think> <answer>{json.dumps(items)}</answer>"


def longest_gt_answer(
    truths: Iterable[Sequence[float]], *, eos: str = "", length: Callable[[str], int] = len, think: str = "fixed"
) -> int:
    """Longest `gt_answer(truth, think) + eos` over the data, measured by `length` (e.g. a token counter).

    Config validation rejects a `max_new_tokens` below this (METHOD.md section 5); 0 for no truths.
    """
    return max((length(gt_answer(t, think) + eos) for t in truths), default=0)


class BestCache:
    """Highest-reward response seen so far per group key (the group's tuple of sample ids).

    A plain dict the caller keeps across steps; `state_dict`/`load_state_dict` give a JSON- and
    `torch.save`-friendly form for checkpoints (keys become lists, so their items must be JSON values).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[Hashable, ...], tuple[str, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Sequence[Hashable]) -> tuple[str, float] | None:
        """(text, reward) cached for `key`, or None."""
        return self._entries.get(tuple(key))

    def update(self, keys: Sequence[Sequence[Hashable]], texts: Sequence[str], rewards: Tensor) -> None:
        """Keep, per group, its best response if it beats the cached one.

        Args:
            keys: B group keys.
            texts: B*G responses, group-major (response j of group b at b*G + j).
            rewards: [B, G] their rewards.
        """
        groups = rewards.shape[1]
        best = rewards.max(dim=1)
        self.merge([(keys[b], texts[b * groups + j], value) for b, (value, j) in
                    enumerate(zip(best.values.tolist(), best.indices.tolist()))])  # fmt: skip

    def entries(self, keys: Sequence[Sequence[Hashable]]) -> list[tuple[list[Any], str, float]]:
        """(key, text, reward) for those of `keys` that hold an entry: what one rank sends the others."""
        return [(list(k), *e) for k in keys if (e := self._entries.get(tuple(k))) is not None]

    def merge(self, entries: Sequence[tuple[Sequence[Hashable], str, float]]) -> None:
        """Take (key, text, reward) entries (this step's, or another rank's), keeping the higher reward per key."""
        for key, text, reward in entries:
            old = self._entries.get(tuple(key))
            if old is None or float(reward) > old[1]:
                self._entries[tuple(key)] = (str(text), float(reward))

    def state_dict(self) -> dict[str, list[Any]]:
        return {
            "keys": [list(k) for k in self._entries],
            "texts": [t for t, _ in self._entries.values()],
            "rewards": [r for _, r in self._entries.values()],
        }

    def load_state_dict(self, state: dict[str, list[Any]]) -> None:
        self._entries = {
            tuple(k): (str(t), float(r))
            for k, t, r in zip(state["keys"], state["texts"], state["rewards"], strict=True)
        }


@dataclass(frozen=True)
class RMOResult:
    """Outcome of `mutate_responses` for B groups of G responses.

    Attributes:
        rewards: [B, G] float64, rewards after mutation (mutated rows carry their reference's reward).
        advantages: [B, G] float64, recomputed over the mutated groups.
        mutated: [B, G] bool, rows replaced by a reference (the `is_mutated` flag; they are off-policy).
        ref_texts: B entries, the reference text with EOS appended for mutated groups, else None.
        ref_rewards: [B] float64, the reference's reward for mutated groups, NaN elsewhere.
        metrics: 0-dim tensors `stagnant_frac_before`, `stagnant_frac_after`, `mutated` (rows),
            `mutated_groups`, `ref_reward_mean` (NaN when no group was mutated).
    """

    rewards: Tensor
    advantages: Tensor
    mutated: Tensor
    ref_texts: list[str | None]
    ref_rewards: Tensor
    metrics: dict[str, Tensor]


def _check(
    rewards: Tensor, truths: Sequence[Sequence[float]], k_mut: int, mode: str, source: str, think: str, baseline: str
) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got {tuple(rewards.shape)}")
    if len(truths) != rewards.shape[0]:
        raise ValueError(f"got {rewards.shape[0]} groups but {len(truths)} truths")
    if not 1 <= k_mut < rewards.shape[1]:
        raise ValueError(f"k_mut must be in [1, G - 1] so a mutated group keeps a spread, got {k_mut}")
    if mode not in RMO_MODES:
        raise ValueError(f"mode must be one of {RMO_MODES}, got {mode!r}")
    if source not in RMO_SOURCES:
        raise ValueError(f"source must be one of {RMO_SOURCES}, got {source!r}")
    if think not in THINK_STYLES:
        raise ValueError(f"think must be one of {THINK_STYLES}, got {think!r}")
    if baseline not in RMO_BASELINES:
        raise ValueError(f"baseline must be one of {RMO_BASELINES}, got {baseline!r}")


def _references(
    candidates: list[int],
    cached: list[tuple[str, float] | None],
    group_best: list[float],
    truths: Sequence[Sequence[float]],
    tolerance: Tensor,
    score_kwargs: dict[str, Any],
    think: str,
) -> tuple[list[str], list[float]]:
    """Reference text (no EOS) and reward per candidate group: its cached best if that beats the group, else gt.

    All references are scored in one `score` call; a cached entry's stored reward is not trusted.
    """
    gt = [gt_answer(truths[b], think) for b in candidates]
    extra = [i for i, c in enumerate(cached) if c is not None]
    texts = gt + [cached[i][0] for i in extra]  # type: ignore[index]
    groups = candidates + [candidates[i] for i in extra]
    totals = score(texts, [truths[b] for b in groups], tolerance=tolerance[groups], **score_kwargs).total.tolist()
    ref_texts, ref_rewards = gt, totals[: len(candidates)]
    for slot, i in enumerate(extra):
        value = totals[len(candidates) + slot]
        if value > group_best[candidates[i]]:
            ref_texts[i], ref_rewards[i] = texts[len(candidates) + slot], value
    return ref_texts, ref_rewards


def mutate_responses(
    rewards: Tensor,
    truths: Sequence[Sequence[float]],
    *,
    generator: torch.Generator,
    tolerance: float | Sequence[float] | Tensor,
    alpha: float,
    beta: float,
    lam: float,
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    p_mut: float = 0.5,
    k_mut: int = 1,
    sigma_min: float = 1e-3,
    mode: str = "stagnant",
    source: str = "gt",
    think: str = "fixed",
    baseline: str = "group",
    eos: str = "",
    texts: Sequence[str] | None = None,
    group_keys: Sequence[Sequence[Hashable]] | None = None,
    cache: BestCache | None = None,
    scale_by_std: bool = True,
    unbiased: bool = False,
    eps: float = 1e-6,
) -> RMOResult:
    """Apply RMO (eq. 9) to B groups of G scored responses; pure apart from updating `cache`.

    Randomness comes only from `generator` (CPU): B uniforms decide `p_mut`, then B*G uniforms break
    reward ties when picking the `k_mut` lowest responses; both are drawn on every call.

    Args:
        rewards: [B, G] totals from `score`, group b in row b.
        truths: B truth lists `y_1..y_N`, one per group.
        generator: seeded torch.Generator on the CPU.
        tolerance, alpha, beta, lam, weights: reward arguments of `score` (tolerance: float or [B]).
        p_mut: probability that an eligible group is mutated.
        k_mut: responses replaced per mutated group, in [1, G - 1].
        sigma_min: stagnation threshold on std(R), also the margin the reference must clear.
        mode: `stagnant` (only stagnant groups are eligible) or `always`.
        source: `gt` or `best`.
        think: how the `gt` reference reasons (`gt_answer`): `fixed` (METHOD.md) or `readings`.
        baseline: what the sampled (unmutated) responses of a mutated group are normalized against: `group`,
            the whole mutated group (eq. 9), or `sampled`, the group's sampled responses alone (their
            advantages then sum to zero as without RMO; the references keep their eq. 9 advantages).
        eos: EOS string appended to returned reference texts (references are scored without it).
        texts: B*G responses, group-major; needed with `cache` (and for `best`).
        group_keys: B group keys (tuples of sample ids); needed with `cache` (and for `best`).
        cache: `BestCache` consulted for `best`, then updated with this step's best responses.
        scale_by_std, unbiased, eps: advantage arguments (`group_advantages`); `unbiased` also sets
            the std used for stagnation.
    """
    _check(rewards, truths, k_mut, mode, source, think, baseline)
    if source == "best" and cache is None:
        raise ValueError("source='best' needs a BestCache")
    if cache is not None and (texts is None or group_keys is None):
        raise ValueError("a cache needs texts and group_keys")
    rewards = rewards.detach().to(device="cpu", dtype=torch.float64)
    n_groups, group_size = rewards.shape
    tol = torch.as_tensor(tolerance, dtype=torch.float64).flatten().expand(n_groups).clone()
    score_kwargs = {"alpha": alpha, "beta": beta, "lam": lam, "weights": weights}
    draw = torch.rand(n_groups, generator=generator, dtype=torch.float64)
    tie_keys = torch.rand(n_groups, group_size, generator=generator, dtype=torch.float64)

    stagnant = group_std(rewards, unbiased=unbiased) < sigma_min
    candidate = stagnant if mode == "stagnant" else torch.ones_like(stagnant)
    cand_idx = candidate.nonzero().flatten().tolist()
    group_best = rewards.max(dim=1).values.tolist()

    cached = [cache.get(group_keys[b]) if source == "best" else None for b in cand_idx]  # type: ignore[union-attr,index]
    ref_texts, ref_values = _references(cand_idx, cached, group_best, truths, tol, score_kwargs, think)
    ref_reward = torch.full((n_groups,), math.nan, dtype=torch.float64)
    ref_reward[cand_idx] = torch.tensor(ref_values, dtype=torch.float64)
    eligible = candidate & (rewards.mean(dim=1) < ref_reward - sigma_min)
    chosen = eligible & (draw < p_mut)

    shuffle = tie_keys.argsort(dim=1)
    lowest = shuffle.gather(1, rewards.gather(1, shuffle).argsort(dim=1, stable=True))[:, :k_mut]
    mutated = torch.zeros_like(rewards, dtype=torch.bool).scatter_(1, lowest, chosen.unsqueeze(1).expand(-1, k_mut))
    new_rewards = torch.where(mutated, ref_reward.unsqueeze(1), rewards)
    advantages = group_advantages(new_rewards, scale_by_std=scale_by_std, unbiased=unbiased, eps=eps)
    if baseline == "sampled":  # the sampled rows of each mutated group, normalized among themselves
        sampled = ~mutated & chosen.unsqueeze(1)
        advantages[sampled] = group_advantages(
            rewards[sampled], sampled.nonzero()[:, 0], n_groups, scale_by_std=scale_by_std, unbiased=unbiased, eps=eps
        )

    if cache is not None:
        cache.update(group_keys, texts, rewards)  # type: ignore[arg-type]
    text_of = dict(zip(cand_idx, ref_texts))
    out_texts = [text_of[b] + eos if ok else None for b, ok in enumerate(chosen.tolist())]
    out_ref = torch.where(chosen, ref_reward, math.nan)
    n_chosen = chosen.sum()
    metrics = {
        "stagnant_frac_before": stagnant.double().mean(),
        "stagnant_frac_after": (group_std(new_rewards, unbiased=unbiased) < sigma_min).double().mean(),
        "mutated": mutated.sum(),
        "mutated_groups": n_chosen,
        "ref_reward_mean": torch.where(chosen, ref_reward, 0.0).sum() / n_chosen,
    }
    return RMOResult(new_rewards, advantages, mutated, out_texts, out_ref, metrics)
