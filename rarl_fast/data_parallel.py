"""Which rank holds which groups: the unit of data parallelism is the group (a prompt and its G samples).

Every rank draws the same global batch and keeps its share; shares are balanced by cost because the ranks wait
for each other at every gradient all-reduce.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["balanced_shares", "round_robin_share"]

T = TypeVar("T")


def round_robin_share(items: list[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s part of a global list, round robin (evaluation splits its test groups this way)."""
    return items[rank::world]


def balanced_shares(costs: list[float], world: int) -> list[list[int]]:
    """Indices of ``costs`` split over ``world`` ranks, as many on each as round robin would give (the first
    ``len % world`` ranks one more), with loads close to even: the costliest first to the least loaded rank that
    has room (ties: lowest index, lowest rank), then up to 4 * world swaps between the most and the least loaded
    rank, each lowering the larger load. Deterministic (the same on every rank), each index exactly once, lists
    ascending."""
    per_rank = [len(costs) // world + (r < len(costs) % world) for r in range(world)]
    load, shares = [0.0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(world) if len(shares[r]) < per_rank[r]), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += costs[i]
    for _ in range(4 * world):  # bounded: this runs every step
        hi = max(range(world), key=lambda r: (load[r], -r))
        lo = min(range(world), key=lambda r: (load[r], r))
        gap = load[hi] - load[lo]
        swaps = [(abs(gap / 2 - (costs[i] - costs[j])), i, j) for i in shares[hi] for j in shares[lo]]
        swaps = [sw for sw in swaps if 0 < costs[sw[1]] - costs[sw[2]] < gap]
        if not swaps:
            break
        _, i, j = min(swaps)
        shares[hi][shares[hi].index(i)], shares[lo][shares[lo].index(j)] = j, i
        load[hi] += costs[j] - costs[i]
        load[lo] += costs[i] - costs[j]
    return [sorted(s) for s in shares]
