"""Prompt rendering through the processor's chat template, collation of groups into model inputs, and the
replacement of groups whose images cannot be loaded.

A :class:`PromptBatch` keeps the per-prompt image bookkeeping on the CPU (images per prompt, offsets into
``image_grid_thw`` and ``pixel_values``), so the rollout engine can expand each prompt G times and the
policy forward can slice prompts without a device sync.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from rarl_fast.data.groups import Group
from rarl_fast.data.images import BrokenImageError, ImageCache
from rarl_fast.data.prompts import build_messages
from rarl_fast.data.samples import DataNotFoundError, hash_unit

__all__ = ["PromptBatch", "collate", "readable", "readable_groups", "render_prompt"]


def render_prompt(processor: Any, group: Group) -> str:
    """The chat-template text of ``group``'s prompt (system + user, generation prompt appended).

    One ``<|vision_start|><|image_pad|><|vision_end|>`` placeholder per image; the processor expands each
    ``<|image_pad|>`` to the image's ``grid_h * grid_w / 4`` tokens when it sees the pixels.
    """
    messages = build_messages(group.n, group.rule, group.value_range)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass
class PromptBatch:
    """B prompts ready for ``generate`` or a forward pass.

    Attributes:
        input_ids: [B, P] int64, left-padded with the tokenizer's pad token.
        attention_mask: [B, P] int64, 0 on the left padding.
        mm_token_type_ids: [B, P] int64, 1 on image placeholder tokens, 0 elsewhere (pad with 0 over completion
            tokens when re-scoring: transformers then computes the same 3-D rope positions as in generation).
        pixel_values: [sum_patches, D] float, all images' patches, prompt by prompt, image by image
            (D = 3 * temporal_patch * patch**2 = 1176 for Qwen2.5-VL).
        image_grid_thw: [num_images, 3] int64, each image's (t, h, w) in 14-px patches, in the same order.
        groups: the B groups (truth, rule, key).
        image_counts: [B] int64 on CPU: images of prompt b (= groups[b].n).
        image_offsets: [B + 1] int64 on CPU: prompt b's rows of ``image_grid_thw`` are
            ``image_offsets[b]:image_offsets[b + 1]``.
        patch_offsets: [B + 1] int64 on CPU: prompt b's rows of ``pixel_values`` are
            ``patch_offsets[b]:patch_offsets[b + 1]``.
        lengths: [B] int64 on CPU: real (unpadded) prompt tokens.
    """

    input_ids: Tensor
    attention_mask: Tensor
    mm_token_type_ids: Tensor
    pixel_values: Tensor
    image_grid_thw: Tensor
    groups: list[Group]
    image_counts: Tensor
    image_offsets: Tensor
    patch_offsets: Tensor
    lengths: Tensor

    def __len__(self) -> int:
        return len(self.groups)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptBatch:
        """The model tensors moved to ``device`` (``pixel_values`` also cast to ``dtype`` if given); CPU bookkeeping
        stays on the CPU."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            mm_token_type_ids=self.mm_token_type_ids.to(device),
            pixel_values=self.pixel_values.to(device, dtype=dtype),
            image_grid_thw=self.image_grid_thw.to(device),
        )

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments of the model's ``forward``/``generate`` for the prompts alone."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }

    def select(self, indices: list[int] | Tensor) -> PromptBatch:
        """The prompts ``indices`` (in that order, repeats allowed), with their images; left padding trimmed to the
        longest selected prompt."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        if not idx:
            raise ValueError("select needs at least one prompt")
        width = int(self.lengths[idx].max())
        rows = torch.tensor(idx, dtype=torch.long)
        cols = slice(self.input_ids.shape[1] - width, None)
        img_rows = torch.cat([torch.arange(self.image_offsets[i], self.image_offsets[i + 1]) for i in idx])
        patch_rows = torch.cat([torch.arange(self.patch_offsets[i], self.patch_offsets[i + 1]) for i in idx])
        counts = self.image_counts[idx]
        patches = self.patch_offsets[1:][idx] - self.patch_offsets[:-1][idx]
        dev = self.input_ids.device
        return PromptBatch(
            input_ids=self.input_ids[rows.to(dev), cols],
            attention_mask=self.attention_mask[rows.to(dev), cols],
            mm_token_type_ids=self.mm_token_type_ids[rows.to(dev), cols],
            pixel_values=self.pixel_values[patch_rows.to(self.pixel_values.device)],
            image_grid_thw=self.image_grid_thw[img_rows.to(self.image_grid_thw.device)],
            groups=[self.groups[i] for i in idx],
            image_counts=counts,
            image_offsets=_offsets(counts),
            patch_offsets=_offsets(patches),
            lengths=self.lengths[idx],
        )

    def repeat_interleave(self, repeats: int) -> PromptBatch:
        """Each prompt ``repeats`` times in a row (prompt b becomes rows b*G .. b*G + G - 1), images included."""
        return self.select([b for b in range(len(self)) for _ in range(repeats)])


def _offsets(counts: Tensor) -> Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.long().cumsum(0)])


def collate(processor: Any, groups: list[Group], cache: ImageCache) -> PromptBatch:
    """Render, tokenize and encode ``groups`` into one left-padded :class:`PromptBatch`.

    Images come from ``cache`` (decoded once, resized by the processor's rule, so the processor's own resize
    leaves them unchanged). Raises ValueError if the tokenizer pads on the right.
    """
    if not groups:
        raise ValueError("collate needs at least one group")
    if processor.tokenizer.padding_side != "left":
        raise ValueError("prompts must be left-padded for generation: set processor.tokenizer.padding_side='left'")
    texts = [render_prompt(processor, g) for g in groups]
    images = [cache.get(s.image) for g in groups for s in g.samples]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, return_mm_token_type_ids=True)
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    mm = enc.get("mm_token_type_ids")
    if mm is None:
        mm = (input_ids == processor.image_token_id).long()
    grid = enc["image_grid_thw"].long()
    counts = torch.tensor([g.n for g in groups], dtype=torch.long)
    image_offsets = _offsets(counts)
    per_image = grid.prod(dim=1)
    per_prompt = torch.stack([per_image[image_offsets[b] : image_offsets[b + 1]].sum() for b in range(len(groups))])
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm.long(),
        pixel_values=enc["pixel_values"],
        image_grid_thw=grid,
        groups=list(groups),
        image_counts=counts,
        image_offsets=image_offsets,
        patch_offsets=_offsets(per_prompt),
        lengths=attention_mask.sum(dim=1),
    )


def readable(group: Group, cache: ImageCache) -> bool:
    """Whether every image of ``group`` loads through ``cache`` (which then holds them for :func:`collate`); an image
    that does not is remembered by the cache (``cache.failed``) and never read again."""
    try:
        for s in group.samples:
            cache.get(s.image)
    except BrokenImageError:
        return False
    return True


def readable_groups(
    groups: list[Group], pool: dict[int, list[Group]], cache: ImageCache, *, seed: int, tries: int = 64
) -> tuple[list[Group], int]:
    """``groups`` with each group holding an image that cannot be loaded (whatever the load-time check let through)
    replaced by a readable group of the same N from ``pool`` (N -> groups) that is not in the batch yet; the
    replacement is drawn by ``seed`` and the group's key, so a rerun (or a resumed run) makes the same choice.
    Returns the groups and how many were replaced; raises :class:`DataNotFoundError` when ``tries`` draws find no
    readable group."""
    out: list[Group] = []
    keys = {g.key for g in groups}
    replaced = 0
    for g in groups:
        if readable(g, cache):
            out.append(g)
            continue
        replaced += 1
        candidates = pool.get(g.n, [])
        for attempt in range(tries if candidates else 0):
            pick = candidates[int(hash_unit(seed, f"replace:{attempt}:" + "\x00".join(g.key)) * len(candidates))]
            if pick.key not in keys and readable(pick, cache):
                out.append(pick)
                keys.add(pick.key)
                break
        else:
            raise DataNotFoundError(
                f"group {g.key} has an unreadable image and {tries} draws found no readable group of {g.n} image(s) "
                f"to replace it ({len(cache.failed)} unreadable images so far): check the data"
            )
    return out, replaced
