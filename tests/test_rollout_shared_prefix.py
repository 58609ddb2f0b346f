"""Shared-prefix decoding: the attention equals ordinary attention, and the engine samples what the plain
transformers decode loop samples."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from rarl_fast.model import load_model, load_processor
from rarl_fast.rollout import GenerationParams, HFEngine
from rarl_fast.rollout.shared_prefix import shared_prefix_attention, shared_prefix_attention_ref, text_parts
from tests.helpers.rollout_batch import prompt_batch


@pytest.mark.parametrize(
    "B, G, kvh, n_rep, d, P, S",
    [(2, 3, 2, 2, 16, 7, 1), (3, 4, 2, 3, 32, 63, 5), (1, 1, 1, 1, 8, 1, 2), (2, 8, 2, 2, 128, 130, 17)],
    ids=["small-first-step", "odd-P", "single", "qwen-head-dim"],
)
def test_attention_matches_ordinary_attention_with_left_padding(B, G, kvh, n_rep, d, P, S):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, G, kvh, n_rep, d, generator=g)
    pk, pv = torch.randn(B, kvh, P, d, generator=g), torch.randn(B, kvh, P, d, generator=g)
    slots = S + 3  # the suffix buffer holds later steps too, not written yet
    sk, sv = torch.randn(B, G, kvh, slots, d, generator=g), torch.randn(B, G, kvh, slots, d, generator=g)
    pad = torch.randint(0, P, (B,), generator=g)  # left padding; a fully padded prefix is covered by S >= 1
    real = torch.arange(P).unsqueeze(0) >= pad.unsqueeze(1)
    neg = torch.finfo(torch.float32).min
    bias = torch.where(real, 0.0, neg).view(B, 1, 1, P)
    pk[~real.unsqueeze(1).expand(-1, kvh, -1)] = 1e3  # padding garbage must not leak in
    sk[..., S:, :], sv[..., S:, :] = 1e3, 1e3  # nor the slots of later steps
    suffix_bias = torch.where(torch.arange(slots) < S, 0.0, neg)
    out = shared_prefix_attention(q, pk, pv, bias, sk, sv, suffix_bias, d**-0.5)
    ref = shared_prefix_attention_ref(q, pk, pv, bias, sk[..., :S, :], sv[..., :S, :], torch.zeros(S), d**-0.5)
    assert out.shape == (B * G, kvh * n_rep * d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def setup(tiny_vlm_dir):
    processor = load_processor(tiny_vlm_dir)
    model = load_model(tiny_vlm_dir, local_files_only=True)
    sizes = [(56, 84), (112, 56), (84, 112)]
    images = [Image.new("RGB", s, (50 * i, 180 - 40 * i, 70)) for i, s in enumerate(sizes)]
    per_prompt = [images[:1], images, images[1:2]]
    enc = prompt_batch(processor, per_prompt, [(f"k{i}",) for i in range(3)])
    return processor, model, enc


def test_tiny_model_takes_the_shared_prefix_path(setup):
    _, model, _ = setup
    assert text_parts(model) is not None
    assert text_parts(torch.nn.Linear(2, 2)) is None
    rotary = model.model.language_model.rotary_emb
    with pytest.MonkeyPatch.context() as mp:  # mRoPE sections applied inside attention (other transformers)
        mp.delattr(type(rotary), "recomposition_frequencies")
        assert text_parts(model) is None


@pytest.mark.parametrize("greedy, temperature, top_p", [(False, 1.0, 1.0), (False, 0.7, 0.9), (True, 1.0, 1.0)])
def test_engine_matches_the_transformers_decode_loop(setup, greedy, temperature, top_p):
    processor, model, enc = setup
    params = GenerationParams(max_new_tokens=20, seed=5, greedy=greedy, temperature=temperature, top_p=top_p)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    fast = HFEngine(model, processor.tokenizer, eos_token_ids=[eos]).generate(enc, 3, params)
    plain = HFEngine(model, processor.tokenizer, eos_token_ids=[eos], shared_prefix_decode=False).generate(
        enc, 3, params
    )
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert torch.equal(fast.completion_mask, plain.completion_mask)
    torch.testing.assert_close(fast.sampling_logp, plain.sampling_logp, atol=1e-5, rtol=0)
