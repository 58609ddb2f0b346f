"""Groups of N images with pairwise distinct true values, built once per dataset and seed, and their sampler.

A group is one prompt: N samples in image-id order. Building draws each group as if by drawing samples
uniformly at random and skipping any whose value is already in the group: a category is drawn with
probability proportional to its samples (among categories with at least N distinct values), then N distinct
values by successive draws weighted by their sample counts, then one sample uniformly for each value, then
the images are shuffled into prompt order. Training groups are built once for a dataset and seed, so a group
recurs across epochs under the same key (its tuple of sample ids, docs/method.md section 5); test groups are
built the same way from the test split with their own seed stream, the same for every model.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rarl_fast.data.samples import Sample, TaskData

__all__ = [
    "Group",
    "GroupSampler",
    "build_groups",
    "build_test_groups",
    "build_train_groups",
    "eligible_category_counts",
    "truth_json",
]

_STREAMS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Group:
    """One prompt's images and truth.

    Attributes:
        key: the sample ids in image-id order (stable across epochs; RMO's best-answer store keys on it).
        samples: the N samples, image id i = position i - 1.
        rule: the quantity named in the prompt (category filled in for counting).
        value_range: the prompt's value-range phrase.
        tolerance: regression tolerance delta of the reward (eq. 3).
        category: the category all samples share (counting), else None.
    """

    key: tuple[str, ...]
    samples: tuple[Sample, ...]
    rule: str
    value_range: str
    tolerance: float
    category: str | None = None

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a group needs at least one sample")
        if self.key != tuple(s.sample_id for s in self.samples):
            raise ValueError(f"key {self.key} does not match the samples' ids")
        if len(set(self.key)) != len(self.key):
            raise ValueError(f"a sample appears twice in group {self.key}")
        if len({s.value for s in self.samples}) != len(self.samples):
            raise ValueError(f"values must be pairwise distinct, got {self.values} for {self.key}")

    @property
    def n(self) -> int:
        """Images in the prompt (N)."""
        return len(self.samples)

    @property
    def values(self) -> list[float]:
        """True values by image id 1..N."""
        return [float(s.value) for s in self.samples]

    @classmethod
    def of(cls, samples: tuple[Sample, ...] | list[Sample], rule: str, value_range: str, tolerance: float) -> Group:
        """A group of ``samples`` in the given order; ``rule`` may hold ``{category}``, filled from the samples."""
        samples = tuple(samples)
        category = samples[0].category
        if category is not None and "{category}" in rule:
            rule = rule.replace("{category}", category)
        key = tuple(s.sample_id for s in samples)
        return cls(key=key, samples=samples, rule=rule, value_range=value_range, tolerance=tolerance, category=category)


def truth_json(values: list[float]) -> str:
    """The true answer as docs/method.md section 5 renders it: ids ascending by value, integers printed as integers.

    ``json.dumps([{"image_id": i, "value": v}, ...])``; floats use Python's shortest round-trip repr.
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    items = []
    for i in order:
        v = values[i]
        items.append({"image_id": i + 1, "value": int(v) if float(v).is_integer() else float(v)})
    return json.dumps(items)


@dataclass
class _Pool:
    """Samples of one category bucketed by value: ``members[j]`` are the indices of value ``values[j]``."""

    values: np.ndarray  # [V] float64, sorted
    members: list[np.ndarray]  # V arrays of sample indices
    weights: np.ndarray  # [V] float64, bucket sizes
    flat: np.ndarray  # [S] int64, every sample index of the pool
    flat_value: np.ndarray  # [S] int64, the value bucket j of each entry of ``flat``

    @property
    def size(self) -> int:
        return len(self.flat)

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        """N sample indices with distinct values, by successive uniform draws that skip values already taken.

        Fast path: a few uniform draws over the pool's samples. If they do not yield N distinct values (a
        skewed pool), the remaining values are drawn by ``Generator.choice`` weighted by bucket size without
        replacement, which continues the same successive-sampling distribution.
        """
        taken: dict[int, int] = {}
        for k in rng.integers(self.size, size=4 * n).tolist():
            j = int(self.flat_value[k])
            if j not in taken:
                taken[j] = int(self.flat[k])
                if len(taken) == n:
                    return list(taken.values())
        weights = self.weights.copy()
        weights[list(taken)] = 0.0
        for j in rng.choice(len(weights), size=n - len(taken), replace=False, p=weights / weights.sum()).tolist():
            taken[j] = int(self.members[j][rng.integers(len(self.members[j]))])
        return list(taken.values())


def _pools(samples: list[Sample]) -> dict[str | None, _Pool]:
    by_cat: dict[str | None, dict[float, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, s in enumerate(samples):
        by_cat[s.category][float(s.value)].append(i)
    pools = {}
    for cat in sorted(by_cat, key=lambda c: (c is not None, c or "")):
        buckets = by_cat[cat]
        values = np.array(sorted(buckets), dtype=np.float64)
        members = [np.array(buckets[v], dtype=np.int64) for v in values.tolist()]
        weights = np.array([len(m) for m in members], dtype=np.float64)
        flat_value = np.repeat(np.arange(len(members)), [len(m) for m in members])
        pools[cat] = _Pool(values, members, weights, np.concatenate(members), flat_value)
    return pools


def eligible_category_counts(samples: list[Sample], sizes: list[int] | tuple[int, ...]) -> dict[int, int]:
    """N -> number of categories (None counts as one) with at least N distinct values: those groups of N can use."""
    pools = _pools(samples)
    return {n: sum(1 for p in pools.values() if len(p.values) >= n) for n in sizes}


def build_groups(
    samples: list[Sample],
    n: int,
    *,
    num_groups: int | None,
    seed: int,
    rule: str,
    value_range: str,
    tolerance: float,
    stream: str = "train",
) -> list[Group]:
    """Deterministic groups of ``n`` samples with pairwise distinct values, no sample twice, one category each.

    Args:
        samples: the split's samples.
        n: images per group (N).
        num_groups: groups to build; None builds ``ceil(len(samples) / n)``. For N = 1 the groups are distinct
            samples: all of them (shuffled) when None or at least ``len(samples)``, else a random subset.
            For N >= 2 a key is never repeated; if the data cannot supply that many distinct groups, fewer
            (drawing stops after 1000 draws in a row that find no new group).
        seed: with ``stream`` and ``n``, fixes the result.
        rule, value_range, tolerance: copied into every group (``{category}`` in the rule is filled in).
        stream: ``train`` or ``test``: separate random streams, so test groups do not mirror training groups.
    Returns:
        The groups, in build order.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed % 2**64, _STREAMS[stream], n])
    if num_groups is None:
        num_groups = math.ceil(len(samples) / n)

    def make(picked: list[int]) -> Group:
        return Group.of([samples[i] for i in picked], rule, value_range, tolerance)

    if n == 1:
        order = rng.permutation(len(samples))[: min(num_groups, len(samples))]
        return [make([int(i)]) for i in order]
    pools = [p for p in _pools(samples).values() if len(p.values) >= n]
    if not pools or num_groups == 0:
        return []
    pool_cdf = np.cumsum([p.size for p in pools], dtype=np.float64)
    pool_cdf /= pool_cdf[-1]
    groups: list[Group] = []
    seen: set[tuple[int, ...]] = set()
    attempts = misses = 0
    while len(groups) < num_groups and attempts < 10 * num_groups + 100 and misses < 1000:
        attempts += 1
        pool = pools[int(np.searchsorted(pool_cdf, rng.random(), side="right"))] if len(pools) > 1 else pools[0]
        picked = pool.draw(rng, n)
        picked = [picked[k] for k in rng.permutation(n)]
        if tuple(picked) in seen:
            misses += 1
            continue
        misses = 0
        seen.add(tuple(picked))
        groups.append(make(picked))
    return groups


def _task_groups(
    task: TaskData, sizes: list[int] | tuple[int, ...], split: str, seed: int, num: dict[int, int | None]
) -> dict[int, list[Group]]:
    samples = task.split(split)  # type: ignore[arg-type]
    rule, value_range, tolerance = task.rule, task.value_range, task.tolerance
    return {
        n: build_groups(
            samples,
            n,
            num_groups=num[n],
            seed=seed,
            rule=rule,
            value_range=value_range,
            tolerance=tolerance,
            stream=split,
        )
        for n in sizes
    }


def build_train_groups(
    task: TaskData, sizes: list[int] | tuple[int, ...], *, seed: int, groups_per_n: int | None = None
) -> dict[int, list[Group]]:
    """N -> the training groups of ``task`` (build once per run: keys then recur across epochs).

    N = 1: every training sample once. N >= 2: ``groups_per_n`` groups, or ``ceil(samples / N)`` when None
    (``data.train_groups_per_n``).
    """
    return _task_groups(task, sizes, "train", seed, {n: None if n == 1 else groups_per_n for n in sizes})


def build_test_groups(
    task: TaskData, sizes: list[int] | tuple[int, ...], *, seed: int, num_groups: int
) -> dict[int, list[Group]]:
    """N -> the fixed test groups of ``task`` (``data.num_test_groups`` each; at N = 1 distinct samples, at most
    all of them). The same seed gives the same groups for every model evaluated."""
    return _task_groups(task, sizes, "test", seed, dict.fromkeys(sizes, num_groups))


class GroupSampler:
    """Batches of training groups with a configurable mix of N, reproducible and resumable.

    Each batch of ``batch_size`` groups takes ``floor(batch_size * w_N)`` groups of each N (weights ``mix``
    normalized) and fills the remaining slots by drawing N without replacement with probability proportional
    to the remainders, then shuffles the batch. Within each N the groups are visited in a fresh random order
    every pass (epoch), so every group of that N is used once before any is used again. All randomness of
    step ``t`` derives from ``(seed, t)`` and of pass ``e`` of N from ``(seed, N, e)``, so the state is just
    the step and the per-N cursors, and a resumed sampler yields exactly the batches of an uninterrupted one.
    """

    def __init__(self, groups: Mapping[int, list[Group]], mix: Mapping[int, float], *, batch_size: int, seed: int):
        weights = {int(n): float(w) for n, w in mix.items() if w > 0}
        if not weights or batch_size < 1:
            raise ValueError(f"need a positive mix weight and batch_size >= 1, got {dict(mix)}, {batch_size}")
        for n in weights:
            if not groups.get(n):
                raise ValueError(f"the mix asks for N={n} but there are no training groups of {n} images")
        self.groups = {n: groups[n] for n in sorted(weights)}
        total = sum(weights.values())
        self.mix = {n: weights[n] / total for n in self.groups}
        self.batch_size, self.seed = batch_size, seed
        self.step = 0
        self._cursor = {n: (0, 0) for n in self.groups}  # N -> (pass, position in that pass's order)
        self._order: dict[int, tuple[int, np.ndarray]] = {}

    def _counts(self, rng: np.random.Generator) -> dict[int, int]:
        ns = list(self.mix)
        exact = np.array([self.mix[n] * self.batch_size for n in ns])
        counts = np.floor(exact).astype(np.int64)
        left = self.batch_size - int(counts.sum())
        if left:
            rest = exact - counts
            extra = rng.choice(len(ns), size=left, replace=False, p=rest / rest.sum())
            counts[extra] += 1
        return {n: int(c) for n, c in zip(ns, counts)}

    def _take(self, n: int) -> Group:
        epoch, pos = self._cursor[n]
        pool = self.groups[n]
        if pos == len(pool):
            epoch, pos = epoch + 1, 0
        cached = self._order.get(n)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed % 2**64, 2, n, epoch]).permutation(len(pool)))
            self._order[n] = cached
        self._cursor[n] = (epoch, pos + 1)
        return pool[int(cached[1][pos])]

    def next_batch(self) -> list[Group]:
        """The next ``batch_size`` groups."""
        rng = np.random.default_rng([self.seed % 2**64, 3, self.step])
        batch = [self._take(n) for n, c in self._counts(rng).items() for _ in range(c)]
        self.step += 1
        return [batch[i] for i in rng.permutation(len(batch))]

    def __iter__(self) -> Iterator[list[Group]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (JSON-safe): the step and each N's (pass, position)."""
        return {"step": self.step, "cursor": {str(n): list(c) for n, c in self._cursor.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the mix's N must be the same."""
        cursor = {int(n): (int(c[0]), int(c[1])) for n, c in state["cursor"].items()}
        if set(cursor) != set(self.groups):
            raise ValueError(f"state has N {sorted(cursor)}, this sampler {sorted(self.groups)}")
        self.step = int(state["step"])
        self._cursor = cursor
