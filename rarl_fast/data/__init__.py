"""Data: loaders of the real datasets and the synthetic benchmark, N-image groups, prompts and collation.

Public names are imported lazily, so ``import rarl_fast.data.prompts`` stays light (no torch, numpy or PIL).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BrokenImageError": "images",
    "DataFormatError": "samples",
    "DataNotFoundError": "samples",
    "Group": "groups",
    "GroupSampler": "groups",
    "ImageCache": "images",
    "LoadReport": "samples",
    "PromptBatch": "batch",
    "Sample": "samples",
    "SyntheticImage": "synthetic",
    "TaskData": "samples",
    "build_groups": "groups",
    "collate": "batch",
    "eligible_category_counts": "groups",
    "load_task": "task",
    "readable": "batch",
    "readable_groups": "batch",
    "render_prompt": "batch",
    "build_test_groups": "groups",
    "build_train_groups": "groups",
    "truth_json": "groups",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rarl_fast.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rarl_fast.data.{module}"), name)


def __dir__() -> list[str]:
    return __all__
