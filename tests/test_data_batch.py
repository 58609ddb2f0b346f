"""Prompt rendering, the image cache and collation into Qwen2.5-VL inputs (tiny VLM processor on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from rarl_fast.data import BrokenImageError, Group, ImageCache, Sample, collate, render_prompt
from rarl_fast.data.images import resized_size
from rarl_fast.data.prompts import SYSTEM_PROMPT
from rarl_fast.data.synthetic import synthetic_samples

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def processor(tiny_vlm_dir):
    from rarl_fast.model import load_processor

    return load_processor(tiny_vlm_dir, min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """JPEG files of awkward sizes (not multiples of 28, larger than max_pixels, tall, small)."""
    folder = tmp_path_factory.mktemp("photos")
    out = []
    for i, size in enumerate([(150, 97), (300, 200), (40, 90), (57, 57), (500, 120)]):
        path = folder / f"{i}.jpg"
        Image.effect_noise(size, 40 + 10 * i).convert("RGB").save(path, quality=92)
        out.append(str(path))
    return out


def _group(samples: list[Sample], rule: str = "age", value_range: str = "an integer from 0 to 116") -> Group:
    return Group.of(samples, rule, value_range, 10.0)


def _age_group(photos: list[str]) -> Group:
    return _group([Sample(f"p{i}", float(20 + 7 * i), p) for i, p in enumerate(photos[:4])])


def test_rendered_prompt_of_a_4_image_age_group_equals_the_fixtures(processor, photos, data_dir):
    text = render_prompt(processor, _age_group(photos))
    system = (data_dir / "prompt_system.txt").read_text(encoding="utf-8")
    user = (data_dir / "prompt_user_4img_age.txt").read_text(encoding="utf-8")
    assert system == SYSTEM_PROMPT
    head, rest = text.split("<|im_end|>\n<|im_start|>user\n")
    assert head == f"<|im_start|>system\n{system}"
    rendered_user, tail = rest.split("<|im_end|>\n")
    assert rendered_user.replace(PLACEHOLDER, "<image>") == user
    assert rendered_user.count(PLACEHOLDER) == 4
    assert tail == "<|im_start|>assistant\n"


def _mixed_groups(photos: list[str]) -> list[Group]:
    shapes = synthetic_samples("shapes", "test", 40, seed=0)
    bars = synthetic_samples("bar", "test", 12, seed=0)
    distinct = list({s.value: s for s in shapes}.values())
    return [
        _group([Sample("p0", 3.0, photos[0])]),
        _group([*distinct[:6], bars[0], Sample("p1", 77.0, photos[1])]),
        _group([Sample("p2", 1.0, photos[2]), Sample("p3", 2.0, photos[3])], "number of cat", "an integer"),
        _age_group(photos),
    ]


def test_collate_left_pads_and_counts_image_tokens(processor, photos):
    groups = _mixed_groups(photos)
    cache = ImageCache.for_processor(processor)
    batch = collate(processor, groups, cache)
    B, P = batch.input_ids.shape
    assert B == 4 and batch.attention_mask.shape == (B, P) and batch.mm_token_type_ids.shape == (B, P)
    pad = processor.tokenizer.pad_token_id
    image_id = processor.image_token_id
    lengths = batch.attention_mask.sum(1)
    assert batch.lengths.tolist() == lengths.tolist() and int(lengths.max()) == P
    for b in range(B):
        mask = batch.attention_mask[b]
        assert mask[P - int(lengths[b]) :].all() and not mask[: P - int(lengths[b])].any(), "left padding"
        assert (batch.input_ids[b, : P - int(lengths[b])] == pad).all()
        assert processor.tokenizer.decode(batch.input_ids[b, mask.bool()]).count("<|vision_start|>") == groups[b].n
    assert batch.image_counts.tolist() == [1, 8, 2, 4]
    assert batch.image_grid_thw.shape == (15, 3) and (batch.image_grid_thw[:, 0] == 1).all()
    assert torch.equal(batch.mm_token_type_ids, (batch.input_ids == image_id).long())
    per_image = batch.image_grid_thw.prod(1)
    assert batch.pixel_values.shape == (int(per_image.sum()), 1176)
    for b in range(B):
        lo, hi = int(batch.image_offsets[b]), int(batch.image_offsets[b + 1])
        assert hi - lo == groups[b].n
        assert int(batch.mm_token_type_ids[b].sum()) == int(per_image[lo:hi].sum()) // 4
        assert int(batch.patch_offsets[b + 1] - batch.patch_offsets[b]) == int(per_image[lo:hi].sum())
    for hw in batch.image_grid_thw[:, 1:].tolist():  # 14-px patches: 56..112 px sides, area within the bounds
        assert hw[0] % 2 == 0 and hw[1] % 2 == 0 and 16 <= hw[0] * hw[1] <= 64
    moved = batch.to("cpu", dtype=torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.input_ids.dtype == torch.long


def test_select_and_repeat_interleave_keep_prompts_with_their_images(processor, photos):
    groups = _mixed_groups(photos)
    batch = collate(processor, groups, ImageCache.for_processor(processor))
    sub = batch.select([2, 0])
    assert [g.key for g in sub.groups] == [groups[2].key, groups[0].key]
    assert sub.input_ids.shape[1] == int(batch.lengths[[2, 0]].max())  # left padding trimmed
    alone = collate(processor, [groups[2]], ImageCache.for_processor(processor))
    w = alone.input_ids.shape[1]
    assert torch.equal(sub.input_ids[0, -w:], alone.input_ids[0])
    assert torch.equal(sub.pixel_values[: alone.pixel_values.shape[0]], alone.pixel_values)
    assert torch.equal(sub.image_grid_thw[:2], alone.image_grid_thw)
    rep = batch.repeat_interleave(3)
    assert len(rep) == 12 and rep.image_counts.tolist() == [1] * 3 + [8] * 3 + [2] * 3 + [4] * 3
    assert torch.equal(rep.input_ids[3], batch.input_ids[1]) and torch.equal(rep.input_ids[5], batch.input_ids[1])
    assert rep.pixel_values.shape[0] == 3 * batch.pixel_values.shape[0]
    b = 1
    lo, hi = int(rep.patch_offsets[3 * b + 2]), int(rep.patch_offsets[3 * b + 3])
    assert torch.equal(rep.pixel_values[lo:hi], batch.pixel_values[batch.patch_offsets[b] : batch.patch_offsets[b + 1]])


def test_batch_runs_through_the_tiny_vlm_and_padding_does_not_change_logits(processor, photos, tiny_vlm_dir):
    from rarl_fast.model import load_model

    model = load_model(tiny_vlm_dir, attn_implementation="sdpa", use_liger=False, trainable=False)
    groups = _mixed_groups(photos)
    batch = collate(processor, groups, ImageCache.for_processor(processor))
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
        for b in (0, 2):
            alone = batch.select([b])
            single = model(**alone.model_inputs()).logits
            torch.testing.assert_close(logits[b, -1], single[0, -1], atol=1e-4, rtol=1e-4)
    assert logits.shape[:2] == batch.input_ids.shape


def test_cache_pixels_equal_the_processors_own_resize(processor, photos):
    cache = ImageCache.for_processor(processor)
    for path in photos:
        with Image.open(path) as im:
            original = im.convert("RGB")
        ours = processor.image_processor(images=[cache.get(path)], return_tensors="pt")
        theirs = processor.image_processor(images=[original], return_tensors="pt")
        assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])  # same rule, same resampling: exact


def test_cache_decodes_each_image_once_and_stays_bounded(processor, photos):
    groups = _mixed_groups(photos)
    cache = ImageCache.for_processor(processor)
    for _ in range(3):  # three "epochs"
        collate(processor, groups, cache)
    refs = {s.image for g in groups for s in g.samples}
    assert set(cache.decodes) == refs and set(cache.decodes.values()) == {1}
    assert cache.hits == 2 * sum(g.n for g in groups) + sum(g.n for g in groups) - len(refs)
    small = ImageCache(min_pixels=56 * 56, max_pixels=112 * 112, max_bytes=40_000)
    for path in photos * 2:
        small.get(path)
        assert small.nbytes <= small.max_bytes and len(small) <= 3
    assert max(small.decodes.values()) == 2  # evicted, decoded again


def test_broken_image_raises_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    cache = ImageCache(min_pixels=56 * 56, max_pixels=112 * 112)
    with pytest.raises(BrokenImageError, match=r"bad\.jpg"):
        cache.get(str(bad))


def test_collate_refuses_right_padding(tiny_vlm_dir, photos):
    from rarl_fast.model import load_processor

    proc = load_processor(tiny_vlm_dir)
    proc.tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="left"):
        collate(proc, _mixed_groups(photos)[:1], ImageCache.for_processor(proc))


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), lo=st.sampled_from([56 * 56, 128 * 28 * 28]))
def test_resized_size_is_transformers_smart_resize(h, w, lo):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    hi = 448 * 448
    try:
        expected = smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
    except ValueError:
        with pytest.raises(ValueError):
            resized_size(h, w, min_pixels=lo, max_pixels=hi)
        return
    assert resized_size(h, w, min_pixels=lo, max_pixels=hi) == expected


def test_exif_orientation_is_applied(tmp_path: Path):
    from rarl_fast.data.images import load_image

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (80, 40), (200, 10, 10)).save(path, exif=exif)
    assert load_image(str(path)).size == (40, 80)
