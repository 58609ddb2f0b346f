"""The tiny VLM factory and the real loader: build, save, reload, generate with 1 and 4 images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from rarl_fast.data.prompts import build_messages
from rarl_fast.model import (
    choose_attn_implementation,
    choose_dtype,
    load_model,
    load_policy,
    load_processor,
    load_reference,
    make_tiny_vlm,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def tiny(tiny_vlm_dir: Path):
    processor = load_processor(tiny_vlm_dir, min_pixels=56 * 56, max_pixels=112 * 112)
    model = load_model(tiny_vlm_dir, trainable=False, local_files_only=True)
    return processor, model


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (56 + 28 * (i % 3), 84), (30 * i, 120, 250 - 30 * i)) for i in range(n)]


def test_saved_folder_is_a_standard_checkpoint(tiny_vlm_dir: Path):
    names = {p.name for p in tiny_vlm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    cfg = json.loads((tiny_vlm_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    proc_cfg = json.loads((tiny_vlm_dir / "processor_config.json").read_text())
    assert proc_cfg["processor_class"] == "Qwen2_5_VLProcessor"
    tok_cfg = json.loads((tiny_vlm_dir / "tokenizer_config.json").read_text())
    assert tok_cfg.get("processor_class", "Qwen2_5_VLProcessor") == "Qwen2_5_VLProcessor"


def test_reload_through_the_real_loader(tiny):
    processor, model = tiny
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert 2e5 < n_params < 2e6
    tok = processor.tokenizer
    assert tok.padding_side == "left"
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.text_config.vocab_size >= len(tok) and model.config.text_config.vocab_size % 64 == 0
    ip = processor.image_processor
    assert ip.size["shortest_edge"] == 56 * 56 and ip.size["longest_edge"] == 112 * 112


@pytest.mark.parametrize("n_images", [1, 4])
def test_generate_returns_text(tiny, n_images: int):
    processor, model = tiny
    messages = build_messages(n_images, "age", "an integer from 0 to 116")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == n_images
    assert text.endswith("<|im_start|>assistant\n")
    enc = processor(text=[text, text], images=[_images(n_images), _images(n_images)], return_tensors="pt", padding=True)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 56..112 px images -> 4..16 visual tokens each, counted per prompt
    per_prompt = (enc["input_ids"] == image_token).sum(dim=1)
    expected = int(enc["image_grid_thw"].prod(dim=1).sum()) // 4 // 2
    assert per_prompt.tolist() == [expected, expected]
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=8, do_sample=True)
    new = out[:, enc["input_ids"].shape[1] :]
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 8
    texts = processor.batch_decode(new, skip_special_tokens=False)
    assert all(isinstance(t, str) and t for t in texts)


def test_tiny_build_is_deterministic(tmp_path: Path, tiny_vlm_dir: Path):
    from safetensors.torch import load_file

    other = make_tiny_vlm(tmp_path / "again", seed=0)
    a, b = load_file(str(tiny_vlm_dir / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (other / "tokenizer.json").read_text() == (tiny_vlm_dir / "tokenizer.json").read_text()


def test_tokenizer_round_trips_answers(tiny):
    processor, _ = tiny
    items = '[{"image_id": 2, "value": 12.5}, {"image_id": 1, "value": 31}]'
    answer = f"<think>Reference answer.</think> <answer>{items}</answer>"
    ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.decode(ids) == answer
    assert len(ids) < len(answer)  # the BPE merges make our answers compact


def test_policy_and_reference_from_config(tiny_vlm_dir: Path):
    from rarl_fast.config import ModelConfig

    cfg = ModelConfig(name_or_path=str(tiny_vlm_dir), local_files_only=True, freeze_vision=True, use_liger=True)
    policy = load_policy(cfg)
    assert policy.training
    visual = {n for n, p in policy.named_parameters() if "visual" in n}
    assert visual and all(not p.requires_grad for n, p in policy.named_parameters() if n in visual)
    assert all(p.requires_grad for n, p in policy.named_parameters() if n not in visual)
    ref = load_reference(cfg)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    sd_p, sd_r = policy.state_dict(), ref.state_dict()
    assert all(torch.equal(sd_p[k], sd_r[k]) for k in sd_p)


def test_gradient_checkpointing_switch(tiny_vlm_dir: Path):
    model = load_model(tiny_vlm_dir, gradient_checkpointing=True)
    assert model.is_gradient_checkpointing and model.config.use_cache is False


def test_resolve_tiny_builds_once(tmp_path: Path):
    path = resolve_model_path("tiny", tmp_path / "t")
    assert (Path(path) / "config.json").is_file()
    mtime = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("tiny", tmp_path / "t") == path
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_model_path("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    with pytest.raises(ValueError, match="2 decoder layers, the config asks for 4"):
        resolve_model_path("tiny", tmp_path / "t", 4)  # never silently reuse a model of another depth
    deeper = resolve_model_path("tiny", tmp_path / "t4", 4)
    assert json.loads((Path(deeper) / "config.json").read_text())["text_config"]["num_hidden_layers"] == 4


def test_device_dtype_and_attention_choices():
    assert choose_dtype("auto", "cpu") == torch.float32
    assert choose_dtype("auto", "cuda") == torch.bfloat16
    assert choose_dtype("bfloat16", "cpu") == torch.bfloat16
    assert choose_attn_implementation("auto", "cpu") == "sdpa"
    assert choose_attn_implementation("eager", "cpu") == "eager"
    with pytest.raises(RuntimeError, match="flash_attention_2"):
        choose_attn_implementation("flash_attention_2", "cpu")


def test_missing_local_checkpoint_is_a_clear_error(tmp_path: Path):
    from rarl_fast.model import ModelLoadError, resolve_model_path

    with pytest.raises(ModelLoadError, match=r"cannot load the model from .*nothing-here"):
        load_model(tmp_path / "nothing-here", local_files_only=True)
    with pytest.raises(ModelLoadError, match="no model folder at /nonexistent"):  # not taken for a Hub id
        resolve_model_path("/nonexistent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(tmp_path / "empty", local_files_only=True)
