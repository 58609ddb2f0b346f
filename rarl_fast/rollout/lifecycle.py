"""The one place the trainer drives a rollout engine: wake -> push weights if needed -> generate -> sleep.

A colocated engine (SGLang) holds GPU memory the trainer needs during its update, so it sleeps outside
rollouts; its weights must be the policy's before it generates. :func:`awake` orders these steps for every
engine (for the HF engine, which shares the policy module, they cost nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor

from rarl_fast.rollout.base import RolloutEngine

__all__ = ["awake"]


@contextmanager
def awake(
    engine: RolloutEngine,
    *,
    version: Hashable | None,
    weights: Callable[[], Iterable[tuple[str, Tensor]]],
) -> Iterator[RolloutEngine]:
    """``engine`` awake and holding policy ``version`` inside the block, asleep after it.

    Args:
        version: identifies the policy's current weights (e.g. ``(stage, optimizer step)``); the weights are
            pushed only when the engine does not hold this version. None: unknown, always push.
        weights: returns the policy's (transformers name, tensor) pairs; called only when a push is needed.

    An exception inside the block leaves the engine awake (a failed request may still be running in it).
    """
    engine.wake()
    if version is None or engine.weights_version != version:
        engine.update_weights(weights())
        engine.weights_version = version
    yield engine
    engine.sleep()
