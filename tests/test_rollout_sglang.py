"""The SGLang backend on CPU: its plain-Python parts, and the whole engine against a recording fake of sglang
0.5.23 whose signatures come from the recorded source (tests/data/sglang_api.json, bench/record_sglang_api.py):
every call binds, the lifecycle runs in order, every sample gets its own seed, a push that did not land raises."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from rarl_fast.config import ConfigError
from rarl_fast.config_loader import load_config
from rarl_fast.data.prompts import build_messages
from rarl_fast.model import load_model, load_processor
from rarl_fast.rollout import GenerationParams, awake, make_engine
from rarl_fast.rollout.sampling import row_seeds
from rarl_fast.rollout.sglang import (
    IMAGE_PLACEHOLDER,
    MEMORY_TAGS,
    SGLANG_VERSION,
    SGLangEngine,
    build_requests,
    collapse_image_placeholders,
    engine_args,
    regroup_outputs,
    require_sglang,
)
from rarl_fast.rollout.sglang_weights import STACKED_PARAMS, buckets, sglang_target, to_sglang_name
from tests.helpers import sglang_fake
from tests.helpers.rollout_batch import prompt_batch
from tests.helpers.sglang_fake import RECORD, load_checkpoint, recorded_signature
from tests.test_train import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
G = 3


# -- plain-Python parts ----------------------------------------------------------------------------------------


def test_name_mapping_gives_the_saved_checkpoint_names(tiny_vlm_dir):
    """transformers 5 names -> exactly the names save_pretrained writes, which is what SGLang loads."""
    model = load_model(tiny_vlm_dir, trainable=False, local_files_only=True)
    mapped = [to_sglang_name(n) for n in model.state_dict()]
    assert len(set(mapped)) == len(mapped)
    assert set(mapped) == set(load_checkpoint(str(tiny_vlm_dir)))
    assert [to_sglang_name(m) for m in mapped] == mapped  # the checkpoint layout passes through


def test_targets_follow_the_recorded_load_weights_rules():
    assert [list(m) for m in STACKED_PARAMS] == RECORD["qwen2_5_vl"]["stacked_params_mapping"]
    t = sglang_target
    assert t("model.layers.3.self_attn.k_proj.bias") == ("model.layers.3.self_attn.qkv_proj.bias", "k")
    assert t("model.layers.3.mlp.gate_proj.weight") == ("model.layers.3.mlp.gate_up_proj.weight", 0)
    assert t("model.layers.3.mlp.up_proj.weight") == ("model.layers.3.mlp.gate_up_proj.weight", 1)
    assert t("visual.blocks.1.attn.qkv.weight") == ("visual.blocks.1.attn.qkv_proj.weight", None)
    assert t("visual.blocks.1.mlp.up_proj.bias") == ("visual.blocks.1.mlp.gate_up_proj.bias", 1)
    assert t("visual.blocks.1.attn.proj.weight") == ("visual.blocks.1.attn.proj.weight", None)
    assert t("lm_head.weight") == ("lm_head.weight", None)


def test_the_recorded_api_is_the_one_the_backend_targets():
    assert RECORD["sglang"] == SGLANG_VERSION
    assert tuple(RECORD["memory_tags"]) == MEMORY_TAGS
    # why the push is read back through check_weights: Qwen2.5-VL has no get_weights_by_name in 0.5.23
    assert "get_weights_by_name" not in RECORD["qwen2_5_vl"]["methods"]
    assert {"loop", "tokenizer_manager"} <= set(RECORD["engine_attributes"])
    args = engine_args("m", seed=1, mem_fraction_static=0.4)
    assert set(args) <= set(RECORD["server_args"])
    assert args["enable_memory_saver"] and args["enable_deterministic_inference"] and args["tp_size"] == 1


def test_collapse_expanded_prompt_back_to_one_placeholder_per_image(tiny_vlm_dir):
    processor = load_processor(tiny_vlm_dir)
    images = [Image.new("RGB", (112, 84), (i * 50, 0, 0)) for i in range(3)]
    text = processor.apply_chat_template(
        build_messages(3, "age", "an integer from 0 to 116"), add_generation_prompt=True
    )
    enc = processor(text=[text], images=[images], return_tensors="pt")
    decoded = processor.tokenizer.decode(enc["input_ids"][0])
    assert decoded.count("<|image_pad|>") > 3
    assert collapse_image_placeholders(decoded) == text
    assert text.count(IMAGE_PLACEHOLDER) == 3


def test_build_requests_one_request_per_sample_with_its_own_seed():
    params = GenerationParams(max_new_tokens=64, temperature=0.7, top_p=0.9, top_k=0, seed=5)
    texts = [f"a {IMAGE_PLACEHOLDER} b", f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER} c"]
    seeds = row_seeds(5, [("x",), ("y",)], 2).tolist()
    req = build_requests(texts, [["img0"], ["img1", "img2"]], seeds, params, stop_token_ids=[7, 9])
    assert req["prompt"] == [texts[0], texts[0], texts[1], texts[1]]
    assert req["image_data"] == [["img0"], ["img0"], ["img1", "img2"], ["img1", "img2"]]
    assert req["return_logprob"] is True
    sps = req["sampling_params"]
    assert [sp["sampling_seed"] for sp in sps] == seeds and len(set(seeds)) == 4
    for sp in sps:
        assert "n" not in sp and sp["max_new_tokens"] == 64 and sp["temperature"] == 0.7 and sp["top_p"] == 0.9
        assert sp["top_k"] == -1 and sp["stop_token_ids"] == [7, 9] and sp["skip_special_tokens"] is False
        assert set(sp) <= set(RECORD["sampling_params"])
    params = GenerationParams(max_new_tokens=8, greedy=True)
    greedy = build_requests(texts, [["a"], ["b", "c"]], [1, 2], params, stop_token_ids=None)
    assert greedy["sampling_params"][0]["temperature"] == 0.0 and greedy["sampling_params"][0]["ignore_eos"] is True
    with pytest.raises(ValueError, match="placeholders"):
        build_requests(texts, [["a"], ["b"]], seeds, params)
    with pytest.raises(ValueError, match="image lists"):
        build_requests(texts, [["a"]], seeds, params)
    with pytest.raises(ValueError, match="n seeds per prompt"):
        build_requests(texts, [["a"], ["b", "c"]], seeds[:3], params)


def _out(ids, lps, reason):
    return {"output_ids": ids, "meta_info": {"output_token_logprobs": [(lp, t, None) for lp, t in zip(lps, ids)],
                                             "finish_reason": {"type": reason}}}  # fmt: skip


def test_regroup_outputs_prompt_major():
    EOS, PAD, IMG = 2, 0, 5
    outputs = [
        _out([10, 11, EOS], [-0.1, -0.2, -0.3], "stop"),  # prompt 0, sample 0
        _out([12, 13, 14, 15], [-1.0, -1.1, -1.2, -1.3], "length"),  # prompt 0, sample 1: truncated
        _out([16, IMG, 17], [-0.5, -0.6, -0.7], "stop"),  # prompt 1, sample 0: vision token cut
        _out([18, EOS], [-0.4, -0.8], "stop"),  # prompt 1, sample 1
    ]
    parts = regroup_outputs(outputs, 2, 2, pad_token_id=PAD, eos_token_ids=[EOS], vision_token_ids=[IMG])
    assert parts["completion_ids"].tolist() == [
        [10, 11, EOS, PAD],
        [12, 13, 14, 15],
        [16, PAD, PAD, PAD],
        [18, EOS, PAD, PAD],
    ]
    assert parts["completion_mask"].sum(1).tolist() == [3, 4, 1, 2]
    assert parts["truncated"].tolist() == [False, True, False, False]
    assert parts["vision_cut"].tolist() == [False, False, True, False]
    assert torch.allclose(parts["sampling_logp"][1], torch.tensor([-1.0, -1.1, -1.2, -1.3]))
    assert (parts["sampling_logp"][~parts["completion_mask"]] == 0).all()
    with pytest.raises(ValueError, match="expected 2 x 2"):
        regroup_outputs(outputs[:3], 2, 2, pad_token_id=PAD, eos_token_ids=[EOS], vision_token_ids=[IMG])
    bad = [{"output_ids": [1, 2], "meta_info": {"output_token_logprobs": [(-1.0, 1, None)]}}]
    with pytest.raises(ValueError, match="return_logprob"):
        regroup_outputs(bad, 1, 1, pad_token_id=PAD, eos_token_ids=[EOS], vision_token_ids=[IMG])


def test_buckets_are_never_empty():
    tensors = [(f"t{i}", torch.ones(4, dtype=torch.float32)) for i in range(5)]  # 8 bytes each in bf16
    for limit in (8, 16, 20, 40, 1 << 20):
        out = list(buckets(iter(tensors), dtype=torch.bfloat16, bucket_bytes=limit))
        assert all(b for b, _ in out) and [last for _, last in out] == [False] * (len(out) - 1) + [True]
        assert [n for b, _ in out for n, _ in b] == [f"t{i}" for i in range(5)]
        assert all(t.dtype == torch.bfloat16 for b, _ in out for _, t in b)
        assert all(sum(t.numel() * 2 for _, t in b) <= max(limit, 8) for b, _ in out)
    with pytest.raises(ValueError, match="no weights to push"):
        list(buckets(iter([]), dtype=torch.bfloat16, bucket_bytes=8))


def test_configurations_that_cannot_be_correct_are_refused(tiny_vlm_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="enable_deterministic_inference=True"):
        engine_args("m", seed=0, mem_fraction_static=0.5, enable_deterministic_inference=False)
    with pytest.raises(ValueError, match="tp_size=1"):
        engine_args("m", seed=0, mem_fraction_static=0.5, tp_size=2)
    with pytest.raises(ValueError, match="enable_memory_saver=True"):
        engine_args("m", seed=0, mem_fraction_static=0.5, enable_memory_saver=False)
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        engine_args("m", seed=0, mem_fraction_static=0.5)
    with pytest.raises(ConfigError, match="LoRA"):
        load_config(
            ROOT / "configs" / "demo_cpu.yaml",
            [f"model.name_or_path={tiny_vlm_dir}", "rollout.backend=sglang", "model.lora.enabled=true"],
        )


@pytest.mark.skipif(
    importlib.util.find_spec("sglang") is not None and torch.cuda.is_available(), reason="SGLang can run here"
)
def test_selecting_sglang_without_it_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"rollout\.backend=sglang needs") as info:
        require_sglang()
    if importlib.util.find_spec("sglang") is None:
        assert "sglang package" in str(info.value)
    if not torch.cuda.is_available():
        assert "CUDA device" in str(info.value)
    with pytest.raises(RuntimeError, match=r"rollout\.backend=sglang needs"):
        make_engine("sglang", model=None, tokenizer=None, model_path="x")


# -- the engine against the recording fake ---------------------------------------------------------------------


@pytest.fixture
def fake(monkeypatch):
    """The fake sglang installed; ``require_sglang`` and the CUDA device query pass on this CPU machine."""
    monkeypatch.setattr("rarl_fast.rollout.sglang.require_sglang", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return sglang_fake.install(monkeypatch)


@pytest.fixture(scope="module")
def setup(tiny_vlm_dir):
    processor = load_processor(tiny_vlm_dir)
    model = load_model(tiny_vlm_dir, trainable=False, local_files_only=True)
    sizes = [(56, 84), (112, 56), (84, 112)]
    images = [Image.new("RGB", s, (40 * i, 200 - 30 * i, 90)) for i, s in enumerate(sizes)]
    per_prompt = [images[:1], images, images[1:]]
    enc = prompt_batch(processor, per_prompt, [(f"s{i}", f"t{i}") for i in range(3)])
    enc["images"] = per_prompt
    return processor, model, enc


def _engine(setup, fake, tiny_vlm_dir, **kw) -> SGLangEngine:
    return SGLangEngine(str(tiny_vlm_dir), setup[0].tokenizer, **kw)


def _weights(model):
    return lambda: model.named_parameters()


def _rollout(engine, setup, version, seed=7):
    _, model, enc = setup
    with awake(engine, version=version, weights=_weights(model)):
        return engine.generate(enc, G, GenerationParams(max_new_tokens=5, seed=seed))


def test_every_call_binds_to_the_recorded_signatures(setup, fake, tiny_vlm_dir):
    engine = _engine(setup, fake, tiny_vlm_dir)
    _rollout(engine, setup, version=("stage1", 0))
    _rollout(engine, setup, version=("stage1", 1))
    engine.shutdown()
    called = [name for name, _ in fake.calls]
    for required in ("__init__", "generate", "begin_weight_update", "update_weights_from_tensor",
                     "end_weight_update", "check_weights", "release_memory_occupation",
                     "resume_memory_occupation", "shutdown"):  # fmt: skip
        assert required in called, required
    assert set(called) - {"check_weights"} <= set(RECORD["engine_methods"])
    # the binding has teeth: a keyword 0.5.23 does not have is refused, as are unknown settings and sampling keys
    with pytest.raises(TypeError):
        recorded_signature(RECORD["engine_methods"]["generate"]).bind(prompt="x", n=4)
    with pytest.raises(TypeError, match="ServerArgs"):
        fake(model_path=str(tiny_vlm_dir), dtype="bfloat16", enable_weight_backup=True)
    live = fake(model_path=str(tiny_vlm_dir), dtype="bfloat16")
    with pytest.raises(TypeError, match="SamplingParams"):
        live.generate(prompt=["x"], image_data=[[]], sampling_params={"seed": 1})


def test_lifecycle_order_and_pushes(setup, fake, tiny_vlm_dir):
    engine = _engine(setup, fake, tiny_vlm_dir)

    def events():
        return [n for n, _ in fake.calls if n not in ("__init__", "check_weights")]

    push = ["begin_weight_update", "update_weights_from_tensor", "end_weight_update"]
    sample = ["generate", "generate"]  # the prefix pre-fill, then the G requests per prompt
    _rollout(engine, setup, version=("stage1", 0))
    assert events() == [*push, *sample, "release_memory_occupation"]  # born awake: no resume
    assert engine.asleep and engine.weights_released and engine.weights_version is None
    fake.calls.clear()
    _rollout(engine, setup, version=("stage1", 0))  # same policy, but sleep dropped the weights: push again
    assert events() == ["resume_memory_occupation", *push, *sample, "release_memory_occupation"]
    release = next(a for n, a in fake.calls if n == "release_memory_occupation")
    assert release["tags"] == list(MEMORY_TAGS)
    # a backed-up engine keeps its weights asleep: the same policy is not pushed again, a new one is
    fake.calls.clear()
    kept = _engine(setup, fake, tiny_vlm_dir, enable_weights_cpu_backup=True)
    fake.calls.clear()
    _rollout(kept, setup, version=("stage1", 0))
    _rollout(kept, setup, version=("stage1", 0))
    _rollout(kept, setup, version=("stage1", 1))
    assert events() == [*push, *sample, "release_memory_occupation",
                        "resume_memory_occupation", *sample, "release_memory_occupation",
                        "resume_memory_occupation", *push, *sample, "release_memory_occupation"]  # fmt: skip
    # misuse is refused rather than run on released memory
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(setup[2], G, GenerationParams(max_new_tokens=5, seed=1))
    engine.wake()
    with pytest.raises(RuntimeError, match="released the weights"):
        engine.generate(setup[2], G, GenerationParams(max_new_tokens=5, seed=1))


def test_every_sample_gets_a_distinct_reproducible_seed(setup, fake, tiny_vlm_dir):
    engine = _engine(setup, fake, tiny_vlm_dir)
    ro = _rollout(engine, setup, version=None, seed=11)
    prefill, sampling = [a for n, a in fake.calls if n == "generate"]
    assert prefill["sampling_params"] == {"max_new_tokens": 0} and len(prefill["prompt"]) == 3
    seeds = [sp["sampling_seed"] for sp in sampling["sampling_params"]]
    keys = [("s0", "t0"), ("s1", "t1"), ("s2", "t2")]
    assert len(seeds) == 3 * G and len(set(seeds)) == 3 * G
    assert seeds == row_seeds(11, keys, G).tolist()  # the HF engine's seeds: same contract
    assert all("n" not in sp for sp in sampling["sampling_params"])
    # distinct seeds -> distinct completions within each group (the fake samples by seed, as SGLang does)
    rows = ro.completion_ids.view(3, G, -1)
    for b in range(3):
        assert len({tuple(r.tolist()) for r in rows[b]}) == G
    again = _rollout(engine, setup, version=None, seed=11)
    assert torch.equal(again.completion_ids, ro.completion_ids)
    assert ro.group_keys == keys and ro.num_rows == 3 * G and ro.images_per_prompt.tolist() == [1, 3, 2]
    # unseeded calls (seed=None) still give every sample its own seed, fresh on every call
    fake.calls.clear()
    with awake(engine, version=None, weights=_weights(setup[1])):
        engine.generate(setup[2], G, GenerationParams(max_new_tokens=5))
        engine.generate(setup[2], G, GenerationParams(max_new_tokens=5))
    sampled = [
        a["sampling_params"] for n, a in fake.calls if n == "generate" and isinstance(a["sampling_params"], list)
    ]
    first, second = ([sp["sampling_seed"] for sp in call] for call in sampled)
    assert len(set(first)) == len(set(second)) == 3 * G and not set(first) & set(second)


def test_prompt_length_mismatch_is_a_clear_error(setup, fake, tiny_vlm_dir):
    engine = _engine(setup, fake, tiny_vlm_dir)
    fake.prompt_tokens = lambda text, imgs: 3
    with pytest.raises(ValueError, match="resized the images differently"):
        _rollout(engine, setup, version=None)


def test_the_push_lands_and_is_verified(setup, fake, tiny_vlm_dir):
    model = setup[1]
    engine = _engine(setup, fake, tiny_vlm_dir)
    new = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    engine.update_weights(iter(new.items()))  # born awake
    sgl = engine.engine.model.params
    assert engine.last_push_checked == len(sgl)  # every SGLang parameter was read back
    qkv = torch.cat([new[f"model.language_model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(sgl["model.layers.1.self_attn.qkv_proj.weight"], qkv.bfloat16())
    assert torch.equal(sgl["visual.blocks.0.attn.qkv_proj.bias"], new["model.visual.blocks.0.attn.qkv.bias"].bfloat16())
    update = [a for n, a in fake.calls if n == "update_weights_from_tensor"]
    assert [a["flush_cache"] for a in update] == [False] * (len(update) - 1) + [True]
    assert all(a["named_tensors"] for a in update)


@pytest.mark.parametrize(
    "dropped, param",
    [
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.qkv_proj.weight"),
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"),
        ("visual.blocks.1.attn.qkv.weight", "visual.blocks.1.attn.qkv_proj.weight"),
        ("visual.blocks.0.mlp.gate_proj.bias", "visual.blocks.0.mlp.gate_up_proj.bias"),
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_a_name_the_engine_skips_is_named(setup, fake, tiny_vlm_dir, dropped, param):
    """SGLang's load_weights skips names it does not know without an error; the read-back catches it per kind
    (embedding, fused q/k/v, fused gate/up, a vision block, lm_head)."""
    fake.drop = {dropped}
    engine = _engine(setup, fake, tiny_vlm_dir)
    new = {n: p.detach() + 0.01 for n, p in setup[1].named_parameters()}
    match = "engine's " + re.escape(param) + " differs"
    with pytest.raises(RuntimeError, match=match), awake(engine, version=1, weights=lambda: iter(new.items())):
        pass


def test_a_wrong_name_mapping_or_an_unreached_parameter_is_named(setup, fake, tiny_vlm_dir, monkeypatch):
    engine = _engine(setup, fake, tiny_vlm_dir)
    monkeypatch.setattr(
        "rarl_fast.rollout.sglang_weights.to_sglang_name",
        lambda n: n.replace("model.language_model.", "model."),  # forgets to map the vision tower
    )
    with pytest.raises(RuntimeError, match=r"has no parameter model\.visual\.") as info:
        engine.update_weights(setup[1].named_parameters())
    assert "stale" in str(info.value)
    monkeypatch.undo()
    monkeypatch.setattr("rarl_fast.rollout.sglang.require_sglang", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    fake = sglang_fake.install(monkeypatch)
    fake.extra_params = {"model.layers.0.mlp.extra.weight": torch.zeros(2, dtype=torch.bfloat16)}
    engine = _engine(setup, fake, tiny_vlm_dir)
    with pytest.raises(RuntimeError, match=r"no pushed tensor reaches the engine's model\.layers\.0\.mlp\.extra"):
        engine.update_weights(setup[1].named_parameters())


# -- the trainer drives the engine through `awake` only ----------------------------------------------------------


@pytest.mark.timeout(300)
def test_training_with_the_fake_engine_follows_the_lifecycle(tiny_vlm_dir, tmp_path, fake, monkeypatch):
    """rollout.backend=sglang end to end on the fake (train steps and held-out evals): the engine generates only
    awake and after a push since it last slept, sleeps through every policy update, and each push after an
    update carries, and verifies, the updated weights."""
    import rarl_fast.train as train_mod

    update = train_mod.update_policy

    def marked_update(*args, **kwargs):
        fake.calls.append(("policy update", {}))
        return update(*args, **kwargs)

    monkeypatch.setattr(train_mod, "update_policy", marked_update)
    overrides = {"rollout.backend": "sglang", "stage2.steps": 1, "logging.eval_every": 2}
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", tiny_overrides(tiny_vlm_dir, tmp_path, **overrides))
    rt = train_mod.train(cfg)
    events = [n for n, _ in fake.calls if n not in ("__init__", "check_weights")]
    awake_now, pushed, pushes = True, False, 0
    for i, e in enumerate(events):
        if e == "resume_memory_occupation":
            assert not awake_now, i
            awake_now, pushed = True, False
        elif e == "release_memory_occupation":
            assert awake_now, i
            awake_now = False
        elif e == "begin_weight_update":
            assert awake_now, i
            pushed, pushes = True, pushes + 1
        elif e == "generate":
            assert awake_now and pushed, (i, events[max(0, i - 4) : i + 1])
        elif e == "policy update":
            assert not awake_now, (i, events[max(0, i - 4) : i + 1])
    assert events.count("policy update") == 3 and pushes >= 3 and not awake_now
    assert rt.engine.last_push_checked == len(rt.engine.engine.model.params)  # every parameter read back
