"""Our Hugging Face rollout engine: images encoded and the prompt pre-filled ONCE per prompt, then the G samples
of each prompt decode together over that one prompt KV cache (:mod:`rarl_fast.rollout.shared_prefix`).

``model.generate(..., num_return_sequences=G)`` copies every prompt (and its images) G times before the
pre-fill; with up to 8 images per prompt that is most of a rollout's compute. Here the vision tower and the
pre-fill see B prompts, not B * G, and decode attention reads each prompt's keys and values once for its G
samples instead of G copies. Sampling follows transformers' rules (temperature -> top-k -> top-p) and the
returned log-probs are those of docs/method.md section 4 (``logits / T`` before truncation), in float32.

The decode step has static shapes and samples inside (:mod:`rarl_fast.rollout.decode`), so ``compile``
(``rollout.compile``) can run it through ``torch.compile``, replayed as CUDA graphs on GPU with
``reduce-overhead``; compiled and eager steps sample the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from rarl_fast.config import RolloutCompile
from rarl_fast.rollout.base import GenerationParams, Rollouts
from rarl_fast.rollout.decode import (
    Arena,
    DecodeOutputs,
    DecodeRows,
    TokenRule,
    new_outputs,
    new_rows,
    sample_and_record,
)
from rarl_fast.rollout.positions import completion_positions, mrope_positions
from rarl_fast.rollout.sampling import row_seeds
from rarl_fast.rollout.shared_prefix import SharedPrefixDecoder, compile_step, text_parts

__all__ = ["HFEngine", "batch_field"]

VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Decode steps between host syncs (the all-finished check and the bucket choice) on an accelerator, where a sync
# is a pipeline bubble and a few steps past the last EOS cost less; on the CPU a sync is free: every step.
SYNC_EVERY_ACCELERATOR = 8


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


class _ModelForwardDecoder:
    """Decode through the model's own forward over the pre-fill cache copied to the G samples (eager only): the
    reference the shared-prefix decoder is tested against, and the path for models :func:`text_parts` does not
    support."""

    def __init__(
        self,
        forward: Callable[..., tuple[Tensor, Any]],
        cache: Any,
        row_mask: Tensor,
        positions: Tensor,
        rows: DecodeRows,
        out: DecodeOutputs,
        sample: Callable[[Tensor, DecodeRows, Tensor], None],
        G: int,
    ):
        """``row_mask`` [R, P] prompt mask per row; ``positions`` [3, R, T] mRoPE positions of the completion
        tokens; ``sample(logits, rows, step)`` records the next token."""
        cache.batch_repeat_interleave(G)
        self.forward, self.cache, self.row_mask, self.positions = forward, cache, row_mask, positions
        self.rows, self.out, self.sample = rows, out, sample
        self.ones = torch.ones_like(row_mask[:, :1]).expand(-1, positions.shape[-1])
        self.t = 0

    def advance(self) -> None:
        t = self.t
        logits = self.forward(
            input_ids=self.rows.last.unsqueeze(1),
            attention_mask=torch.cat([self.row_mask, self.ones[:, : t + 1]], dim=1),
            position_ids=self.positions[:, :, t : t + 1],
            past_key_values=self.cache,
        )[0]
        self.sample(logits, self.rows, torch.full((1,), t + 1, device=logits.device))
        self.t += 1

    def compact(self) -> None:
        """Rows are never moved here."""


class HFEngine:
    """Shared-prefix group sampling on a transformers Qwen2.5-VL model (CPU or GPU).

    The engine uses the policy module it is given (colocated: no weight copy, so ``update_weights`` is a no-op
    unless it was built with its own copy). Sampling is counter-based per row (see
    :mod:`rarl_fast.rollout.sampling`): with ``params.seed`` set, a row's completion depends only on the seed, its
    group key and its sample index; without it, each call draws its seed from a generator seeded at
    construction. ``shared_prefix_decode=False`` (or a model :func:`text_parts` does not support) decodes through
    the model's own forward over a KV cache copied to the G samples: the reference the shared-prefix path is
    tested against. ``compile`` (``off``, ``default``, ``reduce-overhead``) compiles the shared-prefix decode
    step (:func:`~rarl_fast.rollout.shared_prefix.compile_step`); a compiled engine keeps its decode buffers
    between calls, asleep too (the KV of the largest batch so far), so that its CUDA graphs stay valid.
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
        compile: RolloutCompile = "off",
    ):
        self.model = model
        self.shared_prefix_decode = shared_prefix_decode
        self.compile = compile
        self._step = compile_step(compile)
        self._arena = Arena()
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
        self.generator = torch.Generator().manual_seed(seed)

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
        """Nothing released: an eager engine holds no memory between calls, and a compiled one keeps its decode
        buffers on purpose (its CUDA graphs point at them; new buffers would re-record every graph each step)."""

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
            if self.compile == "off":
                self._arena.clear()  # eager steps gain nothing from stable addresses

    def _forward(self, **kw: Any) -> tuple[Tensor, Any]:
        out = self.model(use_cache=True, logits_to_keep=1, return_dict=True, **kw)
        return out.logits[:, -1], out.past_key_values

    def _generate(self, batch: Any, n: int, params: GenerationParams) -> Rollouts:
        device = self._device()
        ids = batch_field(batch, "input_ids").to(device)
        mask = batch_field(batch, "attention_mask").to(device)
        pixel_values = batch_field(batch, "pixel_values")
        grid = batch_field(batch, "image_grid_thw")
        pixel_values = pixel_values.to(device) if pixel_values is not None else None
        grid = grid.to(device) if grid is not None else None
        B = ids.shape[0]
        G, R, T = n, B * n, params.max_new_tokens
        keys = _group_keys(batch, B)
        seed = params.seed if params.seed is not None else int(torch.randint(1 << 62, (1,), generator=self.generator))
        t0 = time.perf_counter()

        # 1. Encode images and pre-fill the B prompts once.
        positions, deltas = mrope_positions(
            ids, mask, grid, image_token_id=self.image_token_id, merge_size=self.merge_size
        )
        logits, cache = self._forward(
            input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixel_values, image_grid_thw=grid
        )
        prefill_s = time.perf_counter() - t0

        # 2. The first token of each row from the prompt's logits, then the G samples of each prompt decode
        #    together over its shared prefix, one (compiled) step per token.
        row_mask = mask.repeat_interleave(G, dim=0)
        num_real, row_deltas = row_mask.sum(dim=1), deltas.repeat_interleave(G)
        rule = TokenRule(params.temperature, params.top_k, params.top_p, self.pad_token_id)
        stop_ids = torch.tensor(self.eos_token_ids or [-1], device=device)
        cut_ids = torch.tensor(self.vision_token_ids or [-1], device=device)

        def sample(step_logits: Tensor, rows: DecodeRows, step: Tensor) -> None:
            sample_and_record(step_logits, rows, out, rule, stop_ids, cut_ids, step)

        out = new_outputs(self._arena, R, T, self.pad_token_id, device)
        rows = new_rows(self._arena, row_seeds(seed, keys, G).to(device), num_real + row_deltas, params.greedy)
        sample(logits.repeat_interleave(G, dim=0), rows, torch.zeros(1, dtype=torch.long, device=device))
        parts = text_parts(self.model) if self.shared_prefix_decode else None
        if parts is not None:
            decoder: SharedPrefixDecoder | _ModelForwardDecoder = SharedPrefixDecoder(
                *parts, self._step, self._arena, cache, mask, rows, out, rule, stop_ids, cut_ids
            )
        else:
            positions = completion_positions(num_real, row_deltas, T)
            decoder = _ModelForwardDecoder(self._forward, cache, row_mask, positions, rows, out, sample, G)
        del cache, logits  # the shared-prefix decoder holds its own copy of the prompts' KV
        sync_every = 1 if device.type == "cpu" else SYNC_EVERY_ACCELERATOR
        steps = 0
        for t in range(T - 1):
            if t % sync_every == 0:
                if bool(decoder.rows.finished.all()):  # host sync: early stop
                    break
                decoder.compact()
            decoder.advance()
            steps += 1
        width = int(out.ended_at[:R].clamp_max(T - 1).max()) + 1  # host sync: the longest row sets the width
        return Rollouts(
            prompt_ids=ids.repeat_interleave(G, dim=0),
            prompt_mask=row_mask,
            completion_ids=out.tokens[:R, :width].clone(),
            completion_mask=out.valid[:R, :width].clone(),
            sampling_logp=out.logp[:R, :width].clone(),
            group_index=torch.arange(B, device=device).repeat_interleave(G),
            group_keys=keys,
            is_mutated=torch.zeros(R, dtype=torch.bool, device=device),
            truncated=out.ended_at[:R] == T,
            vision_cut=out.cut[:R].clone(),
            pixel_values=pixel_values,
            image_grid_thw=grid,
            images_per_prompt=((ids == self.vision_start_id) & mask.bool()).sum(dim=1),
            num_generations=G,
            extras={
                "prefill_s": prefill_s,
                "decode_steps": steps,
                "total_s": time.perf_counter() - t0,
            },
        )
