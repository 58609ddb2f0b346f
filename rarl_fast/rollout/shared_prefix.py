"""Shared-prefix (cascade) decoding for G samples per prompt: the prompt's KV cache is kept ONCE per prompt.

``DynamicCache.batch_repeat_interleave(G)`` followed by ordinary attention copies every prompt's keys and values
G times, grows the copy with ``torch.cat`` at every step, and (with a padding mask) expands the KV heads to the
query heads once more inside attention; with image prompts of ~1k tokens that memory traffic is most of a
decode step. Here the G queries of a prompt attend to its prefix in one batched matmul over the prompt's own KV
([B, kv_heads, P, d]), the completion tokens' KV lives in a preallocated buffer of all T steps written in place
([B * G, kv_heads, T, d], slots not yet written masked), and one softmax runs over the concatenated
[prefix | suffix] scores, so the result is exactly ordinary attention over ``prefix + suffix`` (no log-sum-exp
approximation). Plain torch ops: the same code runs on CPU and CUDA.

Every shape of a decode step is fixed for a bucket (:mod:`rarl_fast.rollout.decode`): the step takes its
position as a tensor, samples inside, and writes its outputs in place, so ``torch.compile`` compiles it once
and, on GPU, ``reduce-overhead`` replays it as a CUDA graph instead of launching each kernel from Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rarl_fast.config import RolloutCompile
from rarl_fast.rollout.decode import (
    Arena,
    DecodeOutputs,
    DecodeRows,
    TokenRule,
    length_bucket,
    row_bucket,
    sample_and_record,
)

__all__ = [
    "COMPILE_MODES",
    "SharedKV",
    "SharedPrefixDecoder",
    "compile_step",
    "shared_prefix_attention",
    "shared_prefix_attention_ref",
    "shared_prefix_step",
    "text_parts",
]


def shared_prefix_attention(
    q: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_bias: Tensor,
    suffix_k: Tensor,
    suffix_v: Tensor,
    suffix_bias: Tensor,
    scaling: float,
) -> Tensor:
    """One decode step of attention for G samples per prompt over a shared prefix and per-sample suffixes.

    Args:
        q: [B, G, kv_heads, n_rep, d] queries of the B * G rows (prompt-major), query head ``h = i * n_rep + j``
            served by KV head ``i`` (transformers' ``repeat_kv`` order).
        prefix_k, prefix_v: [B, kv_heads, P, d] the prompts' keys / values.
        prefix_bias: [B, 1, 1, P] additive float mask, 0 on real prompt tokens, a large negative on padding.
        suffix_k, suffix_v: [B, G, kv_heads, S, d] each row's completion key / value slots.
        suffix_bias: [S] additive float mask, 0 on the slots written so far, a large negative on the others
            (their contents may be anything finite).
        scaling: softmax scale (``head_dim ** -0.5``).
    Returns:
        [B * G, kv_heads * n_rep * d] attention output, heads concatenated as ``o_proj`` expects.
    """
    B, G, kvh, n_rep, d = q.shape
    P, S = prefix_k.shape[-2], suffix_k.shape[-2]
    qs = q * scaling
    scores_p = qs.permute(0, 2, 1, 3, 4).reshape(B, kvh, G * n_rep, d) @ prefix_k.transpose(-1, -2) + prefix_bias
    scores_s = (qs @ suffix_k.transpose(-1, -2) + suffix_bias).permute(0, 2, 1, 3, 4).reshape(B, kvh, G * n_rep, S)
    probs = torch.cat([scores_p, scores_s], dim=-1).float().softmax(dim=-1).to(q.dtype)
    out_p = (probs[..., :P] @ prefix_v).reshape(B, kvh, G, n_rep, d).permute(0, 2, 1, 3, 4)
    out_s = probs[..., P:].reshape(B, kvh, G, n_rep, S).permute(0, 2, 1, 3, 4) @ suffix_v
    return (out_p + out_s).reshape(B * G, kvh * n_rep * d)


def shared_prefix_attention_ref(
    q: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_bias: Tensor,
    suffix_k: Tensor,
    suffix_v: Tensor,
    suffix_bias: Tensor,
    scaling: float,
) -> Tensor:
    """:func:`shared_prefix_attention` the ordinary way (prefix copied G times, heads expanded, torch SDPA), for
    tests."""
    B, G, kvh, n_rep, d = q.shape
    S = suffix_k.shape[-2]
    k = torch.cat([prefix_k.repeat_interleave(G, 0), suffix_k.reshape(B * G, kvh, S, d)], dim=2)
    v = torch.cat([prefix_v.repeat_interleave(G, 0), suffix_v.reshape(B * G, kvh, S, d)], dim=2)
    bias = torch.cat([prefix_bias.repeat_interleave(G, 0), suffix_bias.expand(B * G, 1, 1, S)], dim=-1)
    out = F.scaled_dot_product_attention(
        q.reshape(B * G, kvh * n_rep, 1, d),
        k.repeat_interleave(n_rep, 1),
        v.repeat_interleave(n_rep, 1),
        attn_mask=bias,
        scale=scaling,
    )
    return out.reshape(B * G, kvh * n_rep * d)


def text_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(text decoder, lm_head) of a transformers Qwen2-style VLM if the shared-prefix decoder supports it, else
    None (the caller then decodes through the model's own forward): full attention in every layer, the usual
    decoder-layer modules."""
    text = getattr(getattr(model, "model", None), "language_model", None)
    lm_head = getattr(model, "lm_head", None)
    if text is None or lm_head is None:
        return None
    cfg = text.config
    if any(kind != "full_attention" for kind in getattr(cfg, "layer_types", None) or ["full_attention"]):
        return None
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    layer_needed = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    attn_needed = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
    if not all(hasattr(text, n) for n in needed) or not all(
        all(hasattr(layer, n) for n in layer_needed) and all(hasattr(layer.self_attn, n) for n in attn_needed)
        for layer in text.layers
    ):
        return None
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("mrope_section") and not hasattr(text.rotary_emb, "recomposition_frequencies"):
        return None  # transformers versions that split mRoPE sections inside attention: not reproduced here
    return text, lm_head


class SharedKV(NamedTuple):
    """The decode KV buffers of a bucket of B_b prompts x G_b samples (S = B_b * G_b slots)."""

    prefix: tuple[tuple[Tensor, Tensor], ...]  # per layer: keys, values [B_b, kv_heads, P_b, d] of the prompts
    prefix_bias: Tensor  # [B_b, 1, 1, P_b] 0 on real prompt tokens, a large negative on padding
    suffix: tuple[tuple[Tensor, Tensor], ...]  # per layer: keys, values [S, kv_heads, T, d] of the completions


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x [S, heads, 1, d] (the rotate-half convention of Qwen2 / Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def shared_prefix_step(
    text: nn.Module,
    lm_head: nn.Module,
    kv: SharedKV,
    rows: DecodeRows,
    out: DecodeOutputs,
    clock: Tensor,
    rule: TokenRule,
    stop_ids: Tensor,
    cut_ids: Tensor,
) -> None:
    """Feed each slot's last token as its completion token ``clock`` ([1] long), sample and record token
    ``clock + 1``, and advance the clock: everything in place, static shapes, no host sync (so it compiles once
    per bucket and replays as a CUDA graph).

    The text model's own modules run (norms, projections, MLP, rotary embedding, ``lm_head``), so patched
    modules (Liger) and forward hooks still apply; only the attention and the cache are ours.
    """
    S = rows.last.shape[0]
    B = kv.prefix_bias.shape[0]
    G = S // B
    kvh, T, d = kv.suffix[0][0].shape[1:]
    h = text.embed_tokens(rows.last).unsqueeze(1)  # [S, 1, H]
    # All three mRoPE axes of a completion token hold the same position.
    cos, sin = text.rotary_emb(h, (rows.pos0 + clock).view(1, S, 1))  # [S, 1, d] each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    written = torch.arange(T, device=clock.device) <= clock
    suffix_bias = torch.where(written, 0.0, torch.finfo(kv.prefix_bias.dtype).min).to(kv.prefix_bias.dtype)
    for layer, (pk, pv), (sk, sv) in zip(text.layers, kv.prefix, kv.suffix, strict=True):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = _rotate(attn.q_proj(x).view(S, -1, 1, d), cos, sin)
        k = _rotate(attn.k_proj(x).view(S, kvh, 1, d), cos, sin)
        sk.index_copy_(2, clock, k.to(sk.dtype))
        sv.index_copy_(2, clock, attn.v_proj(x).view(S, kvh, 1, d).to(sv.dtype))
        o = shared_prefix_attention(
            q.view(B, G, kvh, -1, d),
            pk,
            pv,
            kv.prefix_bias,
            sk.view(B, G, kvh, T, d),
            sv.view(B, G, kvh, T, d),
            suffix_bias,
            attn.scaling,
        )
        h = h + attn.o_proj(o.unsqueeze(1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = lm_head(text.norm(h))[:, -1]
    sample_and_record(logits, rows, out, rule, stop_ids, cut_ids, clock + 1)
    clock.add_(1)


COMPILE_MODES: tuple[str, ...] = get_args(RolloutCompile)


def compile_step(mode: RolloutCompile) -> Callable[..., None]:
    """:func:`shared_prefix_step`, eager (``off``) or through ``torch.compile`` (``default``; ``reduce-overhead``
    also replays it as CUDA graphs on GPU, one per bucket shape). The step's buffers are marked as static
    addresses (:class:`~rarl_fast.rollout.decode.Arena`), so in-place KV writes do not prevent CUDA graphs."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown rollout.compile mode {mode!r}: expected one of {COMPILE_MODES}")
    if mode == "off":
        return shared_prefix_step
    compiled = torch.compile(shared_prefix_step, mode=None if mode == "default" else mode)
    if mode == "default":
        return compiled

    def graphed_step(*args: Any) -> None:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the step returns nothing the next one overwrites
        compiled(*args)

    return graphed_step


def _mark_dynamic(kv: SharedKV, rows: DecodeRows, out: DecodeOutputs) -> None:
    """Let ``torch.compile`` treat the slot, prompt, prompt-length and step dims as dynamic from the first call,
    so that one compile serves every bucket and batch (CUDA graphs are still recorded per shape)."""
    mark = torch._dynamo.maybe_mark_dynamic
    for t in (x for layer in kv.prefix + kv.suffix for x in layer):
        mark(t, 0)
        mark(t, 2)
    mark(kv.prefix_bias, 0)
    mark(kv.prefix_bias, 3)
    for t in (*rows, *out):
        for dim in range(t.dim()):
            mark(t, dim)


class SharedPrefixDecoder:
    """Decode steps for B prompts x G samples over the prompts' pre-filled KV cache, kept once per prompt.

    The pre-fill's keys and values are copied once into a prefix buffer padded to :func:`length_bucket` (never
    G times); the completions' keys and values go to per-slot buffers of all T steps, written in place. Every
    buffer comes from ``arena``. ``compact`` moves the live rows to a smaller bucket (:func:`row_bucket`) when
    that at least halves the slots.
    """

    def __init__(
        self,
        text: nn.Module,
        lm_head: nn.Module,
        step: Callable[..., None],
        arena: Arena,
        prefill_cache: Any,
        prompt_mask: Tensor,
        rows: DecodeRows,
        out: DecodeOutputs,
        rule: TokenRule,
        stop_ids: Tensor,
        cut_ids: Tensor,
    ):
        """
        Args:
            text, lm_head: from :func:`text_parts`; step: from :func:`compile_step`.
            prefill_cache: the pre-fill's ``DynamicCache`` (keys / values [B, kv_heads, P, d] per layer).
            prompt_mask: [B, P] 1 on real prompt tokens (left padding).
            rows: the B * G rows after their first token (prompt-major); out: where they record.
            stop_ids, cut_ids: [n] long EOS ids and vision special-token ids (see :func:`sample_and_record`).
        """
        self.text, self.lm_head, self._step, self.arena = text, lm_head, step, arena
        self.out, self.rule, self.stop_ids, self.cut_ids = out, rule, stop_ids, cut_ids
        B, P = prompt_mask.shape
        self.full = (B, rows.last.shape[0] // B)  # (B, G): the largest bucket
        self.bucket = self.full
        self.scratch_row = out.valid.shape[0] - 1
        layers = [(layer.keys, layer.values) for layer in prefill_cache.layers]
        k0 = layers[0][0]
        dtype, kvh, d = k0.dtype, k0.shape[1], k0.shape[3]
        T = out.valid.shape[1]
        Pb = length_bucket(P)

        def prefix_buffer(name: str, src: Tensor) -> Tensor:
            buf = arena.take(name, (B, kvh, Pb, d), dtype, k0.device)
            buf[:, :, :P].copy_(src)
            buf[:, :, P:].zero_()  # masked, but must be finite: 0 * NaN would leak into the output
            return buf

        prefix = tuple(
            (prefix_buffer(f"prefix.k{i}", k), prefix_buffer(f"prefix.v{i}", v)) for i, (k, v) in enumerate(layers)
        )
        bias = arena.take("prefix.bias", (B, 1, 1, Pb), dtype, k0.device)
        bias.fill_(torch.finfo(dtype).min)[:, 0, 0, :P].masked_fill_(prompt_mask.bool(), 0.0)
        S = rows.last.shape[0]
        suffix = tuple(
            tuple(arena.take(f"suffix.{n}{i}", (S, kvh, T, d), dtype, k0.device).zero_() for n in "kv")
            for i in range(len(layers))
        )
        self.kv = SharedKV(prefix, bias, suffix)
        self.rows = rows
        self.clock = arena.take("clock", (1,), torch.long, k0.device).zero_()
        _mark_dynamic(self.kv, rows, out)

    def advance(self) -> None:
        """One decode step (feeds the last tokens, samples and records the next ones)."""
        self._step(
            self.text, self.lm_head, self.kv, self.rows, self.out, self.clock, self.rule, self.stop_ids, self.cut_ids
        )

    def compact(self) -> None:
        """Move the live rows into the smallest bucket that holds them when that at least halves the slots
        (host sync: the live counts)."""
        Bb, Gb = self.bucket
        live = (~self.rows.finished).view(Bb, Gb).tolist()  # host sync: bucket choice
        prompts = [b for b in range(Bb) if any(live[b])]
        if not prompts:
            return
        nb = row_bucket(len(prompts), self.full[0])
        ng = row_bucket(max(sum(r) for r in live), self.full[1])
        if 2 * nb * ng > Bb * Gb:
            return
        kept = prompts + [prompts[0]] * (nb - len(prompts))  # filler prompts repeat a live one (finite values)
        src, filler = [], []
        for i, b in enumerate(kept):
            slots = [b * Gb + j for j in range(Gb) if live[b][j]] if i < len(prompts) else []
            src += slots + [b * Gb] * (ng - len(slots))
            filler += [False] * len(slots) + [True] * (ng - len(slots))
        device = self.clock.device
        kept_t = torch.tensor(kept, device=device)
        src_t = torch.tensor(src, device=device)
        filler_t = torch.tensor(filler, device=device)

        def moved(name: str, old: Tensor, index: Tensor) -> Tensor:
            gathered = old.index_select(0, index)  # a copy: the new view shares the old one's storage
            return self.arena.take(name, tuple(gathered.shape), gathered.dtype, device).copy_(gathered)

        def moved_layers(name: str, layers: tuple[tuple[Tensor, Tensor], ...], index: Tensor) -> Any:
            return tuple(
                (moved(f"{name}.k{i}", k, index), moved(f"{name}.v{i}", v, index)) for i, (k, v) in enumerate(layers)
            )

        prefix = moved_layers("prefix", self.kv.prefix, kept_t)
        bias = moved("prefix.bias", self.kv.prefix_bias, kept_t)
        suffix = moved_layers("suffix", self.kv.suffix, src_t)
        rows = DecodeRows(*(moved(f"rows.{f}", getattr(self.rows, f), src_t) for f in DecodeRows._fields))
        rows.finished.logical_or_(filler_t)
        rows.out_row.masked_fill_(filler_t, self.scratch_row)
        self.kv, self.rows, self.bucket = SharedKV(prefix, bias, suffix), rows, (nb, ng)
        _mark_dynamic(self.kv, rows, self.out)
