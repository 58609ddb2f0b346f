"""Qwen2.5-VL's 3-D rotary positions (mRoPE) for image + text sequences, computed explicitly.

Every forward of ours (prefill, decode, re-score) passes these positions, so generation and re-scoring see
the same positions whatever transformers' internal ``rope_deltas`` state is, and whatever its version.
Rule (Qwen2.5-VL, still images): a text token advances all three axes by one; an image whose merged grid is
``(t, h, w)`` occupies positions ``start + (t_i, h_i, w_i)`` and moves the next start by ``max(h, w)``
(as transformers' ``get_rope_index`` does for still images, t = 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["completion_positions", "mrope_positions"]


def mrope_positions(
    input_ids: Tensor,
    attention_mask: Tensor,
    image_grid_thw: Tensor | None,
    *,
    image_token_id: int,
    merge_size: int = 2,
) -> tuple[Tensor, Tensor]:
    """3-D positions of left- or right-padded prompts.

    Args:
        input_ids: [B, L] token ids, each image a contiguous run of ``image_token_id``.
        attention_mask: [B, L], 1 on real tokens.
        image_grid_thw: [num_images, 3] patch grids of the images in row-major order of appearance
            (row 0's images first), or None for text only.
        image_token_id: the ``<|image_pad|>`` id.
        merge_size: the vision tower's spatial merge size (2 for Qwen2.5-VL).
    Returns:
        positions: [3, B, L] long (0 on padding), and
        deltas: [B] long, ``next_position - number_of_real_tokens``: the position of the k-th real token after
        the prompt (k = 0, 1, ...) is ``num_real_tokens + k + delta`` on all three axes.
    """
    B, L = input_ids.shape
    device = input_ids.device
    positions = torch.zeros(3, B, L, dtype=torch.long, device=device)
    deltas = torch.zeros(B, dtype=torch.long, device=device)
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []  # host sync: small metadata
    mask = attention_mask.bool()
    next_image = 0
    for b in range(B):
        ids = input_ids[b][mask[b]]
        is_image = (ids == image_token_id).tolist()
        n = len(is_image)
        out = torch.empty(3, n, dtype=torch.long)
        pos, i = 0, 0
        while i < n:
            if not is_image[i]:
                j = i
                while j < n and not is_image[j]:
                    j += 1
                out[:, i:j] = torch.arange(pos, pos + j - i)
                pos += j - i
                i = j
                continue
            if next_image >= len(grids):
                raise ValueError("more image placeholders in input_ids than rows in image_grid_thw")
            t, h, w = grids[next_image]
            next_image += 1
            h, w = h // merge_size, w // merge_size
            count = t * h * w
            if i + count > n or not all(is_image[i : i + count]):
                raise ValueError(f"image {next_image - 1} expects {count} placeholder tokens at position {i}")
            tt = torch.arange(t).view(-1, 1, 1).expand(t, h, w).reshape(-1)
            hh = torch.arange(h).view(1, -1, 1).expand(t, h, w).reshape(-1)
            ww = torch.arange(w).view(1, 1, -1).expand(t, h, w).reshape(-1)
            out[:, i : i + count] = torch.stack([tt, hh, ww]) + pos
            pos += max(h, w)
            i += count
        positions[:, b, mask[b]] = out.to(device)
        deltas[b] = pos - n
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but input_ids hold {next_image}")
    return positions, deltas


def completion_positions(num_real: Tensor, deltas: Tensor, length: int, offset: int = 0) -> Tensor:
    """[3, R, length] positions of tokens ``offset .. offset + length - 1`` after each row's prompt.

    Args:
        num_real: [R] number of real prompt tokens per row.
        deltas: [R] from :func:`mrope_positions`.
    """
    steps = torch.arange(offset, offset + length, device=num_real.device)
    pos = (num_real + deltas).unsqueeze(1) + steps.unsqueeze(0)
    return pos.unsqueeze(0).expand(3, -1, -1)
