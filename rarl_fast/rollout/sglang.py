"""SGLang offline-``Engine`` rollout backend, checked against sglang 0.5.23's source (GPU only; NOT yet verified
on hardware, see README).

Sampling: G requests per prompt, each with its own ``sampling_seed`` (:func:`row_seeds`: a hash of the step
seed, the group key and the sample index, the seeds the HF engine uses), under SGLang's deterministic
inference, where a request's sampled token is a hash of (its seed, position, token). A completion then
depends only on the run seed, its group key and its sample index, as with the HF engine. SGLang's own
``n = G`` would not do: it copies one request's sampling parameters, seed included, to all G samples, so with
deterministic inference all G completions of a prompt would be identical (zero reward spread, GRPO's advantages
silently 0) and without it the seed is ignored (not reproducible).

Cost: deterministic inference swaps in batch-invariant kernels, slower than SGLang's default ones, and keeps
the radix cache only with the fa3, fa4, triton and ascend attention backends (SGLang picks fa3 for it below
Blackwell; on Blackwell it picks flashinfer and turns the radix cache off, so pass ``attention_backend="fa4"`` or
``"triton"`` there). Each prompt is pre-filled once first (a ``max_new_tokens=0`` request, as SGLang's own
``n > 1`` path does) so that its G sampling requests find the prompt, images included, in the radix cache and
compute only the prompt's last token; they do not depend on the scheduler's in-batch prefix heuristics.

Requests carry the chat text with ONE vision placeholder per image (SGLang expands it) and the prompt's images;
SGLang's prompt length must equal the trainer's, else its processor resized the images differently and the
error says so. Log-probs are SGLang's ``log softmax(logits / T)`` (docs/method.md section 4's rule);
``SGLANG_RETURN_ORIGINAL_LOGPROB`` must stay unset. Weights: see :mod:`rarl_fast.rollout.sglang_weights`.

Memory: ``sleep`` releases the KV cache, the CUDA graphs and the weights (``enable_memory_saver``); without
``enable_weights_cpu_backup`` (the default here: the policy changes every step, a CPU copy would only be
overwritten) the weights are gone until the next push, and ``generate`` refuses to run before it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from rarl_fast.rollout.base import GenerationParams, Rollouts
from rarl_fast.rollout.hf import VISION_SPECIAL_TOKENS, _group_keys, batch_field
from rarl_fast.rollout.sampling import row_seeds, stable_seed
from rarl_fast.rollout.sglang_weights import PushCheck, buckets, to_sglang_name

__all__ = [
    "MEMORY_TAGS",
    "SGLANG_VERSION",
    "SGLangEngine",
    "build_requests",
    "collapse_image_placeholders",
    "engine_args",
    "regroup_outputs",
    "require_sglang",
    "to_sglang_name",
]

SGLANG_VERSION = "0.5.23"  # the release whose source this backend was checked against (tests/data/sglang_api.json)
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # what sleep() releases: all of SGLang's GPU memory
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
_PAD_RUN = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Engine settings without which this backend cannot be correct: (value, why).
_REQUIRED: dict[str, tuple[Any, str]] = {
    "enable_memory_saver": (True, "sleep() must free the engine's GPU memory for the trainer's update"),
    "enable_deterministic_inference": (True, "SGLang honours a request's sampling_seed only in this mode"),
    "tp_size": (1, "one engine per trainer rank; the weight push and its check assume unsharded parameters"),
    "dp_size": (1, "update_weights_from_tensor refuses data-parallel replicas"),
    "weight_cache_mode": ("off", "releasing and updating weights refuse a shared weight cache"),
    "skip_tokenizer_init": (False, "requests are chat text plus images, tokenized by SGLang"),
}


def require_sglang() -> None:
    """Raise a clear error naming what is missing for the SGLang backend."""
    missing = []
    if importlib.util.find_spec("sglang") is None:
        missing.append(f"the sglang package (pip install 'rarl-fast[sglang]', which pins sglang=={SGLANG_VERSION})")
    else:
        version = importlib.metadata.version("sglang")
        if version != SGLANG_VERSION:
            missing.append(
                f"sglang=={SGLANG_VERSION} (found {version}; to move on, re-record its API with "
                "bench/record_sglang_api.py and run tests/test_rollout_sglang.py)"
            )
    if not torch.cuda.is_available():
        missing.append("a CUDA device (SGLang's engine has no CPU build)")
    if missing:
        raise RuntimeError("rollout.backend=sglang needs " + " and ".join(missing) + "; use rollout.backend=hf")


def engine_args(
    model_path: str,
    *,
    seed: int,
    mem_fraction_static: float,
    dtype: str = "bfloat16",
    gpu_id: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments of ``sglang.Engine`` for a colocated rollout engine; ``overrides`` may add or change any
    setting except those the backend needs (a clear ValueError names the one that conflicts)."""
    for key, (want, why) in _REQUIRED.items():
        if key in overrides and overrides[key] != want:
            raise ValueError(f"rollout.backend=sglang needs {key}={want!r} ({why}); got {overrides[key]!r}")
    if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes"):
        raise ValueError(
            "SGLANG_RETURN_ORIGINAL_LOGPROB is set: SGLang would return log-probs without the temperature, "
            "unlike the policy's re-score (docs/method.md section 4); unset it"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return {
        "model_path": model_path,
        "dtype": dtype,
        "mem_fraction_static": mem_fraction_static,
        "random_seed": seed,
        "base_gpu_id": gpu_id,
        "enable_weights_cpu_backup": False,
        **overrides,
        **{key: want for key, (want, _) in _REQUIRED.items()},
    }


def collapse_image_placeholders(prompt_text: str) -> str:
    """A processor-expanded prompt (one ``<|image_pad|>`` per visual token) -> one placeholder per image."""
    return _PAD_RUN.sub(IMAGE_PLACEHOLDER, prompt_text)


def build_requests(
    prompt_texts: Sequence[str],
    images: Sequence[Sequence[Any]],
    seeds: Sequence[int],
    params: GenerationParams,
    stop_token_ids: Sequence[int] | None = (),
) -> dict[str, Any]:
    """Keyword arguments of ``sglang.Engine.generate`` for B prompts sampled ``len(seeds) // B`` times each.

    Args:
        prompt_texts: [B] chat-template texts with one vision placeholder per image.
        images: [B] lists of images (PIL images or paths), in image-id order.
        seeds: [B * n] one sampling seed per request, prompt-major (request ``b * n + j`` is sample j of b).
        stop_token_ids: EOS ids that end a completion (besides the model's own); None: no token ends one
            (``ignore_eos``: every completion has ``max_new_tokens`` tokens).
    """
    B = len(prompt_texts)
    if len(images) != B:
        raise ValueError(f"{B} prompts but {len(images)} image lists")
    if B == 0 or len(seeds) % B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts: need n seeds per prompt")
    for i, (text, imgs) in enumerate(zip(prompt_texts, images)):
        if text.count(IMAGE_PLACEHOLDER) != len(imgs):
            raise ValueError(f"prompt {i} has {text.count(IMAGE_PLACEHOLDER)} placeholders for {len(imgs)} images")
    n = len(seeds) // B
    sampling: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": 0.0 if params.greedy else params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if stop_token_ids is None:
        sampling["ignore_eos"] = True
    elif stop_token_ids:
        sampling["stop_token_ids"] = [int(t) for t in stop_token_ids]
    return {
        "prompt": [t for t in prompt_texts for _ in range(n)],
        "image_data": [list(imgs) for imgs in images for _ in range(n)],
        "sampling_params": [{**sampling, "sampling_seed": int(s)} for s in seeds],
        "return_logprob": True,
    }


def prefill_requests(prompt_texts: Sequence[str], images: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """``sglang.Engine.generate`` arguments that only pre-fill each prompt (and encode its images) into the
    radix cache, so that its sampling requests reuse that prefix."""
    return {
        "prompt": list(prompt_texts),
        "image_data": [list(imgs) for imgs in images],
        "sampling_params": {"max_new_tokens": 0},
    }


def regroup_outputs(
    outputs: Sequence[dict[str, Any]],
    num_prompts: int,
    n: int,
    *,
    pad_token_id: int,
    eos_token_ids: Iterable[int],
    vision_token_ids: Iterable[int],
) -> dict[str, Tensor]:
    """SGLang's prompt-major outputs (``B * n`` dicts) -> completion tensors of :class:`Rollouts`.

    Each output needs ``output_ids`` (or the token ids of ``meta_info.output_token_logprobs``) and
    ``meta_info.output_token_logprobs`` as ``(logprob, token_id, text)`` triples. A vision special token cuts the
    completion before it (flagged); ``finish_reason.type == "length"`` marks truncation.
    Returns completion_ids [R, T], completion_mask [R, T], sampling_logp [R, T], truncated [R], vision_cut [R].
    """
    if len(outputs) != num_prompts * n:
        raise ValueError(f"expected {num_prompts} x {n} = {num_prompts * n} outputs, got {len(outputs)}")
    eos, vision = set(eos_token_ids), set(vision_token_ids)
    rows_ids, rows_lp, truncated, cut = [], [], [], []
    for out in outputs:
        meta = out.get("meta_info", {})
        triples = meta.get("output_token_logprobs") or []
        ids = list(out.get("output_ids") or [t[1] for t in triples])
        lps = [float(t[0]) for t in triples]
        if len(lps) != len(ids):
            raise ValueError(f"output has {len(ids)} tokens but {len(lps)} log-probs (return_logprob must be on)")
        stop = next((k for k, tok in enumerate(ids) if tok in vision), None)
        cut.append(stop is not None)
        if stop is not None:
            ids, lps = ids[:stop], lps[:stop]
        reason = meta.get("finish_reason") or {}
        kind = reason.get("type") if isinstance(reason, dict) else str(reason)
        truncated.append(stop is None and kind == "length" and not (ids and ids[-1] in eos))
        rows_ids.append(ids)
        rows_lp.append(lps)
    T = max((len(r) for r in rows_ids), default=0) or 1
    R = len(rows_ids)
    completion_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(R, T, dtype=torch.bool)
    sampling_logp = torch.zeros(R, T, dtype=torch.float32)
    for r, (ids, lps) in enumerate(zip(rows_ids, rows_lp)):
        completion_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[r, : len(ids)] = True
        sampling_logp[r, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return {
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "sampling_logp": sampling_logp,
        "truncated": torch.tensor(truncated, dtype=torch.bool),
        "vision_cut": torch.tensor(cut, dtype=torch.bool),
    }


class SGLangEngine:
    """Colocated SGLang engine for the policy at ``model_path`` (a ``save_pretrained`` folder or Hub id).

    Args:
        image_loader: image reference (``Sample.image``) -> PIL image, for prompt batches that carry their
            groups but not their images (the trainer's :class:`PromptBatch`); use the trainer's ImageCache so
            that SGLang sees the images the processor saw.
        eos_token_ids: ids that end a completion (default: the tokenizer's EOS); an empty list: none does.
        engine_kwargs: further ``sglang.Engine`` settings (e.g. ``attention_backend``); see :func:`engine_args`.
    """

    weights_version: Hashable | None = None

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        mem_fraction_static: float = 0.5,
        dtype: str = "bfloat16",
        seed: int = 0,
        eos_token_ids: Iterable[int] | None = None,
        image_loader: Callable[[Any], Any] | None = None,
        bucket_bytes: int = 1 << 29,
        **engine_kwargs: Any,
    ):
        require_sglang()
        import sglang

        gpu = torch.cuda.current_device()  # the trainer rank's device (accelerate sets it per process)
        args = engine_args(
            model_path, seed=seed, mem_fraction_static=mem_fraction_static, dtype=dtype, gpu_id=gpu, **engine_kwargs
        )
        self.engine = sglang.Engine(**args)
        self.dtype = _DTYPES[dtype]
        self.seed = seed
        self.tokenizer = tokenizer
        self.image_loader = image_loader
        self.bucket_bytes = bucket_bytes
        self.keeps_weights_asleep = bool(args["enable_weights_cpu_backup"])
        self.asleep = False
        self.weights_released = False  # the engine's weights were dropped by sleep() and not pushed since
        self.calls = 0  # generate calls without a seed, for their fresh seeds
        ids = tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
        self.vision_token_ids = [int(i) for i in ids if i is not None and i != tokenizer.unk_token_id]
        eos = [tokenizer.eos_token_id] if eos_token_ids is None else eos_token_ids
        self.stop_token_ids = sorted({int(e) for e in eos})
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self.last_push_checked = 0  # parameters verified by the last push's read-back

    # -- requests ---------------------------------------------------------------------------------------------

    def _prompt_texts(self, batch: Any) -> list[str]:
        texts = batch_field(batch, "prompt_texts")
        if texts is not None:
            return [collapse_image_placeholders(t) for t in texts]
        ids, mask = batch_field(batch, "input_ids"), batch_field(batch, "attention_mask")
        return [collapse_image_placeholders(self.tokenizer.decode(row[m.bool()])) for row, m in zip(ids, mask)]

    def _images(self, batch: Any) -> list[list[Any]]:
        images = batch_field(batch, "images")
        if images is not None:
            return [list(imgs) for imgs in images]
        groups = batch_field(batch, "groups")
        if groups is None or self.image_loader is None:
            raise ValueError(
                "the SGLang backend needs each prompt's images: batch.images (one list per prompt), or "
                "batch.groups and an image_loader"
            )
        return [[self.image_loader(s.image) for s in g.samples] for g in groups]

    def _seeds(self, params: GenerationParams, keys: list[tuple[str, ...]], n: int) -> list[int]:
        base = params.seed
        if base is None:  # as the HF engine's unseeded calls: fresh but reproducible draws on every call
            base = stable_seed(self.seed, "unseeded call", self.calls)
            self.calls += 1
        return row_seeds(base, keys, n).tolist()

    # -- RolloutEngine protocol -------------------------------------------------------------------------------

    def generate(self, batch: Any, n: int, params: GenerationParams) -> Rollouts:
        """Sample ``n`` completions per prompt of ``batch`` (``input_ids``/``attention_mask`` [B, P], the images,
        ``groups`` for the keys); rows come back prompt-major. The engine must be awake and hold weights."""
        if self.asleep:
            raise RuntimeError("SGLangEngine.generate while asleep: wake it first (rarl_fast.rollout.awake does)")
        if self.weights_released:
            raise RuntimeError(
                "SGLangEngine.generate after sleep() released the weights and before a push: "
                "call update_weights first (rarl_fast.rollout.awake does)"
            )
        ids, mask = batch_field(batch, "input_ids"), batch_field(batch, "attention_mask")
        B = ids.shape[0]
        keys = _group_keys(batch, B)
        texts, images = self._prompt_texts(batch), self._images(batch)
        seeds = self._seeds(params, keys, n)
        if n > 1:
            self.engine.generate(**prefill_requests(texts, images))
        stop = self.stop_token_ids or None
        outputs = self.engine.generate(**build_requests(texts, images, seeds, params, stop_token_ids=stop))
        lengths = mask.sum(dim=1).tolist()  # host sync: small metadata
        for r, out in enumerate(outputs):
            got = out.get("meta_info", {}).get("prompt_tokens")
            if got is not None and int(got) != int(lengths[r // n]):
                raise ValueError(
                    f"SGLang read prompt {r // n} as {got} tokens, the trainer as {lengths[r // n]}: its processor "
                    "resized the images differently (check model.min_pixels / max_pixels against the checkpoint's "
                    "preprocessor_config.json) or the chat template differs"
                )
        parts = regroup_outputs(
            outputs,
            B,
            n,
            pad_token_id=self.pad_token_id,
            eos_token_ids=self.stop_token_ids,
            vision_token_ids=self.vision_token_ids,
        )
        grid = batch_field(batch, "image_grid_thw")
        vision_start = self.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        return Rollouts(
            prompt_ids=ids.repeat_interleave(n, dim=0),
            prompt_mask=mask.repeat_interleave(n, dim=0),
            group_index=torch.arange(B).repeat_interleave(n),
            group_keys=keys,
            is_mutated=torch.zeros(B * n, dtype=torch.bool),
            pixel_values=batch_field(batch, "pixel_values"),
            image_grid_thw=grid,
            images_per_prompt=((ids == vision_start) & mask.bool()).sum(dim=1),
            num_generations=n,
            extras={"sampling_seeds": seeds},
            **{k: v.to(ids.device) for k, v in parts.items()},
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Push the policy's weights (transformers names) in buckets of about ``bucket_bytes``, cast to the
        engine's dtype, inside one weight-update session; the prefix cache is flushed with the last bucket.
        Then read every parameter back (:class:`PushCheck`) and raise naming any that did not land."""
        if self.asleep:
            raise RuntimeError("SGLangEngine.update_weights while asleep: its weight memory is released; wake it first")
        from sglang.srt.managers.mm_utils import tensor_hash

        check = PushCheck(tensor_hash=tensor_hash)
        _ok(self.engine.begin_weight_update(), "begin_weight_update")
        for bucket, last in buckets(named_tensors, dtype=self.dtype, bucket_bytes=self.bucket_bytes):
            for name, t in bucket:
                check.add(name, t)
            _ok(self.engine.update_weights_from_tensor(bucket, flush_cache=last), "update_weights_from_tensor")
        _ok(self.engine.end_weight_update(), "end_weight_update")
        self.weights_released = False
        self.last_push_checked = check.verify(self._checksums())

    def _checksums(self) -> dict[str, str]:
        """The engine's hash of every parameter (sglang's weight checker; the engine does not wrap it, so its
        tokenizer manager is called the way ``Engine``'s own methods call it)."""
        from sglang.srt.managers.io_struct import CheckWeightsReqInput

        manager = self.engine.tokenizer_manager
        ok, message, ranks, _ = self.engine.loop.run_until_complete(
            manager.check_weights(CheckWeightsReqInput(action="checksum"), None)
        )
        if not ok or not ranks:
            raise RuntimeError(f"SGLang could not read its weights back (check_weights): {message}")
        return dict(ranks[0]["checksums"])

    def sleep(self) -> None:
        """Release the KV cache, CUDA graphs and weights; without a CPU backup the weights must be pushed again."""
        if self.asleep:
            return
        self.engine.release_memory_occupation(tags=list(MEMORY_TAGS))
        self.asleep = True
        if not self.keeps_weights_asleep:
            self.weights_released = True
            self.weights_version = None

    def wake(self) -> None:
        """Take the released memory back (weights are contentless until the next push without a backup)."""
        if not self.asleep:
            return
        self.engine.resume_memory_occupation(tags=list(MEMORY_TAGS))
        self.asleep = False

    def shutdown(self) -> None:
        self.engine.shutdown()


def _ok(result: Any, call: str) -> None:
    """Raise when an engine call reports ``(False, message)``."""
    if isinstance(result, tuple) and len(result) >= 2 and result[0] is False:
        raise RuntimeError(f"SGLang {call} failed: {result[1]}")
