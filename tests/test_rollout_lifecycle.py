"""``rarl_fast.rollout.awake``, the one place the trainer drives an engine, on the HF engine (CPU)."""

from __future__ import annotations

import torch
from PIL import Image

from rarl_fast.model import load_model, load_processor
from rarl_fast.rollout import GenerationParams, awake, make_engine
from tests.helpers.rollout_batch import prompt_batch


def test_awake_pushes_only_for_a_new_policy_version(tiny_vlm_dir):
    processor = load_processor(tiny_vlm_dir)
    model = load_model(tiny_vlm_dir, local_files_only=True)
    enc = prompt_batch(processor, [[Image.new("RGB", (56, 56), (9, 99, 199))]], [("a",)])
    engine = make_engine("hf", model=model, tokenizer=processor.tokenizer, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    events: list[str] = []
    for name in ("wake", "sleep", "update_weights"):
        method = getattr(engine, name)
        setattr(engine, name, lambda *a, _m=method, _n=name: (events.append(_n), _m(*a))[1])

    def weights():
        events.append("weights")
        return model.named_parameters()

    params = GenerationParams(max_new_tokens=4, seed=1)
    outs = []
    for version in (("stage1", 0), ("stage1", 0), ("stage1", 1), None, None):
        with awake(engine, version=version, weights=weights):
            events.append("generate")
            outs.append(engine.generate(enc, 2, params).completion_ids)
    push = ["weights", "update_weights"]
    assert events == [
        *["wake", *push, "generate", "sleep"],
        *["wake", "generate", "sleep"],  # same version: no push
        *["wake", *push, "generate", "sleep"],
        *["wake", *push, "generate", "sleep"],  # unknown version: always pushed
        *["wake", *push, "generate", "sleep"],
    ]
    # the HF engine shares the policy's parameters: the push copies nothing and changes no sample
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(o, outs[0]) for o in outs)
