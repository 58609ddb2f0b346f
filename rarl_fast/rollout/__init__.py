"""Rollout engines: the HF shared-prefix engine and SGLang, behind one protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rarl_fast.config import RolloutCompile
from rarl_fast.rollout.base import GenerationParams, RolloutEngine, Rollouts
from rarl_fast.rollout.hf import HFEngine
from rarl_fast.rollout.lifecycle import awake

__all__ = [
    "GenerationParams",
    "HFEngine",
    "RolloutEngine",
    "Rollouts",
    "awake",
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
    image_loader: Callable[[Any], Any] | None = None,
    compile: RolloutCompile = "off",
) -> RolloutEngine:
    """The engine named by ``rollout.backend``: ``hf`` (shares ``model``; ``compile`` is ``rollout.compile``) or
    ``sglang`` (loads ``model_path``; ``image_loader`` maps a sample's image reference to the image the processor
    saw)."""
    if backend == "hf":
        return HFEngine(model, tokenizer, seed=seed, compile=compile)
    if backend == "sglang":
        from rarl_fast.rollout.sglang import SGLangEngine, require_sglang

        require_sglang()
        if model_path is None:
            raise ValueError("the SGLang backend needs model_path (a save_pretrained folder of the policy)")
        return SGLangEngine(
            model_path, tokenizer, mem_fraction_static=mem_fraction_static, seed=seed, image_loader=image_loader
        )
    raise ValueError(f"unknown rollout backend {backend!r}: expected 'hf' or 'sglang'")
