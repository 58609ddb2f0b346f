"""RMO, the Response Mutation Operation (docs/method.md section 5, eq. 9).

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
from typing import Any, get_args

import torch
from torch import Tensor

from rarl_fast.config import RMOBaseline, RMOMode, RMOSource, ThinkStyle
from rarl_fast.rewards.score import score
from rarl_fast.rl.advantages import group_advantages, group_std

__all__ = [
    "RMO_BASELINES",
    "RMO_MODES",
    "RMO_SOURCES",
    "THINK_STYLES",
    "BestCache",
    "RMOBaseline",
    "RMOMode",
    "RMOResult",
    "RMOSettings",
    "RMOSource",
    "ThinkStyle",
    "group_draws",
    "gt_answer",
    "longest_gt_answer",
    "lowest_k",
    "mutate_responses",
    "mutated_advantages",
    "stagnant_groups",
]

RMO_MODES: tuple[str, ...] = get_args(RMOMode)
RMO_SOURCES: tuple[str, ...] = get_args(RMOSource)
RMO_BASELINES: tuple[str, ...] = get_args(RMOBaseline)
THINK_STYLES: tuple[str, ...] = get_args(ThinkStyle)
GT_THINK = "Reference answer."


def _json_number(v: float) -> int | float:
    """Integers print as integers, other floats by Python's shortest round-trip repr (via json.dumps)."""
    f = float(v)
    return int(f) if f.is_integer() else f


