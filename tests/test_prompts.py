"""Prompts match tests/data exactly (docs/method.md section 1)."""

from __future__ import annotations

import pytest

from rarl_fast.data.prompts import SYSTEM_PROMPT, build_messages, user_prompt_text


def test_system_prompt_matches_fixture(data_dir):
    assert (data_dir / "prompt_system.txt").read_text(encoding="utf-8") == SYSTEM_PROMPT


def test_user_prompt_matches_fixture(data_dir):
    expected = (data_dir / "prompt_user_4img_age.txt").read_text(encoding="utf-8")
    assert user_prompt_text(4, "age", "an integer from 0 to 116") == expected


def test_messages_put_one_image_part_per_mark():
    messages = build_messages(3, "number of cats", "an integer from 0 to 50")
    assert [m["role"] for m in messages] == ["system", "user"]
    parts = messages[1]["content"]
    assert [p["type"] for p in parts].count("image") == 3
    text = "".join("<image>" if p["type"] == "image" else p["text"] for p in parts)
    assert text == user_prompt_text(3, "number of cats", "an integer from 0 to 50")
    assert parts[0] == {"type": "text", "text": "Image 1: "}


def test_rendered_through_the_chat_template(tiny_vlm_dir, data_dir):
    from rarl_fast.model import load_processor

    processor = load_processor(tiny_vlm_dir)
    text = processor.apply_chat_template(
        build_messages(4, "age", "an integer from 0 to 116"), add_generation_prompt=True
    )
    user = (data_dir / "prompt_user_4img_age.txt").read_text(encoding="utf-8")
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{user.replace('<image>', placeholder)}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_zero_images_rejected():
    with pytest.raises(ValueError):
        user_prompt_text(0, "age", "x")
