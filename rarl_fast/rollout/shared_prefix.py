"""Shared-prefix (cascade) decoding for G samples per prompt: the prompt's KV cache is kept ONCE per prompt.

``DynamicCache.batch_repeat_interleave(G)`` followed by ordinary attention copies every prompt's keys and values
G times, grows the copy with ``torch.cat`` at every step, and (with a padding mask) expands the KV heads to the
query heads once more inside attention; with image prompts of ~1k tokens that memory traffic is most of a
decode step. Here the G queries of a prompt attend to its prefix in one batched matmul over the prompt's own KV
([B, kv_heads, P, d]), the completion tokens' KV lives in a preallocated buffer written in place
([B, kv_heads, G, T, d]), and one softmax runs over the concatenated [prefix | suffix] scores, so the result is
exactly ordinary attention over ``prefix + suffix`` (no log-sum-exp approximation). Plain torch ops: the same
code runs on CPU and CUDA.

The decode step calls the text model's own modules (norms, projections, MLP, rotary embedding, ``lm_head``),
so patched modules (Liger) and forward hooks still apply; only the attention and the cache are ours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["SharedPrefixDecoder", "shared_prefix_attention", "shared_prefix_attention_ref", "text_parts"]


def shared_prefix_attention(
    q: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_bias: Tensor,
    suffix_k: Tensor,
    suffix_v: Tensor,
    scaling: float,
) -> Tensor:
    """One decode step of attention for G samples per prompt over a shared prefix and per-sample suffixes.

    Args:
        q: [B, G, kv_heads, n_rep, d] queries of the B * G rows (prompt-major), query head ``h = i * n_rep + j``
            served by KV head ``i`` (transformers' ``repeat_kv`` order).
        prefix_k, prefix_v: [B, kv_heads, P, d] the prompts' keys / values.
        prefix_bias: [B, 1, 1, P] additive float mask, 0 on real prompt tokens, a large negative on padding.
        suffix_k, suffix_v: [B, kv_heads, G, S, d] each row's completion keys / values so far (S >= 1).
        scaling: softmax scale (``head_dim ** -0.5``).
    Returns:
        [B * G, kv_heads * n_rep * d] attention output, heads concatenated as ``o_proj`` expects.
    """
    B, G, kvh, n_rep, d = q.shape
    S = suffix_k.shape[-2]
    qs = (q * scaling).permute(0, 2, 1, 3, 4)  # [B, kvh, G, n_rep, d]
    scores_p = qs.reshape(B, kvh, G * n_rep, d) @ prefix_k.transpose(-1, -2) + prefix_bias
    scores_s = (qs @ suffix_k.transpose(-1, -2)).reshape(B, kvh, G * n_rep, S)
    probs = torch.cat([scores_p, scores_s], dim=-1).float().softmax(dim=-1).to(q.dtype)
    P = prefix_k.shape[-2]
    out = probs[..., :P] @ prefix_v + (probs[..., P:].reshape(B, kvh, G, n_rep, S) @ suffix_v).reshape(
        B, kvh, G * n_rep, d
    )
    return out.reshape(B, kvh, G, n_rep, d).permute(0, 2, 1, 3, 4).reshape(B * G, kvh * n_rep * d)


def shared_prefix_attention_ref(
    q: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_bias: Tensor,
    suffix_k: Tensor,
    suffix_v: Tensor,
    scaling: float,
) -> Tensor:
    """:func:`shared_prefix_attention` the ordinary way (prefix copied G times, heads expanded, torch SDPA), for
    tests."""
    B, G, kvh, n_rep, d = q.shape
    S = suffix_k.shape[-2]
    k = torch.cat([prefix_k.repeat_interleave(G, 0), suffix_k.transpose(1, 2).reshape(B * G, kvh, S, d)], dim=2)
    v = torch.cat([prefix_v.repeat_interleave(G, 0), suffix_v.transpose(1, 2).reshape(B * G, kvh, S, d)], dim=2)
    bias = torch.cat([prefix_bias.repeat_interleave(G, 0), prefix_bias.new_zeros(B * G, 1, 1, S)], dim=-1)
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


class SharedPrefixDecoder:
    """Decode steps for B prompts x G samples over the prompts' pre-filled KV cache, kept once per prompt.

    Built from the pre-fill's cache (``DynamicCache`` of B rows, left-padded prompts): its per-layer keys and
    values are used in place, never copied G times. ``step`` feeds one token per row and returns the next
    logits; rows are prompt-major (``r = b * G + j``).
    """

    def __init__(
        self,
        text: nn.Module,
        lm_head: nn.Module,
        prefill_cache: Any,
        prompt_mask: Tensor,
        positions: Tensor,
        num_generations: int,
    ):
        """
        Args:
            text, lm_head: from :func:`text_parts`.
            prefill_cache: the pre-fill's ``DynamicCache`` (keys / values [B, kv_heads, P, d] per layer).
            prompt_mask: [B, P] 1 on real prompt tokens.
            positions: [3, B * G, T] mRoPE positions of the T completion tokens of each row.
            num_generations: G.
        """
        self.text, self.lm_head = text, lm_head
        self.G = num_generations
        layers = prefill_cache.layers
        self.prefix = [(layer.keys, layer.values) for layer in layers]
        k0 = self.prefix[0][0]
        B, kvh, _, d = k0.shape
        self.B, self.kvh, self.d = B, kvh, d
        T = positions.shape[-1]
        self.suffix = [
            (k0.new_empty(B, kvh, self.G, T, d), k0.new_empty(B, kvh, self.G, T, d)) for _ in range(len(layers))
        ]
        neg = torch.finfo(k0.dtype).min
        self.prefix_bias = torch.where(prompt_mask.bool(), 0.0, neg).to(k0.dtype).view(B, 1, 1, -1)
        cos, sin = text.rotary_emb(k0, positions)  # [R, T, d] each, all steps at once (k0: dtype and device)
        self.cos, self.sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [R, 1, T, d]

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotary embedding of x [R, heads, 1, d] (the rotate-half convention of Qwen2 / Llama)."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def step(self, tokens: Tensor, t: int) -> Tensor:
        """Logits [B * G, V] after feeding ``tokens`` [B * G] as completion token ``t`` (0-based) of each row."""
        B, G, kvh, d = self.B, self.G, self.kvh, self.d
        R = B * G
        cos, sin = self.cos[:, :, t : t + 1], self.sin[:, :, t : t + 1]
        h = self.text.embed_tokens(tokens).unsqueeze(1)  # [R, 1, H]
        for layer, (pk, pv), (sk, sv) in zip(self.text.layers, self.prefix, self.suffix, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = self._rotate(attn.q_proj(x).view(R, -1, 1, d), cos, sin)
            k = self._rotate(attn.k_proj(x).view(R, kvh, 1, d), cos, sin)
            v = attn.v_proj(x).view(R, kvh, d)
            sk[:, :, :, t] = k.view(B, G, kvh, d).transpose(1, 2)
            sv[:, :, :, t] = v.view(B, G, kvh, d).transpose(1, 2)
            out = shared_prefix_attention(
                q.view(B, G, kvh, -1, d),
                pk,
                pv,
                self.prefix_bias,
                sk[:, :, :, : t + 1],
                sv[:, :, :, : t + 1],
                attn.scaling,
            )
            h = h + attn.o_proj(out.unsqueeze(1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.text.norm(h))[:, -1]
