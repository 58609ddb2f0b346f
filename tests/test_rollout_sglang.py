"""SGLang backend pieces that run without SGLang: request building, output regrouping, name mapping."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from rarl_fast.data.prompts import build_messages
from rarl_fast.model import load_model, load_processor
from rarl_fast.rollout import GenerationParams, make_engine
from rarl_fast.rollout.sglang import (
    IMAGE_PLACEHOLDER,
    build_requests,
    collapse_image_placeholders,
    regroup_outputs,
    require_sglang,
    to_sglang_name,
)


def test_name_mapping_against_the_tiny_model(tiny_vlm_dir):
    model = load_model(tiny_vlm_dir, trainable=False, local_files_only=True)
    names = list(model.state_dict().keys())
    mapped = [to_sglang_name(n) for n in names]
    assert len(set(mapped)) == len(mapped)
    assert not any("language_model" in m for m in mapped)
    prefixes = ("model.layers.", "model.embed_tokens.", "model.norm.", "visual.", "lm_head.")
    assert all(m.startswith(prefixes) for m in mapped), [m for m in mapped if not m.startswith(prefixes)]
    assert "visual.patch_embed.proj.weight" in mapped and "model.layers.0.self_attn.q_proj.weight" in mapped
    assert "lm_head.weight" in mapped and "visual.merger.mlp.0.weight" in mapped
    # the checkpoint layout passes through unchanged
    assert [to_sglang_name(m) for m in mapped] == mapped


def test_collapse_expanded_prompt_back_to_one_placeholder_per_image(tiny_vlm_dir):
    processor = load_processor(tiny_vlm_dir)
    images = [Image.new("RGB", (112, 84), (i * 50, 0, 0)) for i in range(3)]
    text = processor.apply_chat_template(
        build_messages(3, "age", "an integer from 0 to 116"), add_generation_prompt=True
    )
    enc = processor(text=[text], images=[images], return_tensors="pt")
    decoded = processor.tokenizer.decode(enc["input_ids"][0])
    assert decoded.count("<|image_pad|>") > 3
    assert collapse_image_placeholders(decoded) == text
    assert text.count(IMAGE_PLACEHOLDER) == 3


def test_build_requests():
    params = GenerationParams(max_new_tokens=64, temperature=0.7, top_p=0.9, top_k=0, seed=5)
    texts = [f"a {IMAGE_PLACEHOLDER} b", f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER} c"]
    req = build_requests(texts, [["img0"], ["img1", "img2"]], 8, params, stop_token_ids=[7, 9])
    assert req["prompt"] == texts and req["image_data"] == [["img0"], ["img1", "img2"]]
    assert req["return_logprob"] is True
    sp = req["sampling_params"]
    assert sp["n"] == 8 and sp["max_new_tokens"] == 64 and sp["temperature"] == 0.7 and sp["top_p"] == 0.9
    assert sp["top_k"] == -1 and sp["stop_token_ids"] == [7, 9] and sp["sampling_seed"] == 5
    assert sp["skip_special_tokens"] is False
    greedy = build_requests(texts, [["a"], ["b", "c"]], 1, GenerationParams(greedy=True))
    assert greedy["sampling_params"]["temperature"] == 0.0
    with pytest.raises(ValueError, match="placeholders"):
        build_requests(texts, [["a"], ["b"]], 2, params)
    with pytest.raises(ValueError, match="image lists"):
        build_requests(texts, [["a"]], 2, params)


def _out(ids, lps, reason):
    return {"output_ids": ids, "meta_info": {"output_token_logprobs": [(lp, t, None) for lp, t in zip(lps, ids)],
                                             "finish_reason": {"type": reason}}}  # fmt: skip


def test_regroup_outputs_prompt_major():
    EOS, PAD, IMG = 2, 0, 5
    outputs = [
        _out([10, 11, EOS], [-0.1, -0.2, -0.3], "stop"),  # prompt 0, sample 0
        _out([12, 13, 14, 15], [-1.0, -1.1, -1.2, -1.3], "length"),  # prompt 0, sample 1: truncated
        _out([16, IMG, 17], [-0.5, -0.6, -0.7], "stop"),  # prompt 1, sample 0: vision token cut
        _out([18, EOS], [-0.4, -0.8], "stop"),  # prompt 1, sample 1
    ]
    parts = regroup_outputs(outputs, 2, 2, pad_token_id=PAD, eos_token_ids=[EOS], vision_token_ids=[IMG])
    assert parts["completion_ids"].tolist() == [
        [10, 11, EOS, PAD],
        [12, 13, 14, 15],
        [16, PAD, PAD, PAD],
        [18, EOS, PAD, PAD],
    ]
    assert parts["completion_mask"].sum(1).tolist() == [3, 4, 1, 2]
    assert parts["truncated"].tolist() == [False, True, False, False]
    assert parts["vision_cut"].tolist() == [False, False, True, False]
    assert torch.allclose(parts["sampling_logp"][1], torch.tensor([-1.0, -1.1, -1.2, -1.3]))
    assert (parts["sampling_logp"][~parts["completion_mask"]] == 0).all()
    with pytest.raises(ValueError, match="expected 2 x 2"):
        regroup_outputs(outputs[:3], 2, 2, pad_token_id=PAD, eos_token_ids=[EOS], vision_token_ids=[IMG])
    bad = [{"output_ids": [1, 2], "meta_info": {"output_token_logprobs": [(-1.0, 1, None)]}}]
    with pytest.raises(ValueError, match="return_logprob"):
        regroup_outputs(bad, 1, 1, pad_token_id=PAD, eos_token_ids=[EOS], vision_token_ids=[IMG])


@pytest.mark.skipif(
    importlib.util.find_spec("sglang") is not None and torch.cuda.is_available(), reason="SGLang can run here"
)
def test_selecting_sglang_without_it_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"rollout\.backend=sglang needs") as info:
        require_sglang()
    if importlib.util.find_spec("sglang") is None:
        assert "sglang package" in str(info.value)
    if not torch.cuda.is_available():
        assert "CUDA device" in str(info.value)
    with pytest.raises(RuntimeError, match=r"rollout\.backend=sglang needs"):
        make_engine("sglang", model=None, tokenizer=None, model_path="x")
