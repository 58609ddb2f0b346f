"""Our Hugging Face rollout engine: images encoded and the prompt pre-filled ONCE per prompt, then the G samples
of each prompt decode together over that one prompt KV cache (:mod:`rarl_fast.rollout.shared_prefix`).

``model.generate(..., num_return_sequences=G)`` copies every prompt (and its images) G times before the
pre-fill; with up to 8 images per prompt that is most of a rollout's compute. Here the vision tower and the
pre-fill see B prompts, not B * G, and decode attention reads each prompt's keys and values once for its G
samples instead of G copies. Sampling follows transformers' rules (temperature -> top-k -> top-p) and the
returned log-probs are those of docs/method.md section 4 (``logits / T`` before truncation), in float32.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from rarl_fast.rollout.base import GenerationParams, Rollouts
from rarl_fast.rollout.positions import completion_positions, mrope_positions
from rarl_fast.rollout.sampling import hashed_uniforms, row_seeds, sample_next
from rarl_fast.rollout.shared_prefix import SharedPrefixDecoder, text_parts

__all__ = ["HFEngine", "batch_field"]

VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def batch_field(batch: Any, name: str, default: Any = None) -> Any:
    """``batch.name`` or ``batch[name]`` (a collated prompt batch or a processor's BatchEncoding)."""
    if isinstance(batch, Mapping):
        return batch.get(name, default)
    return getattr(batch, name, default)


def _group_keys(batch: Any, num_prompts: int) -> list[tuple[str, ...]]:
    groups = batch_field(batch, "groups")
    if groups is not None:
        return [tuple(g.key) for g in groups]
    keys = batch_field(batch, "group_keys")
    if keys is not None:
        return [tuple(k) for k in keys]
    return [(f"prompt-{i}",) for i in range(num_prompts)]


class HFEngine:
    """Shared-prefix group sampling on a transformers Qwen2.5-VL model (CPU or GPU).

    The engine uses the policy module it is given (colocated: no weight copy, so ``update_weights`` is a no-op
    unless it was built with its own copy). With ``params.seed`` set, sampling is counter-based per row
    (see :mod:`rarl_fast.rollout.sampling`): a row's completion depends only on the seed, its group key and
    its sample index. Without it, one generator seeded at construction draws for the whole batch.
    ``shared_prefix_decode=False`` (or a model :func:`text_parts` does not support) decodes through the model's
    own forward over a KV cache copied to the G samples: the reference the shared-prefix path is tested against.
    """

    weights_version: Hashable | None = None  # RolloutEngine: a shared module always holds the current policy

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        eos_token_ids: Iterable[int] | None = None,
        seed: int = 0,
        shared_prefix_decode: bool = True,
    ):
        self.model = model
        self.shared_prefix_decode = shared_prefix_decode
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.vision_start_id = int(cfg.vision_start_token_id)
        self.merge_size = int(getattr(cfg.vision_config, "spatial_merge_size", 2))
        if eos_token_ids is None:
            gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            eos_token_ids = (
                gen_eos
                if isinstance(gen_eos, list | tuple)
                else [gen_eos if gen_eos is not None else tokenizer.eos_token_id]
            )
        self.eos_token_ids = sorted({int(e) for e in eos_token_ids if e is not None})
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0])
        ids = tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
        self.vision_token_ids = sorted({int(i) for i in ids if i is not None and i != tokenizer.unk_token_id})
        self.generator = torch.Generator(device=self._device()).manual_seed(seed)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- RolloutEngine protocol -------------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy tensors into the engine's model (nothing to copy for the policy's own parameters, which it shares:
        the trainer pushes them through ``awake`` before every rollout)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"HFEngine.update_weights: unknown parameter {name!r}")
                if params[name] is not tensor and params[name].data_ptr() != tensor.data_ptr():
                    params[name].copy_(tensor)

    def sleep(self) -> None:
        """Nothing to release: the engine holds no memory of its own between calls."""

    def wake(self) -> None:
        """Nothing to take back."""

    # -- generation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, batch: Any, n: int, params: GenerationParams) -> Rollouts:
        """Sample ``n`` completions for each prompt of ``batch`` (left-padded ``input_ids`` [B, P],
        ``attention_mask`` [B, P], ``pixel_values`` [patches, D], ``image_grid_thw`` [images, 3]; keys from
        ``batch.groups[i].key``). Rows come back prompt-major."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(batch, n, params)
        finally:
            self.model.train(was_training)

    def _forward(self, **kw: Any) -> tuple[Tensor, Any]:
        out = self.model(use_cache=True, logits_to_keep=1, return_dict=True, **kw)
        return out.logits[:, -1], out.past_key_values

    def _decoder(
        self, cache: Any, mask: Tensor, row_mask: Tensor, positions: Tensor, G: int
    ) -> Callable[[Tensor, int], Tensor]:
        """``step(tokens [R], t) -> logits [R, V]``: feed completion token ``t`` of each of the R = B * G rows.

        Args:
            cache: the pre-fill's ``DynamicCache`` of the B prompts.
            mask: [B, P] prompt mask; row_mask: [R, P] the same per row.
            positions: [3, R, T] mRoPE positions of the completion tokens.
        """
        parts = text_parts(self.model) if self.shared_prefix_decode else None
        if parts is not None:
            return SharedPrefixDecoder(*parts, cache, mask, positions, G).step
        cache.batch_repeat_interleave(G)
        ones = torch.ones_like(row_mask[:, :1]).expand(-1, positions.shape[-1])

        def step(tokens: Tensor, t: int) -> Tensor:
            return self._forward(
                input_ids=tokens.unsqueeze(1),
                attention_mask=torch.cat([row_mask, ones[:, : t + 1]], dim=1),
                position_ids=positions[:, :, t : t + 1],
                past_key_values=cache,
            )[0]

        return step

    def _generate(self, batch: Any, n: int, params: GenerationParams) -> Rollouts:
        device = self._device()
        ids = batch_field(batch, "input_ids").to(device)
        mask = batch_field(batch, "attention_mask").to(device)
        pixel_values = batch_field(batch, "pixel_values")
        grid = batch_field(batch, "image_grid_thw")
        pixel_values = pixel_values.to(device) if pixel_values is not None else None
        grid = grid.to(device) if grid is not None else None
        B = ids.shape[0]
        G, R = n, B * n
        keys = _group_keys(batch, B)
        seeds = row_seeds(params.seed, keys, G).to(device) if params.seed is not None else None
        t0 = time.perf_counter()

        # 1. Encode images and pre-fill the B prompts once.
        positions, deltas = mrope_positions(
            ids, mask, grid, image_token_id=self.image_token_id, merge_size=self.merge_size
        )
        logits, cache = self._forward(
            input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixel_values, image_grid_thw=grid
        )
        prefill_s = time.perf_counter() - t0

        # 2. Decode the G samples of each prompt over its shared prefix.
        row_mask = mask.repeat_interleave(G, dim=0)
        num_real = row_mask.sum(dim=1)
        row_deltas = deltas.repeat_interleave(G)
        logits = logits.repeat_interleave(G, dim=0)
        step = self._decoder(
            cache, mask, row_mask, completion_positions(num_real, row_deltas, params.max_new_tokens), G
        )
        eos = torch.tensor(self.eos_token_ids, device=device)
        vision = torch.tensor(self.vision_token_ids, device=device)

        tokens, logps, valid = [], [], []
        finished = torch.zeros(R, dtype=torch.bool, device=device)
        vision_cut = torch.zeros(R, dtype=torch.bool, device=device)
        for t in range(params.max_new_tokens):
            tok, lp = sample_next(
                logits,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                greedy=params.greedy,
                generator=self.generator,
                uniforms=hashed_uniforms(seeds, t) if seeds is not None else None,
            )
            live = ~finished
            cut = live & torch.isin(tok, vision)
            vision_cut |= cut
            live &= ~cut
            tok = torch.where(live, tok, self.pad_token_id)
            tokens.append(tok)
            logps.append(torch.where(live, lp, 0.0))
            valid.append(live)
            finished |= cut | (live & torch.isin(tok, eos))
            if t + 1 == params.max_new_tokens or bool(finished.all()):  # host sync: early stop
                break
            logits = step(tok, t)
        completion_mask = torch.stack(valid, dim=1)
        return Rollouts(
            prompt_ids=ids.repeat_interleave(G, dim=0),
            prompt_mask=row_mask,
            completion_ids=torch.stack(tokens, dim=1),
            completion_mask=completion_mask,
            sampling_logp=torch.stack(logps, dim=1),
            group_index=torch.arange(B, device=device).repeat_interleave(G),
            group_keys=keys,
            is_mutated=torch.zeros(R, dtype=torch.bool, device=device),
            truncated=~finished,
            vision_cut=vision_cut,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            images_per_prompt=((ids == self.vision_start_id) & mask.bool()).sum(dim=1),
            num_generations=G,
            extras={"prefill_s": prefill_s, "total_s": time.perf_counter() - t0},
        )
