"""The exact prompts of docs/method.md section 1 (tests/test_prompts.py checks them against tests/data/prompt_*.txt)."""

from __future__ import annotations

from typing import Any

__all__ = ["SYSTEM_PROMPT", "build_messages", "user_prompt_text"]

SYSTEM_PROMPT = (
    "The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning process "
    "in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)

IMAGE_MARK = "<image>"

_INSTRUCTION = (
    "Analyze each image to determine the {rule}, and if there are multiple images, sort them in ascending order of "
    "{rule}. Output the results as a JSON list of dictionaries in this format: [{{'image_id': number, 'value': "
    "value}}, ...], where value is the {rule} ({value_range}). Ensure the list is sorted correctly with strictly "
    "followed syntax."
)


def user_prompt_text(num_images: int, rule: str, value_range: str) -> str:
    """The user message with ``<image>`` where each image's placeholder goes (ids 1-based, prompt order)."""
    if num_images < 1:
        raise ValueError(f"a prompt needs at least one image, got {num_images}")
    lines = [f"Image {i}: {IMAGE_MARK}" for i in range(1, num_images + 1)]
    lines.append(_INSTRUCTION.format(rule=rule, value_range=value_range))
    return "\n".join(lines)


def build_messages(num_images: int, rule: str, value_range: str) -> list[dict[str, Any]]:
    """Chat messages (system + user) in the processor's content-list format, one image part per ``<image>``."""
    parts: list[dict[str, Any]] = []
    for i, chunk in enumerate(user_prompt_text(num_images, rule, value_range).split(IMAGE_MARK)):
        if i > 0:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": parts}]
