"""The update of a RARL step at Qwen2.5-VL-3B's geometry with reduced widths and the real vocabulary (151936):
no tensor of N x V / 4 elements or more is created (N completion tokens), i.e. the [N, V] logits never exist.

Geometry kept from the 3B model: vocabulary 151936 with tied embeddings, 14-px patches merged 2x2, window
attention (112-px windows, crossed by the 224-px images) and a full-attention block, B = 2 prompts with 1 and 4
images, G = 2 samples each. The update is what `train.update_policy` runs on one micro-batch: reference
log-probs, the policy's fused loss, backward, gradient clipping, an AdamW step. The same update with
`impl="torch"` (materialized logits) must trip the bound, so the bound is known to catch the logits.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from rarl_fast.config_loader import config_from_dict
from rarl_fast.model import load_model, load_processor, make_tiny_vlm
from rarl_fast.policy import LossSettings, PolicyModule, StepCounts
from rarl_fast.rollout import GenerationParams, HFEngine
from rarl_kernels import _utils
from rarl_kernels.testing import LargestTensorMode
from tests.helpers.rollout_batch import prompt_batch

V, NEW_TOKENS, G, PX = 151936, 48, 2, 224


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    """The policy, its optimizer and one rollout batch (EOS ignored: every completion has NEW_TOKENS tokens)."""
    model_dir = make_tiny_vlm(
        tmp_path_factory.mktemp("vocab151936") / "m",
        hidden_size=32, num_layers=1, vocab_size=V, vision_depth=2, vision_hidden_size=64,
        min_pixels=PX * PX, max_pixels=PX * PX,
        text_overrides=dict(tie_word_embeddings=True, intermediate_size=64),
        vision_overrides=dict(window_size=112, fullatt_block_indexes=[1]),
    )  # fmt: skip
    model = load_model(model_dir, local_files_only=True)
    assert model.config.tie_word_embeddings and model.config.vision_config.patch_size == 14
    processor = load_processor(model_dir)
    images = [Image.new("RGB", (PX, PX), (30 * i, 200 - 40 * i, 90)) for i in range(4)]
    enc = prompt_batch(processor, [images[:1], images], [("a", "1"), ("b", "4")])
    engine = HFEngine(model, processor.tokenizer, eos_token_ids=[])
    ro = engine.generate(enc, G, GenerationParams(max_new_tokens=NEW_TOKENS, seed=0))
    return model, ro


def run_update(model, ro, impl: str | None) -> tuple[int, str, int]:
    """One update under the dispatch mode: (largest tensor created, the op that created it, N)."""
    policy = PolicyModule(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    n_tokens = int(ro.completion_mask.sum())
    counts = StepCounts(tokens=n_tokens, rows=ro.num_rows)
    cfg = config_from_dict({"rollout": {"max_new_tokens": NEW_TOKENS}})
    settings = replace(LossSettings.from_config(cfg), impl=impl)
    adv = torch.linspace(-1.0, 1.0, ro.num_rows)
    with LargestTensorMode() as mode:
        with torch.no_grad():
            logp_ref = policy(ro, mode="logprobs", impl=impl)
        loss, _ = policy(ro, mode="loss", advantages=adv, logp_ref=logp_ref, settings=settings, counts=counts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return mode.largest, mode.largest_op, n_tokens


def test_update_never_creates_a_logits_sized_tensor(step, monkeypatch):
    model, ro = step
    # The work buffer is bounded in bytes (64 MiB on a CPU, more than this small update's logits): give it an
    # eighth of the [N, V] fp32 logits, as a long completion batch would, to see that the update chunks the pass.
    monkeypatch.setitem(_utils.DEFAULT_CHUNK_BYTES, "cpu", 2 * G * NEW_TOKENS * V * 4 // 8)
    largest, op, n_tokens = run_update(model, ro, impl=None)
    assert n_tokens == 2 * G * NEW_TOKENS
    bound = n_tokens * V // 4
    # what must exist stays below the bound: the tied [V, H] embedding's gradient and AdamW moments
    assert model.get_output_embeddings().weight.numel() < bound
    assert largest < bound, f"{op} created {largest} elements >= N x V / 4 = {bound}"


def test_the_bound_catches_materialized_logits(step):
    model, ro = step
    largest, _, n_tokens = run_update(model, ro, impl="torch")
    assert largest >= n_tokens * V
