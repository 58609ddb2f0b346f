"""SGLang offline-``Engine`` rollout backend (GPU only; NOT yet verified on hardware, see README).

Group sampling uses SGLang's parallel sampling (``n = G``), which pre-fills each prompt once and keeps it in
the radix cache for its G samples. Requests carry the chat text with ONE vision placeholder per image
(SGLang expands it) and the images as one list per prompt; outputs come back prompt-major and are regrouped
into :class:`Rollouts`. Log-probs: SGLang returns ``log softmax(logits / T)`` by default, docs/method.md section 4's
rule; ``SGLANG_RETURN_ORIGINAL_LOGPROB`` must stay unset. Weights are pushed with
``update_weights_from_tensor`` under SGLang's checkpoint names; memory is released while the trainer updates.

Everything except the engine itself (request building, regrouping, name mapping) is plain Python and is
tested on CPU.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from rarl_fast.rollout.base import GenerationParams, Rollouts
from rarl_fast.rollout.hf import VISION_SPECIAL_TOKENS, _group_keys, batch_field

__all__ = [
    "SGLangEngine",
    "build_requests",
    "collapse_image_placeholders",
    "regroup_outputs",
    "require_sglang",
    "to_sglang_name",
]

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
_PAD_RUN = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")


def require_sglang() -> None:
    """Raise a clear error naming what is missing for the SGLang backend."""
    missing = []
    if importlib.util.find_spec("sglang") is None:
        missing.append("the sglang package (pip install 'rarl-fast[sglang]')")
    if not torch.cuda.is_available():
        missing.append("a CUDA device (SGLang's engine has no CPU build)")
    if missing:
        raise RuntimeError("rollout.backend=sglang needs " + " and ".join(missing) + "; use rollout.backend=hf")


def to_sglang_name(name: str) -> str:
    """transformers 5.x Qwen2.5-VL parameter name -> the checkpoint layout SGLang loads.

    ``model.language_model.X`` -> ``model.X``; ``model.visual.X`` -> ``visual.X``; ``lm_head.*`` unchanged.
    Names already in checkpoint layout pass through.
    """
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def collapse_image_placeholders(prompt_text: str) -> str:
    """A processor-expanded prompt (one ``<|image_pad|>`` per visual token) -> one placeholder per image."""
    return _PAD_RUN.sub(IMAGE_PLACEHOLDER, prompt_text)


def build_requests(
    prompt_texts: Sequence[str],
    images: Sequence[Sequence[Any]],
    n: int,
    params: GenerationParams,
    stop_token_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """Keyword arguments of ``sglang.Engine.generate`` for B prompts sampled ``n`` times each.

    Args:
        prompt_texts: [B] chat-template texts with one vision placeholder per image.
        images: [B] lists of images (PIL images or paths), in image-id order.
        stop_token_ids: EOS ids that end a completion (besides the model's own).
    """
    if len(prompt_texts) != len(images):
        raise ValueError(f"{len(prompt_texts)} prompts but {len(images)} image lists")
    for i, (text, imgs) in enumerate(zip(prompt_texts, images)):
        if text.count(IMAGE_PLACEHOLDER) != len(imgs):
            raise ValueError(f"prompt {i} has {text.count(IMAGE_PLACEHOLDER)} placeholders for {len(imgs)} images")
    sampling: dict[str, Any] = {
        "n": n,
        "max_new_tokens": params.max_new_tokens,
        "temperature": 0.0 if params.greedy else params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if stop_token_ids:
        sampling["stop_token_ids"] = [int(t) for t in stop_token_ids]
    if params.seed is not None:
        sampling["sampling_seed"] = params.seed
    return {
        "prompt": list(prompt_texts),
        "image_data": [list(imgs) for imgs in images],
        "sampling_params": sampling,
        "return_logprob": True,
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
    """Colocated SGLang engine for the policy at ``model_path`` (a ``save_pretrained`` folder or Hub id)."""

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        mem_fraction_static: float = 0.5,
        dtype: str = "bfloat16",
        seed: int = 0,
        eos_token_ids: Iterable[int] | None = None,
        **engine_kwargs: Any,
    ):
        require_sglang()
        import sglang

        self.tokenizer = tokenizer
        self.engine = sglang.Engine(
            model_path=model_path,
            dtype=dtype,
            mem_fraction_static=mem_fraction_static,
            random_seed=seed,
            enable_memory_saver=True,
            **engine_kwargs,
        )
        ids = tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
        self.vision_token_ids = [int(i) for i in ids if i is not None and i != tokenizer.unk_token_id]
        self.eos_token_ids = sorted(set(eos_token_ids or [tokenizer.eos_token_id]))
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0])

    def _prompt_texts(self, batch: Any) -> list[str]:
        texts = batch_field(batch, "prompt_texts")
        if texts is not None:
            return [collapse_image_placeholders(t) for t in texts]
        ids, mask = batch_field(batch, "input_ids"), batch_field(batch, "attention_mask")
        return [collapse_image_placeholders(self.tokenizer.decode(row[m.bool()])) for row, m in zip(ids, mask)]

    def generate(self, batch: Any, n: int, params: GenerationParams) -> Rollouts:
        images = batch_field(batch, "images")
        if images is None:
            raise ValueError("the SGLang backend needs the prompt batch's images (batch.images: one list per prompt)")
        ids, mask = batch_field(batch, "input_ids"), batch_field(batch, "attention_mask")
        B = ids.shape[0]
        request = build_requests(self._prompt_texts(batch), images, n, params, stop_token_ids=self.eos_token_ids)
        outputs = self.engine.generate(**request)
        parts = regroup_outputs(
            outputs,
            B,
            n,
            pad_token_id=self.pad_token_id,
            eos_token_ids=self.eos_token_ids,
            vision_token_ids=self.vision_token_ids,
        )
        grid = batch_field(batch, "image_grid_thw")
        vision_start = self.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        return Rollouts(
            prompt_ids=ids.repeat_interleave(n, dim=0),
            prompt_mask=mask.repeat_interleave(n, dim=0),
            group_index=torch.arange(B).repeat_interleave(n),
            group_keys=_group_keys(batch, B),
            is_mutated=torch.zeros(B * n, dtype=torch.bool),
            pixel_values=batch_field(batch, "pixel_values"),
            image_grid_thw=grid,
            images_per_prompt=((ids == vision_start) & mask.bool()).sum(dim=1),
            num_generations=n,
            **parts,
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int = 1 << 29) -> None:
        """Push weights in buckets of about ``bucket_bytes``, mapped to SGLang's names; cache flushed once."""
        has_session = hasattr(self.engine, "begin_weight_update")
        if has_session:
            self.engine.begin_weight_update()
        bucket: list[tuple[str, Tensor]] = []
        size = 0
        for name, tensor in named_tensors:
            bucket.append((to_sglang_name(name), tensor.detach()))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                self.engine.update_weights_from_tensor(bucket, flush_cache=False)
                bucket, size = [], 0
        self.engine.update_weights_from_tensor(bucket, flush_cache=True)
        if has_session:
            self.engine.end_weight_update()

    def sleep(self) -> None:
        self.engine.release_memory_occupation()

    def wake(self) -> None:
        self.engine.resume_memory_occupation()

    def shutdown(self) -> None:
        self.engine.shutdown()
