"""Parse model responses into padded tensors of valid `(image_id, value)` elements (docs/method.md section 2).

Parsing is Python-level and per response (a `str.find` framing check equivalent to the docs/method.md regex,
one or two `json.loads`, one flat loop over at most 64 elements); everything numeric downstream is
vectorized over the batch in `score.py`.
Nothing is ever evaluated as code and no input raises: every failure of the framing or of the JSON
(including `RecursionError` on deep nesting and `MemoryError`) is a failed format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FRAME", "MAX_ELEMENTS", "MAX_RESPONSE_CHARS", "Parsed", "frame_answer", "parse_responses"]

MAX_RESPONSE_CHARS = 8192
"""Longer responses (by Python `len`) fail the format before any regex or JSON work."""
MAX_ELEMENTS = 64
"""A parsed list with more elements (counted before dropping invalid ones) fails the format."""

FRAME = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
"""The framing regex of docs/method.md section 2; `frame_answer` implements it without regex stepping."""
_NUMERIC = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_ID_MAX = 2**62
"""Integer ids outside [1, 2**62] are stored as 0: they can never be in 1..N and must fit int64."""


@dataclass(frozen=True)
class Parsed:
    """Valid elements of B responses, left-aligned in listed order and padded to M = max count.

    Attributes:
        format_ok: [B] bool, framing matched and the answer is a JSON list of at most 64 elements.
        ids: [B, M] int64, image ids of the valid elements (0 in padding and for ids outside [1, 2**62]).
        values: [B, M] float64, their finite values (0 in padding).
        mask: [B, M] bool, True on the first `m_b` columns of row b, where m_b is its valid-element count.
    """

    format_ok: Tensor
    ids: Tensor
    values: Tensor
    mask: Tensor

    @property
    def counts(self) -> Tensor:
        """[B] int64: number of valid elements per response (m in docs/method.md)."""
        return self.mask.sum(dim=1)

    def __len__(self) -> int:
        return self.format_ok.shape[0]


def _loads(answer: str) -> object:
    """`json.loads`, then with every `'` replaced by `"` if that fails; None when both fail."""
    try:
        return json.loads(answer)
    except Exception:
        pass
    try:
        return json.loads(answer.replace("'", '"'))
    except Exception:
        return None


def _unique(text: str, tag: str) -> int:
    """Position of `tag` in `text` if it occurs exactly once, else -1."""
    at = text.find(tag)
    if at < 0 or text.find(tag, at + 1) >= 0:
        return -1
    return at


def _blank(text: str, start: int, stop: int) -> bool:
    """`text[start:stop]` is empty or all whitespace (`str.isspace` agrees with `re`'s `\\s` on str)."""
    return start == stop or text[start:stop].isspace()


def frame_answer(text: str) -> str | None:
    """The answer text (group 2 of `FRAME`) when the framing holds, else None.

    Equivalent to "each of the four tags exactly once and `FRAME.match(text)`" but done with `str.find`:
    with every tag unique, the lazy groups can only end at the one closing tag, so the regex matches
    exactly when the tags are in order and only whitespace surrounds them. This avoids the regex's
    per-character stepping through long reasoning text; a differential test checks the equivalence.
    """
    t0 = _unique(text, "<think>")
    t1 = _unique(text, "</think>")
    a0 = _unique(text, "<answer>")
    a1 = _unique(text, "</answer>")
    if min(t0, t1, a0, a1) < 0 or not (t0 + 7 <= t1 and t1 + 8 <= a0 and a0 + 8 <= a1):
        return None
    if _blank(text, 0, t0) and _blank(text, t1 + 8, a0) and _blank(text, a1 + 9, len(text)):
        return text[a0 + 8 : a1]
    return None


def _append_valid(items: list, ids: list[int], values: list[float]) -> int:
    """Append the valid elements of a parsed list to `ids`/`values` in listed order; return their count.

    Valid: a dict whose `image_id` is an int or an integer-valued float (bool is its own type, so it
    fails `type(...) is int`) and whose `value` is a finite number or a strict numeric string with a
    finite float64 value. Written as one flat loop because it runs for every element of every response.
    """
    count = 0
    numeric = _NUMERIC.fullmatch
    for item in items:
        if type(item) is not dict:
            continue
        i = item.get("image_id")
        t = type(i)
        if t is int:
            i = i if 1 <= i <= _ID_MAX else 0
        elif t is float and i.is_integer():  # NaN and +-inf are not integers
            i = int(i) if 1.0 <= i <= _ID_MAX else 0
        else:
            continue
        v = item.get("value")
        t = type(v)
        if t is int:
            try:
                v = float(v)
            except OverflowError:
                continue
        elif t is str and numeric(v) is not None:
            v = float(v)  # may overflow to inf, rejected below
        elif t is not float:
            continue
        if v - v != 0.0:  # NaN or +-inf
            continue
        ids.append(i)
        values.append(v)
        count += 1
    return count


def _parse_one(text: object, ids: list[int], values: list[float]) -> tuple[bool, int]:
    """Append the valid elements of one response to `ids`/`values`; return (format_ok, count).

    Any exception (there should be none) leaves the lists as they were and fails the format.
    """
    start = len(ids)
    try:
        if type(text) is not str or len(text) > MAX_RESPONSE_CHARS:
            return False, 0
        answer = frame_answer(text)
        if answer is None:
            return False, 0
        items = _loads(answer.strip())
        if type(items) is not list or len(items) > MAX_ELEMENTS:
            return False, 0
        return True, _append_valid(items, ids, values)
    except Exception:
        del ids[start:], values[start:]
        return False, 0


def parse_responses(texts: Sequence[str]) -> Parsed:
    """Parse B responses (docs/method.md section 2) into padded tensors; never raises on any text.

    Args:
        texts: B response strings (decoded completions without special tokens such as EOS).
    Returns:
        `Parsed` with `format_ok [B]`, `ids [B, M]`, `values [B, M]`, `mask [B, M]`, M = max valid count.
    """
    ids: list[int] = []
    values: list[float] = []
    ok: list[bool] = []
    counts: list[int] = []
    for text in texts:
        good, count = _parse_one(text, ids, values)
        ok.append(good)
        counts.append(count)
    n = len(ok)
    width = max(counts, default=0)
    count_t = torch.tensor(counts, dtype=torch.int64)
    mask = torch.arange(width).unsqueeze(0) < count_t.unsqueeze(1)
    ids_pad = torch.zeros(n, width, dtype=torch.int64)
    values_pad = torch.zeros(n, width, dtype=torch.float64)
    ids_pad[mask] = torch.tensor(ids, dtype=torch.int64)
    values_pad[mask] = torch.tensor(values, dtype=torch.float64)
    return Parsed(format_ok=torch.tensor(ok, dtype=torch.bool), ids=ids_pad, values=values_pad, mask=mask)
