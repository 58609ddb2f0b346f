"""The contract every rollout engine must pass (run here against the HF engine, on CPU)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from rarl_fast.model import load_model, load_processor
from rarl_fast.policy import completion_states, logprobs_ref
from rarl_fast.rollout import GenerationParams, HFEngine, Rollouts, make_engine
from rarl_fast.rollout.base import plan_micro_batches
from rarl_fast.rollout.sampling import filter_logits
from tests.helpers.rollout_batch import prompt_batch

G = 4


@pytest.fixture(scope="module")
def setup(tiny_vlm_dir):
    processor = load_processor(tiny_vlm_dir)
    model = load_model(tiny_vlm_dir, local_files_only=True)
    sizes = [(56, 84), (112, 56), (84, 112), (56, 56)]
    images = [Image.new("RGB", s, (40 * i, 200 - 30 * i, 90)) for i, s in enumerate(sizes)]
    per_prompt = [images[:1], images, images[1:3]]
    enc = prompt_batch(processor, per_prompt, [(f"s{i}", f"t{i}") for i in range(3)])
    return processor, model, enc


def _engine(setup) -> HFEngine:
    processor, model, _ = setup
    engine = make_engine("hf", model=model, tokenizer=processor.tokenizer, seed=0)
    assert isinstance(engine, HFEngine)
    return engine


def _params(**kw) -> GenerationParams:
    return GenerationParams(**{"max_new_tokens": 12, "seed": 3, **kw})


def test_shapes_grouping_and_masks(setup):
    processor, _, enc = setup
    ro = _engine(setup).generate(enc, G, _params())
    B, P = enc["input_ids"].shape
    R = B * G
    assert isinstance(ro, Rollouts) and ro.num_rows == R and ro.num_prompts == B and ro.num_generations == G
    assert ro.prompt_ids.shape == (R, P) and torch.equal(ro.prompt_ids[::G], enc["input_ids"])
    assert torch.equal(ro.prompt_mask, enc["attention_mask"].repeat_interleave(G, 0))
    T = ro.completion_ids.shape[1]
    assert 1 <= T <= 12 and ro.completion_mask.shape == (R, T) and ro.completion_mask.dtype == torch.bool
    assert ro.sampling_logp.shape == (R, T) and ro.sampling_logp.dtype == torch.float32
    assert torch.equal(ro.group_index, torch.arange(B).repeat_interleave(G))
    assert ro.group_keys == [("s0", "t0"), ("s1", "t1"), ("s2", "t2")]
    assert ro.images_per_prompt.tolist() == [1, 4, 2]
    assert ro.pixel_values is enc["pixel_values"] or torch.equal(ro.pixel_values, enc["pixel_values"])
    assert not ro.is_mutated.any()
    # masks are prefixes; padding is the pad id with log-prob 0; real tokens have log-prob <= 0
    m = ro.completion_mask
    assert torch.equal(m, m.cumprod(dim=1).bool())
    assert (ro.completion_ids[~m] == processor.tokenizer.pad_token_id).all()
    assert (ro.sampling_logp[~m] == 0).all() and (ro.sampling_logp[m] <= 0).all()
    assert (ro.completion_lengths() >= 0).all()


class _Bias:
    """Forward hook on lm_head: from the given call on, add a large logit to one token for chosen rows."""

    def __init__(self, token: int, rows: list[int], from_call: int):
        self.token, self.rows, self.from_call, self.calls = token, rows, from_call, 0

    def __call__(self, module, args, out):
        if self.calls >= self.from_call and out.shape[0] > max(self.rows):
            out = out.clone()
            out[self.rows, :, self.token] += 1e4
        self.calls += 1
        return out


def test_eos_and_vision_token_handling(setup):
    processor, model, enc = setup
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad_img = tok.convert_tokens_to_ids("<|image_pad|>")
    eos_rows, cut_rows = [0, 3, 6, 9], [1, 4]
    h1 = model.lm_head.register_forward_hook(_Bias(eos, eos_rows, from_call=2))
    h2 = model.lm_head.register_forward_hook(_Bias(pad_img, cut_rows, from_call=1))
    try:
        ro = _engine(setup).generate(enc, G, _params(max_new_tokens=10))
    finally:
        h1.remove()
        h2.remove()
    lengths = ro.completion_lengths()
    for r in eos_rows:  # EOS sampled at step 2 is kept as the last real token
        if ro.vision_cut[r]:
            continue
        n = int(lengths[r])
        assert ro.completion_ids[r, n - 1] == eos and n <= 3 and not ro.truncated[r]
    for r in cut_rows:  # the vision token at step 1 is cut away, flagged, never kept
        assert ro.vision_cut[r] and int(lengths[r]) <= 1 and not ro.truncated[r]
    assert not torch.isin(ro.completion_ids[ro.completion_mask], torch.tensor([pad_img])).any()
    # a row without EOS and without a cut ran to max_new_tokens and is flagged truncated
    for r in range(ro.num_rows):
        ends_eos = bool(lengths[r]) and int(ro.completion_ids[r, int(lengths[r]) - 1]) in (eos, tok.pad_token_id)
        if not ro.vision_cut[r] and not ends_eos:
            assert ro.truncated[r] and int(lengths[r]) == 10


def test_determinism_under_seed(setup):
    _, _, enc = setup
    a = _engine(setup).generate(enc, G, _params(seed=11))
    b = _engine(setup).generate(enc, G, _params(seed=11))
    c = _engine(setup).generate(enc, G, _params(seed=12))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.sampling_logp, b.sampling_logp)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # the G samples of one prompt differ (they are independent draws, not copies)
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1])


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (0.7, 0.9)])
def test_logprobs_match_policy_rescore(setup, temperature, top_p):
    _, model, enc = setup
    ro = _engine(setup).generate(enc, G, _params(temperature=temperature, top_p=top_p, max_new_tokens=16))
    with torch.no_grad():
        states = completion_states(model, ro)
        rescored = logprobs_ref(states, model.lm_head, temperature)
    assert states.hidden.shape[:2] == ro.completion_ids.shape
    diff = (rescored - ro.sampling_logp)[ro.completion_mask].abs().max()
    assert diff < 1e-5, float(diff)


def test_rescore_of_a_row_subset_matches(setup):
    _, model, enc = setup
    ro = _engine(setup).generate(enc, G, _params())
    rows = [9, 2, 5]
    sub = ro.select(rows)
    assert sub.num_rows == 3 and sub.group_keys == [ro.group_keys[0], ro.group_keys[1], ro.group_keys[2]]
    assert sub.images_per_prompt.tolist() == [1, 4, 2]
    with torch.no_grad():
        full = logprobs_ref(completion_states(model, ro), model.lm_head)
        part = logprobs_ref(completion_states(model, sub), model.lm_head)
    assert torch.allclose(part, full[rows], atol=1e-5)
    only_second = ro.select([4, 5])
    assert only_second.images_per_prompt.tolist() == [4] and only_second.image_grid_thw.shape[0] == 4
    assert only_second.pixel_values.shape[0] == int(only_second.image_grid_thw.prod(dim=1).sum())


def test_length_planned_trimmed_micro_batches_rescore_the_same(setup):
    _, model, enc = setup
    ro = _engine(setup).generate(enc, G, _params())
    prompt_len = ro.prompt_mask.sum(dim=1)
    longest = int(prompt_len.max() + ro.completion_lengths().max())
    plans = {
        "rows": plan_micro_batches(ro, max_rows=3),
        "tokens": plan_micro_batches(ro, max_rows=G, max_tokens=2 * longest),
        "row each": plan_micro_batches(ro, max_rows=G, max_tokens=1),
    }
    assert [len(b) for b in plans["rows"]] == [3, 3, 3, 3]
    assert len(plans["row each"]) == ro.num_rows
    by_length = sorted(range(ro.num_prompts), key=lambda b: -int(prompt_len[b * G]))
    for name, plan in plans.items():  # longest prompts first, each prompt's rows in one run
        order = [int(ro.group_index[r]) for b in plan for r in b]
        assert order == [g for g in by_length for _ in range(G)], name
    with torch.no_grad():
        full = logprobs_ref(completion_states(model, ro), model.lm_head)
    for name, plan in plans.items():
        rows = sorted(r for b in plan for r in b)
        assert rows == list(range(ro.num_rows)), name  # every row exactly once
        for b in plan:
            part = ro.select(b).trimmed()
            cost = len(b) * (part.prompt_ids.shape[1] + part.completion_ids.shape[1])
            assert name != "tokens" or cost <= 2 * longest, (name, b)
            assert part.prompt_mask[:, 0].any()  # no all-padding column (a vision-cut row may have no tokens)
            assert part.completion_mask[:, -1].any() or part.completion_ids.shape[1] == 1
            assert torch.equal(part.prompt_mask.sum(dim=1), prompt_len[b])
            with torch.no_grad():
                logp = logprobs_ref(completion_states(model, part), model.lm_head)
            T = part.completion_ids.shape[1]
            assert torch.allclose(logp, full[b][:, :T], atol=1e-5), (name, b)
            assert (full[b][:, T:] == 0).all()
    with pytest.raises(ValueError, match="max_rows"):
        plan_micro_batches(ro, max_rows=0)


def test_greedy_equals_transformers_generate(setup):
    _, model, enc = setup
    ro = _engine(setup).generate(enc, 1, GenerationParams(max_new_tokens=16, greedy=True))
    inputs = {k: v for k, v in enc.items() if k != "groups"}
    model.eval()
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=16, do_sample=False)[:, enc["input_ids"].shape[1] :]
    model.train()
    for r in range(ro.num_rows):
        n = int(ro.completion_lengths()[r])
        assert torch.equal(ro.completion_ids[r, :n], ref[r, :n])


def test_training_mode_restored_and_gradients_flow(setup):
    _, model, enc = setup
    model.train()
    ro = _engine(setup).generate(enc, 2, _params())
    assert model.training
    model.zero_grad(set_to_none=True)
    states = completion_states(model, ro)
    logprobs_ref(states, model.lm_head).sum().backward()
    assert model.model.visual.patch_embed.proj.weight.grad is not None
    assert model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g) * 3
    for top_k, top_p in [(0, 0.9), (20, 1.0), (20, 0.8), (0, 0.3), (1, 1.0)]:
        ours = filter_logits(logits, top_k, top_p)
        ref = logits.clone()
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (top_k, top_p)


def test_generation_params_validated():
    with pytest.raises(ValueError):
        GenerationParams(max_new_tokens=8, temperature=0)
    with pytest.raises(ValueError):
        GenerationParams(max_new_tokens=8, top_p=0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown rollout backend"):
        make_engine("vllm", model=None, tokenizer=None)


def test_seeded_rows_do_not_depend_on_the_batch(setup):
    """Counter-based seeding: a prompt's samples are the same alone or batched with others (DDP sharding)."""
    _, _, enc = setup
    engine = _engine(setup)
    full = engine.generate(enc, G, _params(seed=21))
    keys = {k: enc[k] for k in ("input_ids", "attention_mask")}
    # prompt 2 alone (its own left padding, its own images)
    counts = [1, 4, 2]
    grid = enc["image_grid_thw"]
    patches = grid.prod(dim=1)
    first_img = sum(counts[:2])
    first_patch = int(patches[:first_img].sum())
    width = int(keys["attention_mask"][2].sum())
    alone = {
        "input_ids": keys["input_ids"][2:3, -width:],
        "attention_mask": keys["attention_mask"][2:3, -width:],
        "pixel_values": enc["pixel_values"][first_patch:],
        "image_grid_thw": grid[first_img:],
        "groups": [enc["groups"][2]],
    }
    one = engine.generate(alone, G, _params(seed=21))
    T = one.completion_ids.shape[1]
    assert torch.equal(one.completion_ids, full.completion_ids[2 * G :, :T])
    assert torch.allclose(one.sampling_logp, full.sampling_logp[2 * G :, :T], atol=1e-5)


def test_counter_based_sampling_follows_the_distribution():
    from rarl_fast.rollout.sampling import hashed_uniforms, row_seeds, sample_next

    probs = torch.tensor([0.5, 0.3, 0.0, 0.2])
    logits = probs.clamp_min(1e-30).log().expand(20000, 4)
    seeds = row_seeds(7, [("k",)], 20000)
    tokens, _ = sample_next(logits, temperature=1.0, uniforms=hashed_uniforms(seeds, 0))
    freq = torch.bincount(tokens, minlength=4).double() / 20000
    assert freq[2] == 0 and torch.allclose(freq, probs.double(), atol=0.015)
    u = hashed_uniforms(seeds, 3)
    assert (u > 0).all() and (u < 1).all() and not torch.equal(u, hashed_uniforms(seeds, 4))
