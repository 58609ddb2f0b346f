"""A tiny random-weight causal LM checkpoint and a reward for the trainer drop-in tests (TRL)."""

from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = ["What is 1 + 2?", "Name a colour.", "Count to three.", "Say hello."]


def distinct_characters(completions, **kwargs) -> list[float]:
    """Reward: distinct characters in the completion (text, or conversational messages); varies within a group, so
    advantages are non-zero."""
    texts = [c if isinstance(c, str) else "".join(str(m["content"]) for m in c) for c in completions]
    return [float(len(set(t))) for t in texts]


def save_tiny_lm(out: Path, **config_extra) -> Path:
    """A tiny random-weight Qwen2 causal LM with the offline tiny tokenizer, saved as a checkpoint folder (TRL
    loads the reference model from the policy's path); `config_extra` goes into its config (e.g. the logit soft cap
    and scale that TRL's fused lm-head reads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rarl_fast.model import _tiny_tokenizer

    tok = _tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=-(-len(tok) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        **config_extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
