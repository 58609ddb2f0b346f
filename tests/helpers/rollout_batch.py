"""A left-padded prompt batch of the tiny VLM for the rollout-engine tests: images per prompt, group keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rarl_fast.data.prompts import build_messages


@dataclass(frozen=True)
class KeyedGroup:
    """What an engine reads of a data group: its stable key."""

    key: tuple[str, ...]


def prompt_batch(processor: Any, per_prompt: list[list[Any]], keys: list[tuple[str, ...]]) -> Any:
    """The processor's encoding of one age prompt per image list, with ``groups`` set from ``keys``."""
    texts = [
        processor.apply_chat_template(
            build_messages(len(imgs), "age", "an integer from 0 to 116"), add_generation_prompt=True
        )
        for imgs in per_prompt
    ]
    enc = processor(text=texts, images=per_prompt, return_tensors="pt", padding=True)
    enc["groups"] = [KeyedGroup(key=k) for k in keys]
    return enc
