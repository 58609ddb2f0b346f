"""What ``rarl-fast data`` shows: value histograms as text, and a contact sheet of groups with prompts and answers."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rarl_fast.data.groups import Group, truth_json
from rarl_fast.data.images import MAX_IMAGE_PIXELS, BrokenImageError, load_image
from rarl_fast.data.prompts import SYSTEM_PROMPT, user_prompt_text

__all__ = ["contact_sheet", "value_histogram"]

_THUMB = 112
_PAD = 10
_WIDTH = 1200


def value_histogram(values: Sequence[float], lo: float, hi: float, *, bins: int = 10, bar: int = 40) -> list[str]:
    """Text histogram lines ``[a, b)  count  ####``: one bin per integer when all values are integers and the range
    spans at most 30 of them, else ``bins`` equal bins over [lo, hi] (the last one closed)."""
    if not values:
        return ["(no values)"]
    if all(float(v).is_integer() for v in values) and hi - lo <= 30:
        edges = [math.floor(lo) + i for i in range(int(math.floor(hi) - math.floor(lo)) + 2)]
    else:
        edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    counts = [0] * (len(edges) - 1)
    for v in values:
        k = next((i for i in range(len(counts)) if v < edges[i + 1]), len(counts) - 1)
        counts[max(0, k)] += 1
    top = max(counts) or 1
    width = max(len(f"{e:g}") for e in edges)
    return [
        f"[{edges[i]:>{width}g}, {edges[i + 1]:>{width}g})  {c:>7d}  {'#' * round(bar * c / top)}"
        for i, c in enumerate(counts)
    ]


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _thumb(group: Group, i: int, max_pixels: int) -> Any:
    """Image ``i`` of ``group`` scaled to fit the thumbnail box; a grey box marked as unreadable when it cannot be
    loaded (the load-time check may have been ``header`` or ``off``)."""
    from PIL import Image, ImageDraw

    try:
        im = load_image(group.samples[i].image, max_pixels)
    except BrokenImageError as err:
        box = Image.new("RGB", (_THUMB, _THUMB), (200, 200, 200))
        ImageDraw.Draw(box).text((6, _THUMB // 2 - 8), err.reason.replace("_", " "), fill="black", font=_font(12))
        return box
    scale = min(_THUMB / im.width, _THUMB / im.height)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)


def _wrap(text: str, font: Any, width_px: int) -> list[str]:
    mean_char = font.getlength(SYSTEM_PROMPT) / len(SYSTEM_PROMPT)  # typical prose: wraps close to the right edge
    chars = max(20, int(0.95 * width_px / max(1.0, mean_char)))
    out: list[str] = []
    for para in text.split("\n"):
        out += textwrap.wrap(para, chars) or [""]
    return out


def contact_sheet(
    groups: Sequence[Group], path: str | Path, *, title: str = "", max_pixels: int = MAX_IMAGE_PIXELS
) -> Path:
    """Write a PNG showing each group: its images with their true values, the user prompt and the true answer.

    The system prompt (the same for every group) is printed once at the top; an image that cannot be loaded (or
    has more than ``max_pixels`` pixels) is shown as a grey box naming the reason.
    """
    from PIL import Image, ImageDraw

    font, bold = _font(13), _font(15)
    line = 17
    blocks = []
    for g in groups:
        thumbs = [_thumb(g, i, max_pixels) for i in range(g.n)]
        prompt = _wrap(user_prompt_text(g.n, g.rule, g.value_range), font, _WIDTH - 2 * _PAD)
        answer = _wrap("true answer: " + truth_json(g.values), font, _WIDTH - 2 * _PAD)
        height = line + _THUMB + line + _PAD + line * (len(prompt) + len(answer)) + 2 * _PAD
        blocks.append((g, thumbs, prompt, answer, height))
    header = _wrap(f"{title}\nsystem: {SYSTEM_PROMPT}".strip(), font, _WIDTH - 2 * _PAD)
    total = _PAD + line * len(header) + _PAD + sum(b[4] for b in blocks)
    sheet = Image.new("RGB", (_WIDTH, total), "white")
    draw = ImageDraw.Draw(sheet)
    y = _PAD
    for text in header:
        draw.text((_PAD, y), text, fill="black", font=font)
        y += line
    y += _PAD
    for g, thumbs, prompt, answer, height in blocks:
        draw.line([(0, y), (_WIDTH, y)], fill=(160, 160, 160), width=2)
        where = f", category {g.category}" if g.category else ""
        draw.text((_PAD, y + 4), f"N = {g.n}{where}   key: {', '.join(g.key)}"[:170], fill="black", font=bold)
        ty = y + line + 6
        for i, im in enumerate(thumbs):
            x = _PAD + i * (_THUMB + _PAD + 24)
            top = ty + (_THUMB - im.height) // 2
            sheet.paste(im, (x, top))
            draw.rectangle((x - 1, top - 1, x + im.width, top + im.height), outline=(150, 150, 150))
            draw.text((x, ty + _THUMB + 2), f"Image {i + 1}: {g.values[i]:g}", fill=(0, 0, 160), font=font)
        ty += _THUMB + line + _PAD
        for text in prompt:
            draw.text((_PAD, ty), text, fill=(60, 60, 60), font=font)
            ty += line
        for text in answer:
            draw.text((_PAD, ty), text, fill=(0, 110, 0), font=font)
            ty += line
        y += height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
