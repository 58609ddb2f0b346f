"""The state of a decode loop with static shapes: row slots, recorded outputs, and the rule that turns next-token
logits into recorded tokens, so that one decode step (the model's forward for one token, sampling, bookkeeping)
runs without host syncs and can be compiled once per batch bucket (and CUDA-graphed).

Rows live in *slots*: a bucket of ``B_b`` prompts x ``G_b`` samples. A slot holds a completion row or is a
filler (finished from the start, writing to a scratch output row); fillers keep the shapes of a bucket while
rows finish, and the loop moves the live rows to a smaller bucket when that at least halves the slots
(:func:`row_bucket`). Every buffer is a view of an :class:`Arena` that outlives one ``generate`` call, so a
compiled step sees the same addresses call after call (CUDA graphs replay instead of re-recording).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rarl_fast.rollout.sampling import hashed_uniforms, sample_next

__all__ = [
    "Arena",
    "DecodeOutputs",
    "DecodeRows",
    "TokenRule",
    "length_bucket",
    "new_outputs",
    "new_rows",
    "row_bucket",
    "sample_and_record",
]


class DecodeRows(NamedTuple):
    """Per slot of the decode batch; S slots, prompt-major (slot ``b * G_b + j``)."""

    last: Tensor  # [S] long, the token fed at the next step
    pos0: Tensor  # [S] long, position of the row's first completion token (all three mRoPE axes)
    seeds: Tensor  # [S] long, counter-based sampling seed of the row
    greedy: Tensor  # [S] bool, argmax instead of sampling (a tensor: greedy and sampled calls share a compile)
    finished: Tensor  # [S] bool, EOS emitted, vision token cut, or a filler slot
    out_row: Tensor  # [S] long, row of :class:`DecodeOutputs` the slot records into (R for fillers: scratch)


class DecodeOutputs(NamedTuple):
    """What the loop records: R completion rows plus one scratch row that fillers write to, T steps."""

    tokens: Tensor  # [R + 1, T] long, the pad id after a row's end
    logp: Tensor  # [R + 1, T] float32, log p(token) under logits / temperature; 0 after a row's end
    valid: Tensor  # [R + 1, T] bool, generated tokens up to and including EOS
    cut: Tensor  # [R + 1] bool, the row emitted a vision special token (cut there, not kept)
    ended_at: Tensor  # [R + 1] long, step at which the row finished (T if it never did)


@dataclass(frozen=True)
class TokenRule:
    """The constants of a decode step (a compiled step specializes on them)."""

    temperature: float
    top_k: int
    top_p: float
    pad_id: int


def _is_any(tokens: Tensor, ids: Tensor) -> Tensor:
    """[S] bool, ``tokens[s] in ids`` (``ids`` [n >= 1] long; a comparison, no ``isin`` kernel: compiles)."""
    return (tokens.unsqueeze(1) == ids.unsqueeze(0)).any(dim=1)


def sample_and_record(
    logits: Tensor,
    rows: DecodeRows,
    out: DecodeOutputs,
    rule: TokenRule,
    stop_ids: Tensor,
    cut_ids: Tensor,
    step: Tensor,
) -> None:
    """Sample token ``step`` of every slot from ``logits`` [S, V] and record it; updates ``rows`` and ``out`` in
    place (no host sync).

    A live row keeps its token; an EOS (``stop_ids`` [n] long) is kept as the row's last token; a vision
    special token (``cut_ids`` [m] long) ends the row without being kept. ``step`` is a [1] long tensor.
    """
    tok, lp = sample_next(
        logits,
        temperature=rule.temperature,
        top_k=rule.top_k,
        top_p=rule.top_p,
        greedy=rows.greedy,
        uniforms=hashed_uniforms(rows.seeds, step),
    )
    live = ~rows.finished
    cut = live & _is_any(tok, cut_ids)
    live = live & ~cut
    tok = torch.where(live, tok, rule.pad_id)
    where = (rows.out_row, step.expand_as(rows.out_row))
    out.tokens.index_put_(where, tok)
    out.logp.index_put_(where, torch.where(live, lp, 0.0))
    out.valid.index_put_(where, live)
    ended = cut | (live & _is_any(tok, stop_ids))
    out.cut.index_put_((rows.out_row,), out.cut[rows.out_row] | cut)
    out.ended_at.index_put_((rows.out_row,), torch.where(ended, step, out.ended_at[rows.out_row]))
    rows.finished.logical_or_(ended)
    rows.last.copy_(tok)


def row_bucket(n: int, full: int) -> int:
    """Slots for ``n`` live prompts (or samples per prompt): the smallest power of two >= max(n, 2), at most
    ``full``. A call's buckets are therefore ``full`` and the powers of two from 2 below it; never 1 unless
    ``full`` is (``torch.compile`` specializes sizes 0 and 1, so a bucket of one would compile anew)."""
    return min(full, 1 << max(n - 1, 1).bit_length())


def length_bucket(n: int) -> int:
    """``n`` (a prompt length) rounded up on a ladder of four steps per octave (16, 20, 24, 28, 32, 40, ...,
    1024, 1280, ...): at most 25% padding, and few distinct shapes (CUDA graphs are recorded per shape)."""
    if n <= 16:
        return 16
    step = 1 << (math.floor(math.log2(n - 1)) - 2)
    return -(-n // step) * step


class Arena:
    """Named flat buffers handed out as views from offset 0 and kept between ``generate`` calls: a compiled
    decode step then reads and writes the same addresses every call, which CUDA graphs require (a new address
    would re-record the graph). A buffer grows when a larger batch needs it; ``clear`` releases all."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A ``shape`` view of buffer ``name`` (contents undefined; a view of the same buffer as any other
        ``take`` of that name)."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        view = buf[:numel].view(shape)
        torch._dynamo.mark_static_address(view)
        return view

    def clear(self) -> None:
        self._buffers.clear()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def new_outputs(arena: Arena, num_rows: int, steps: int, pad_id: int, device: torch.device) -> DecodeOutputs:
    """Empty outputs for ``num_rows`` rows (plus the scratch row) of ``steps`` tokens."""
    shape = (num_rows + 1, steps)
    return DecodeOutputs(
        tokens=arena.take("out.tokens", shape, torch.long, device).fill_(pad_id),
        logp=arena.take("out.logp", shape, torch.float32, device).zero_(),
        valid=arena.take("out.valid", shape, torch.bool, device).zero_(),
        cut=arena.take("out.cut", (num_rows + 1,), torch.bool, device).zero_(),
        ended_at=arena.take("out.ended_at", (num_rows + 1,), torch.long, device).fill_(steps),
    )


def new_rows(arena: Arena, seeds: Tensor, pos0: Tensor, greedy: bool) -> DecodeRows:
    """Slots for R rows before their first token: ``seeds`` [R] long, ``pos0`` [R] long."""
    S, device = seeds.shape[0], seeds.device

    def take(field: str, dtype: torch.dtype) -> Tensor:
        return arena.take(f"rows.{field}", (S,), dtype, device)

    return DecodeRows(
        last=take("last", torch.long).zero_(),
        pos0=take("pos0", torch.long).copy_(pos0),
        seeds=take("seeds", torch.long).copy_(seeds),
        greedy=take("greedy", torch.bool).fill_(greedy),
        finished=take("finished", torch.bool).zero_(),
        out_row=take("out_row", torch.long).copy_(torch.arange(S, device=device)),
    )