def gt_answer(truth: Sequence[float], think: str = "fixed") -> str:
    """The `gt` reference for a truth `y_1..y_N`, without EOS; it scores the maximum reward.

    `<think>Reference answer.</think> <answer>[{"image_id": i, "value": v}, ...]</answer>` with ids
    ascending by true value (ties by id). `think="readings"` (our extension; the method's text is `fixed`)
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

    Config validation rejects a `max_new_tokens` below this (docs/method.md section 5); 0 for no truths.
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
class RMOSettings:
    """Plain values of one stage's RMO (built once per stage by the trainer from ``cfg.rmo`` and the stage's
    reward weights; docs/method.md section 5).

    Attributes:
        mode, source, think, baseline: see :data:`RMOMode`, :data:`RMOSource`, :data:`ThinkStyle`,
            :data:`RMOBaseline`.
        p_mut: probability that an eligible group is mutated.
        k_mut: responses replaced per mutated group, in [1, G - 1].
        sigma_min: stagnation threshold on std(R), also the margin the reference must clear.
        alpha, beta, lam, weights: the reward arguments of ``score`` that references are scored with.
        scale_by_std, unbiased, eps: the advantage arguments (``group_advantages``); ``unbiased`` also sets the
            std used for stagnation.
        eos: EOS string appended to returned reference texts (references are scored without it).
    """

    mode: RMOMode
    source: RMOSource
    think: ThinkStyle
    baseline: RMOBaseline
    p_mut: float
    k_mut: int
    sigma_min: float
    alpha: float
    beta: float
    lam: float
    weights: tuple[float, float, float]
    scale_by_std: bool
    unbiased: bool
    eos: str = ""
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name, allowed in (("mode", RMO_MODES), ("source", RMO_SOURCES), ("think", THINK_STYLES),
                              ("baseline", RMO_BASELINES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.k_mut < 1:
            raise ValueError(f"k_mut must be >= 1, got {self.k_mut}")
        if not 0 <= self.p_mut <= 1:
            raise ValueError(f"p_mut must be in [0, 1], got {self.p_mut}")

    def score_kwargs(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "lam": self.lam, "weights": self.weights}


@dataclass(frozen=True)
class RMOResult:
    """Outcome of `mutate_responses` for B groups of G responses.

    Attributes:
        rewards: [B, G] float64, rewards after mutation (mutated rows carry their reference's reward).
        advantages: [B, G] float64, recomputed over the mutated groups.
        mutated: [B, G] bool, rows replaced by a reference (the `is_mutated` flag; they are off-policy).
        ref_texts: B entries, the reference text with EOS appended for mutated groups, else None.
        ref_rewards: [B] float64, the reference's reward for mutated groups, NaN elsewhere.
        metrics: 0-dim float64 counts and sums over the B groups, so callers can average over any set of groups
            (ranks, steps): `groups`, `stagnant_before` and `stagnant_after` (groups with std(R) < sigma_min
            before and after mutation), `mutated` (rows), `mutated_groups`, `ref_reward_sum` (over mutated groups).
    """

    rewards: Tensor
    advantages: Tensor
    mutated: Tensor
    ref_texts: list[str | None]
    ref_rewards: Tensor
    metrics: dict[str, Tensor]


def stagnant_groups(rewards: Tensor, sigma_min: float, *, unbiased: bool = False) -> Tensor:
    """[B] bool: groups of [B, G] rewards whose std is below ``sigma_min`` (no gradient signal left)."""
    return group_std(rewards, unbiased=unbiased) < sigma_min


def group_draws(seeds: Sequence[int], group_size: int) -> tuple[Tensor, Tensor]:
    """The randomness of RMO, one generator per group seeded by ``seeds[b]``: [B] uniforms that decide
    ``p_mut``, then [B, G] uniforms that break reward ties; a group's draws depend on its seed alone, so its
    outcome does not depend on its batch or rank."""
    draw, ties = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        draw.append(torch.rand(1, generator=gen, dtype=torch.float64))
        ties.append(torch.rand(1, group_size, generator=gen, dtype=torch.float64))
    empty = torch.zeros(0, dtype=torch.float64)
    return (torch.cat(draw) if draw else empty), (torch.cat(ties) if ties else empty.view(0, group_size))


def lowest_k(rewards: Tensor, k: int, tie_keys: Tensor) -> Tensor:
    """[B, k] column indices of the k lowest rewards of each group; equal rewards are ordered by ``tie_keys``
    [B, G] (random), so a stagnant group loses a random response, not always the first."""
    shuffle = tie_keys.argsort(dim=1)
    return shuffle.gather(1, rewards.gather(1, shuffle).argsort(dim=1, stable=True))[:, :k]


def mutated_advantages(
    rewards: Tensor, mutated: Tensor, chosen: Tensor, baseline: str, *, scale_by_std: bool, unbiased: bool, eps: float
) -> Tensor:
    """[B, G] advantages of the mutated rewards (eq. 9 over each whole group); with ``baseline="sampled"`` the
    sampled rows of each chosen (mutated) group are normalized among themselves instead, so their advantages
    sum to zero as without RMO, while the references keep their eq. 9 advantage."""
    advantages = group_advantages(rewards, scale_by_std=scale_by_std, unbiased=unbiased, eps=eps)
    if baseline == "sampled":
        sampled = ~mutated & chosen.unsqueeze(1)
        advantages[sampled] = group_advantages(
            rewards[sampled], sampled.nonzero()[:, 0], rewards.shape[0], scale_by_std=scale_by_std,
            unbiased=unbiased, eps=eps,
        )  # fmt: skip
    return advantages


def _references(
    candidates: list[int],
    cached: list[tuple[str, float] | None],
    group_best: list[float],
    truths: Sequence[Sequence[float]],
    tolerance: Tensor,
    settings: RMOSettings,
) -> tuple[list[str], list[float]]:
    """Reference text (no EOS) and reward per candidate group: its cached best if that beats the group, else gt.

    All references are scored in one `score` call; a cached entry's stored reward is not trusted.
    """
    gt = [gt_answer(truths[b], settings.think) for b in candidates]
    extra = [i for i, c in enumerate(cached) if c is not None]
    texts = gt + [cached[i][0] for i in extra]  # type: ignore[index]
    groups = candidates + [candidates[i] for i in extra]
    totals = score(
        texts, [truths[b] for b in groups], tolerance=tolerance[groups], **settings.score_kwargs()
    ).total.tolist()
    ref_texts, ref_rewards = gt, totals[: len(candidates)]
    for slot, i in enumerate(extra):
        value = totals[len(candidates) + slot]
        if value > group_best[candidates[i]]:
            ref_texts[i], ref_rewards[i] = texts[len(candidates) + slot], value
    return ref_texts, ref_rewards


def mutate_responses(
    rewards: Tensor,
    truths: Sequence[Sequence[float]],
    settings: RMOSettings,
    *,
    seeds: Sequence[int],
    tolerance: float | Sequence[float] | Tensor,
    texts: Sequence[str] | None = None,
    group_keys: Sequence[Sequence[Hashable]] | None = None,
    cache: BestCache | None = None,
) -> RMOResult:
    """Apply RMO (eq. 9) to B groups of G scored responses; pure apart from updating ``cache``.

    Args:
        rewards: [B, G] totals from ``score``, group b in row b.
        truths: B truth lists ``y_1..y_N``, one per group.
        settings: the stage's :class:`RMOSettings`.
        seeds: B seeds, one per group (:func:`group_draws`).
        tolerance: the regression tolerance of each group (float or [B]).
        texts: B*G responses, group-major; needed with ``cache`` (and for ``best``).
        group_keys: B group keys (tuples of sample ids); needed with ``cache`` (and for ``best``).
        cache: :class:`BestCache` consulted for ``best``, then updated with this step's best responses.
    """
    s = settings
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got {tuple(rewards.shape)}")
    n_groups, group_size = rewards.shape
    if len(truths) != n_groups or len(seeds) != n_groups:
        raise ValueError(f"got {n_groups} groups but {len(truths)} truths and {len(seeds)} seeds")
    if not s.k_mut < group_size:
        raise ValueError(f"k_mut must be in [1, G - 1] so a mutated group keeps a spread, got {s.k_mut}")
    if s.source == "best" and cache is None:
        raise ValueError("source='best' needs a BestCache")
    if cache is not None and (texts is None or group_keys is None):
        raise ValueError("a cache needs texts and group_keys")
    rewards = rewards.detach().to(device="cpu", dtype=torch.float64)
    tol = torch.as_tensor(tolerance, dtype=torch.float64).flatten().expand(n_groups).clone()
    draw, tie_keys = group_draws(seeds, group_size)

    stagnant = stagnant_groups(rewards, s.sigma_min, unbiased=s.unbiased)
    candidate = stagnant if s.mode == "stagnant" else torch.ones_like(stagnant)
    cand_idx = candidate.nonzero().flatten().tolist()
    group_best = rewards.max(dim=1).values.tolist()
    cached = [cache.get(group_keys[b]) if s.source == "best" else None for b in cand_idx]  # type: ignore[union-attr,index]
    ref_texts, ref_values = _references(cand_idx, cached, group_best, truths, tol, s)
    ref_reward = torch.full((n_groups,), math.nan, dtype=torch.float64)
    ref_reward[cand_idx] = torch.tensor(ref_values, dtype=torch.float64)
    eligible = candidate & (rewards.mean(dim=1) < ref_reward - s.sigma_min)
    chosen = eligible & (draw < s.p_mut)

    lowest = lowest_k(rewards, s.k_mut, tie_keys)
    mutated = torch.zeros_like(rewards, dtype=torch.bool).scatter_(1, lowest, chosen.unsqueeze(1).expand(-1, s.k_mut))
    new_rewards = torch.where(mutated, ref_reward.unsqueeze(1), rewards)
    advantages = mutated_advantages(
        new_rewards, mutated, chosen, s.baseline, scale_by_std=s.scale_by_std, unbiased=s.unbiased, eps=s.eps
    )

    if cache is not None:
        cache.update(group_keys, texts, rewards)  # type: ignore[arg-type]
    text_of = dict(zip(cand_idx, ref_texts))
    out_texts = [text_of[b] + s.eos if ok else None for b, ok in enumerate(chosen.tolist())]
    out_ref = torch.where(chosen, ref_reward, math.nan)
    metrics = {
        "groups": torch.tensor(float(n_groups), dtype=torch.float64),
        "stagnant_before": stagnant.double().sum(),
        "stagnant_after": stagnant_groups(new_rewards, s.sigma_min, unbiased=s.unbiased).double().sum(),
        "mutated": mutated.double().sum(),
        "mutated_groups": chosen.double().sum(),
        "ref_reward_sum": torch.where(chosen, ref_reward, 0.0).sum(),
    }
    return RMOResult(new_rewards, advantages, mutated, out_texts, out_ref, metrics)
