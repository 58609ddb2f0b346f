"""The static-shape decode step: buckets, buffers, and a compiled step that samples exactly what the eager step
samples (``rollout.compile``).

The compiled tests run the real inductor on the CPU with the tiny model: one compile in all, covering every bucket
(dynamic batch dims) and both greedy and sampled rows (greedy is a per-row tensor).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from PIL import Image

from rarl_fast.model import load_model, load_processor
from rarl_fast.rollout import GenerationParams, HFEngine
from rarl_fast.rollout.decode import Arena, length_bucket, row_bucket
from rarl_fast.rollout.shared_prefix import SharedPrefixDecoder, compile_step
from tests.helpers.rollout_batch import prompt_batch

G = 4


def test_row_buckets_are_powers_of_two_from_two_up_to_the_full_size():
    assert [row_bucket(n, 8) for n in range(9)] == [2, 2, 2, 4, 4, 8, 8, 8, 8]
    assert [row_bucket(n, 6) for n in range(1, 7)] == [2, 2, 4, 4, 6, 6]
    assert row_bucket(1, 1) == 1


def test_length_buckets_pad_by_at_most_a_quarter():
    sizes = [length_bucket(n) for n in range(1, 5000)]
    assert all(s >= n and (n <= 16 or s <= 1.25 * n) for n, s in zip(range(1, 5000), sizes, strict=True))
    assert len(set(sizes)) <= 4 * 9 + 1  # four per octave from 16 to 8192
    assert length_bucket(1227) == 1280 and length_bucket(1024) == 1024


def test_arena_hands_out_views_of_one_buffer_and_grows():
    arena = Arena()
    a = arena.take("x", (2, 3), torch.float32, torch.device("cpu"))
    b = arena.take("x", (3, 2), torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr() and b.shape == (3, 2)
    big = arena.take("x", (4, 4), torch.float32, torch.device("cpu"))
    assert big.numel() == 16 and arena.nbytes() == 16 * 4
    assert arena.take("x", (2, 2), torch.float32, torch.device("cpu")).data_ptr() == big.data_ptr()
    assert arena.take("x", (2,), torch.long, torch.device("cpu")).dtype == torch.long  # new dtype: new buffer
    arena.clear()
    assert arena.nbytes() == 0


def test_unknown_compile_mode():
    with pytest.raises(ValueError, match=r"rollout\.compile"):
        compile_step("max-autotune")


class _EosBias:
    """Forward hook on lm_head: EOS made likely, so that rows end at different steps and buckets shrink. The bias
    is a tensor, set in place: a compiled step reads it, never recompiles for it."""

    def __init__(self, eos: int, vocab: int):
        self.bias = torch.zeros(vocab)
        self.eos = eos

    def set(self, value: float) -> None:
        self.bias[self.eos] = value

    def __call__(self, module, args, out):
        return out + self.bias.to(out.dtype)


@dataclasses.dataclass
class _Setup:
    engines: dict[str, HFEngine]  # "off", "default" (compiled), "reference" (the model's own decode loop)
    enc: Any  # 4 prompts with 1, 4, 2 and 1 images
    eos_bias: _EosBias
    graphs_before: int  # torch.compile graphs of the session before this module's


@pytest.fixture(scope="module")
def setup(tiny_vlm_dir):
    processor = load_processor(tiny_vlm_dir)
    model = load_model(tiny_vlm_dir, local_files_only=True)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    bias = _EosBias(eos, model.lm_head.out_features)
    hook = model.lm_head.register_forward_hook(bias)  # for the module's lifetime: compiled in
    sizes = [(56, 84), (112, 56), (84, 112), (56, 56)]
    images = [Image.new("RGB", s, (30 * i, 190 - 35 * i, 60)) for i, s in enumerate(sizes)]
    per_prompt = [images[:1], images, images[1:3], images[3:]]
    enc = prompt_batch(processor, per_prompt, [(f"c{i}",) for i in range(4)])
    engines = {
        mode: HFEngine(model, processor.tokenizer, eos_token_ids=[eos], compile=mode) for mode in ("off", "default")
    }
    engines["reference"] = HFEngine(model, processor.tokenizer, eos_token_ids=[eos], shared_prefix_decode=False)
    yield _Setup(engines, enc, bias, graphs_before=_graphs())
    hook.remove()


@pytest.fixture
def buckets(monkeypatch):
    """The (prompts, samples) bucket after each compaction check, recorded by wrapping ``compact``."""
    seen: list[tuple[int, int]] = []
    compact = SharedPrefixDecoder.compact

    def recording(self):
        compact(self)
        seen.append(self.bucket)

    monkeypatch.setattr(SharedPrefixDecoder, "compact", recording)
    return seen


def _assert_same(a, b, what: str) -> None:
    assert torch.equal(a.completion_ids, b.completion_ids), what
    assert torch.equal(a.completion_mask, b.completion_mask), what
    assert torch.equal(a.truncated, b.truncated) and torch.equal(a.vision_cut, b.vision_cut), what
    torch.testing.assert_close(a.sampling_logp, b.sampling_logp, atol=1e-5, rtol=0, msg=what)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


SAMPLED = GenerationParams(max_new_tokens=24, seed=7, temperature=0.7, top_p=0.9, top_k=40)
GREEDY = dataclasses.replace(SAMPLED, greedy=True, seed=None)  # evaluation: training's settings, greedy


@pytest.mark.parametrize(
    "params, eos_bias, first_bucket",
    [(SAMPLED, 1.5, (4, G)), (GREEDY, 0.3, (2, G))],
    ids=["sampled", "greedy"],
)
def test_compiled_step_samples_what_the_eager_step_samples(setup, buckets, params, eos_bias, first_bucket):
    engines, enc = setup.engines, setup.enc
    setup.eos_bias.set(eos_bias)
    eager = engines["off"].generate(enc, G, params)
    eager_buckets = list(buckets)
    reference = engines["reference"].generate(enc, G, params)
    compiled = engines["default"].generate(enc, G, params)
    assert _graphs() - setup.graphs_before == 1  # compiled (really), once for greedy and sampled rows
    _assert_same(eager, reference, "eager shared-prefix vs the model's own decode loop")
    _assert_same(compiled, eager, "compiled vs eager")
    # rows ended at different steps and the live rows moved to smaller buckets on the way (the reference never
    # moves rows, so the equalities above cover the moves; greedy: two prompts end at once)
    assert eager_buckets[0] == first_bucket and eager_buckets[-1][0] * eager_buckets[-1][1] < 4 * G, eager_buckets
    assert len(set(eager.completion_lengths().tolist())) >= 2, eager.completion_lengths()


def test_compiled_engine_keeps_its_buffers_and_recompiles_for_no_new_batch(setup):
    """A second call with another batch shape (other rows, other prompt length) reuses the compiled step; the
    decode buffers stay at their addresses between calls, through ``sleep`` (the trainer's engine sleeps after
    every rollout), where CUDA graphs expect them."""
    engines, enc = setup.engines, setup.enc
    engine = engines["default"]
    setup.eos_bias.set(1.5)
    params = SAMPLED
    engine.generate(enc, G, params)  # compiled in the test above when run in order; else here
    kept = engine._arena.nbytes()
    assert kept > 0 and engines["off"]._arena.nbytes() == 0  # eager engines keep nothing between calls

    def address() -> int:
        return engine._arena.take("suffix.k0", (1,), torch.float32, torch.device("cpu")).data_ptr()

    before = address()
    engine.sleep()
    engine.wake()
    graphs = _graphs()
    patches = int(enc["image_grid_thw"][:5].prod(dim=1).sum())  # the first two prompts hold 5 images
    small = {
        "input_ids": enc["input_ids"][:2],
        "attention_mask": enc["attention_mask"][:2],
        "pixel_values": enc["pixel_values"][:patches],
        "image_grid_thw": enc["image_grid_thw"][:5],
        "groups": enc["groups"][:2],
    }
    a = engine.generate(small, 2, params)
    b = engines["off"].generate(small, 2, params)
    _assert_same(a, b, "compiled vs eager, another batch")
    assert _graphs() == graphs
    assert engine._arena.nbytes() == kept  # the smaller batch fits in the buffers of the larger one
    assert address() == before


@pytest.mark.gpu
def test_gpu_cuda_graphs_sample_what_the_eager_step_samples(tiny_vlm_dir):
    """``reduce-overhead`` on CUDA: the step runs as CUDA graphs (none skipped: no host sync, no mutated input
    outside the arena), replayed on the second call, and samples the eager step's tokens."""
    from torch._dynamo.utils import counters

    processor = load_processor(tiny_vlm_dir)
    model = load_model(tiny_vlm_dir, local_files_only=True, device="cuda", dtype="float32", trainable=False)
    images = [Image.new("RGB", s, (40 * i, 90, 200 - 50 * i)) for i, s in enumerate([(56, 84), (112, 56)])]
    enc = prompt_batch(processor, [images[:1], images], [("g0",), ("g1",)])  # the engine moves it to the GPU
    params = GenerationParams(max_new_tokens=32, seed=3, temperature=0.8, top_p=0.95)
    graphed = HFEngine(model, processor.tokenizer, eos_token_ids=[], compile="reduce-overhead")
    eager = HFEngine(model, processor.tokenizer, eos_token_ids=[]).generate(enc, G, params)
    skips = counters["inductor"]["cudagraph_skips"]
    for _ in range(2):  # record, then replay
        _assert_same(graphed.generate(enc, G, params), eager, "CUDA graphs vs eager")
    assert counters["inductor"]["cudagraph_skips"] == skips
