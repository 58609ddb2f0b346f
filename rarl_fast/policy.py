"""The policy as training sees it: one module forward = re-score the rollouts + fused lm_head + GRPO loss.

:func:`completion_states` runs the language model over prompt + completion of every row and keeps the hidden
states that predict the completion tokens. The vision tower runs once per prompt (not per sample) and its
features are gathered into the G rows of each group; positions are the explicit 3-D mRoPE positions that
generation used, so re-scored log-probs match the engine's sampling log-probs. The lm_head is not applied:
the hidden states go to the fused lm_head + log-prob / GRPO loss of ``rarl_kernels``, so the [tokens x vocab]
logits are never stored.

:class:`PolicyModule` wraps both in one module forward, so DDP's gradient hooks and FSDP's unsharding of the
root module's parameters (the lm_head among them) cover the fused loss, which reads ``lm_head.weight``
directly instead of calling the lm_head. The same forward gives the reference's and the old policy's
log-probs (``mode="logprobs"``) and SFT's negative log-likelihood (``mode="nll"``).

Aggregation over a whole optimizer step (docs/method.md section 4): every micro-batch's loss is scaled so that
the gradients summed over micro-batches and averaged over ranks (DDP) equal the gradient of the step's loss:
token-mean over all completion tokens of the step (``bnpo``/``dapo``/``cispo``/``vespo``, via
``num_items_in_batch``), mean of row means over all rows (``grpo``/``sapo``), sum / all rows (``luspo``), or
sum / (all rows * max_completion_length) (``dr_grpo``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rarl_fast.rollout.base import Rollouts
from rarl_fast.rollout.positions import completion_positions, mrope_positions
from rarl_kernels import fused_linear_grpo_loss, fused_linear_logprobs
from rarl_kernels.loss_types import AGGREGATION, ROW_NORMALIZED

if TYPE_CHECKING:
    from rarl_fast.config import Config

__all__ = ["CompletionStates", "LossSettings", "PolicyModule", "StepCounts", "completion_states", "logprobs_ref"]

# ``cfg.loss`` fields passed to `fused_linear_grpo_loss` under the same name.
_KERNEL_OPTIONS = (
    "importance_sampling_level",
    "delta",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "bias_correction_kl",
)


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

@dataclass(frozen=True)
class LossSettings:
    """Plain values of ``cfg.loss`` plus the sampling temperature and completion limit (built by the runtime)."""

    beta_kl: float
    eps_low: float
    eps_high: float
    loss_type: str
    temperature: float
    max_completion_length: int
    impl: str | None  # None: the kernels' default for the device
    options: dict[str, Any] = field(default_factory=dict)  # the kernels' other loss options (cfg.loss's TRL names)

    @classmethod
    def from_config(cls, cfg: Config) -> LossSettings:
        """The settings of ``cfg.loss`` with ``cfg.rollout``'s temperature and completion limit."""
        loss = cfg.loss
        return cls(
            beta_kl=loss.beta_kl,
            eps_low=loss.eps_low,
            eps_high=loss.eps_high,
            loss_type=loss.loss_type,
            temperature=cfg.rollout.temperature,
            max_completion_length=cfg.rollout.max_new_tokens,
            impl=None if loss.impl == "auto" else loss.impl,
            options={k: getattr(loss, k) for k in _KERNEL_OPTIONS},
        )


@dataclass(frozen=True)
class StepCounts:
    """Global sizes of one optimizer step (all micro-batches, all ranks)."""

    tokens: int  # completion tokens
    rows: int  # completions
    world_size: int = 1


class PolicyModule(nn.Module):
    """Wraps a transformers Qwen2.5-VL model; what accelerate prepares for training."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _head(self) -> tuple[Tensor, Tensor | None]:
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def forward(
        self,
        rollouts: Rollouts,
        *,
        mode: str = "loss",
        advantages: Tensor | None = None,
        logp_old: Tensor | None = None,
        logp_ref: Tensor | None = None,
        settings: LossSettings | None = None,
        counts: StepCounts | None = None,
        temperature: float = 1.0,
        impl: str | None = None,
    ):
        """``mode="loss"``: (scaled loss, metrics) of the rows; ``"logprobs"``: [R, T] fp32 log-probs (0 off mask);
        ``"nll"``: (summed negative log-likelihood of the completion tokens, token count) for SFT.

        Args:
            rollouts: R rows (a micro-batch); advantages [R]; logp_old, logp_ref [R, T] or None.
        """
        states = completion_states(self.model, rollouts)
        weight, bias = self._head()
        R, T, H = states.hidden.shape
        if mode in ("logprobs", "nll"):
            labels = torch.where(states.mask, states.labels, -100)
            logp = fused_linear_logprobs(
                states.hidden.reshape(R * T, H),
                weight,
                labels.reshape(-1),
                temperature=temperature,
                bias=bias,
                impl=impl,
            ).view(R, T)
            if mode == "logprobs":
                return logp
            return -logp.sum(), states.mask.sum()
        if mode != "loss":
            raise ValueError(f"unknown mode {mode!r}")
        if settings is None:
            raise ValueError('mode="loss" needs settings')
        s = settings
        c = counts or StepCounts(tokens=int(states.mask.sum()), rows=R)
        # bnpo is the token mean over the whole step here, which the kernels call dapo (with num_items_in_batch)
        kernel_type = "dapo" if s.loss_type in ("bnpo", "dapo") else s.loss_type
        loss, metrics = fused_linear_grpo_loss(
            states.hidden,
            weight,
            states.labels,
            states.mask,
            advantages,
            bias=bias,
            logp_old=logp_old,
            logp_ref=logp_ref,
            eps_low=s.eps_low,
            eps_high=s.eps_high,
            beta=s.beta_kl,
            loss_type=kernel_type,
            max_completion_length=s.max_completion_length,
            num_items_in_batch=c.tokens,
            world_size=c.world_size,
            temperature=s.temperature,
            impl=s.impl,
            **s.options,
        )
        if AGGREGATION[kernel_type] in ROW_NORMALIZED:  # the kernel divides by this call's rows: rescale to the step's
            loss = loss * (R * c.world_size / max(c.rows, 1))
        return loss, metrics
