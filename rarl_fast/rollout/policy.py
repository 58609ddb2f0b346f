"""The policy forward used by training: :class:`Rollouts` -> hidden states of the completion tokens only.

The vision tower runs once per prompt (not per sample) and its features are gathered into the G rows of
each group; positions are the explicit 3-D mRoPE positions that generation used, so re-scored log-probs
match the engine's sampling log-probs. The lm_head is NOT applied here: the hidden states go to the fused
lm_head + log-prob / GRPO loss of ``rarl_kernels`` so that [tokens x vocab] logits are never stored.
The same function gives the reference's and the old policy's log-probs; ``rarl_fast.rl.loss.PolicyModule``
wraps it (with the fused loss) in one module forward for DDP/FSDP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rarl_fast.rollout.base import Rollouts
from rarl_fast.rollout.positions import completion_positions, mrope_positions

__all__ = ["CompletionStates", "completion_states", "logprobs_ref"]


@dataclass
class CompletionStates:
    """Inputs of the fused lm_head loss. R rows, T completion positions, H hidden size."""

    hidden: Tensor  # [R, T, H] last hidden state that predicts each completion token
    labels: Tensor  # [R, T] long, the completion tokens
    mask: Tensor  # [R, T] bool, real completion tokens


def _image_features(model: nn.Module, pixel_values: Tensor, grid: Tensor) -> Tensor:
    """[image_tokens, H] merged vision features of all images, in order."""
    out = model.model.get_image_features(pixel_values, grid)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, list | tuple):
        feats = torch.cat(list(feats), dim=0)
    return feats


def _first_rows(group_index: Tensor, num_prompts: int) -> Tensor:
    """[B] index of the first row of each prompt."""
    first = torch.full((num_prompts,), group_index.numel(), dtype=torch.long, device=group_index.device)
    rows = torch.arange(group_index.numel(), device=group_index.device)
    return first.scatter_reduce(0, group_index, rows, reduce="amin")


def completion_states(model: nn.Module, rollouts: Rollouts) -> CompletionStates:
    """Run the language model over prompt + completion of every row; keep the completion part.

    ``model`` is a transformers Qwen2.5-VL ``...ForConditionalGeneration`` (its ``.model.language_model``,
    ``.model.get_image_features`` and input embeddings are used).
    """
    cfg = model.config
    ro = rollouts
    P = ro.prompt_ids.shape[1]
    T = ro.completion_ids.shape[1]
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], dim=1)
    attn = torch.cat([ro.prompt_mask, ro.completion_mask.to(ro.prompt_mask.dtype)], dim=1)

    # Positions: computed on one row per prompt, then gathered to its G rows.
    first = _first_rows(ro.group_index, ro.num_prompts)
    merge = int(getattr(cfg.vision_config, "spatial_merge_size", 2))
    prompt_pos, deltas = mrope_positions(
        ro.prompt_ids[first],
        ro.prompt_mask[first],
        ro.image_grid_thw,
        image_token_id=cfg.image_token_id,
        merge_size=merge,
    )
    num_real = ro.prompt_mask.sum(dim=1)
    positions = torch.cat(
        [prompt_pos[:, ro.group_index], completion_positions(num_real, deltas[ro.group_index], T)], dim=2
    )

    embeds = model.get_input_embeddings()(ids)
    if ro.pixel_values is not None and ro.image_grid_thw is not None and ro.image_grid_thw.numel() > 0:
        feats = _image_features(model, ro.pixel_values, ro.image_grid_thw).to(embeds.dtype)
        # Gather each row's prompt features: prompt b owns feats[offset[b] : offset[b] + count[b]].
        per_image = ro.image_grid_thw.prod(dim=1) // (merge * merge)
        owner = torch.repeat_interleave(torch.arange(ro.num_prompts, device=ids.device), ro.images_per_prompt)
        count = torch.zeros(ro.num_prompts, dtype=torch.long, device=ids.device).index_add_(0, owner, per_image)
        offset = torch.cumsum(count, 0) - count
        row_count = count[ro.group_index]
        starts = torch.repeat_interleave(offset[ro.group_index], row_count)
        within = torch.arange(int(row_count.sum()), device=ids.device) - torch.repeat_interleave(
            torch.cumsum(row_count, 0) - row_count, row_count
        )
        image_mask = (ids == cfg.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, feats[starts + within])

    out = model.model.language_model(
        inputs_embeds=embeds, attention_mask=attn, position_ids=positions, use_cache=False, return_dict=True
    )
    hidden = out.last_hidden_state[:, P - 1 : P + T - 1]
    return CompletionStates(hidden=hidden, labels=ro.completion_ids, mask=ro.completion_mask)


def logprobs_ref(states: CompletionStates, lm_head: nn.Module, temperature: float = 1.0) -> Tensor:
    """[R, T] float32 log-probs of the labels from full logits (plain torch; tests and small shapes only).
    Positions outside ``mask`` are 0."""
    logits = lm_head(states.hidden).float() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, states.labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(states.mask, logp, 0.0)
