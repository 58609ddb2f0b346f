"""Rollout engines (HF shared-prefix, SGLang) and the policy forward used by training."""

from __future__ import annotations

from typing import Any

from rarl_fast.rollout.base import GenerationParams, RolloutEngine, Rollouts
from rarl_fast.rollout.hf import HFEngine
from rarl_fast.rollout.policy import CompletionStates, completion_states

__all__ = [
    "CompletionStates",
    "GenerationParams",
    "HFEngine",
    "RolloutEngine",
    "Rollouts",
    "completion_states",
    "make_engine",
]


def make_engine(
    backend: str,
    *,
    model: Any,
    tokenizer: Any,
    model_path: str | None = None,
    seed: int = 0,
    mem_fraction_static: float = 0.5,
    compile: str = "off",
) -> RolloutEngine:
    """The engine named by ``rollout.backend``: ``hf`` (shares ``model``; ``compile`` is ``rollout.compile``) or
    ``sglang`` (loads ``model_path``)."""
    if backend == "hf":
        return HFEngine(model, tokenizer, seed=seed, compile=compile)
    if backend == "sglang":
        from rarl_fast.rollout.sglang import SGLangEngine, require_sglang

        require_sglang()
        if model_path is None:
            raise ValueError("the SGLang backend needs model_path (a save_pretrained folder of the policy)")
        return SGLangEngine(model_path, tokenizer, mem_fraction_static=mem_fraction_static, seed=seed)
    raise ValueError(f"unknown rollout backend {backend!r}: expected 'hf' or 'sglang'")
