"""Our fused kernels inside TRL 1.15+ (CI verifies TRL 1.16), in two independent ways.

`patch_trl()` swaps the kernel of TRL's fused lm-head. From 1.15 on, TRL's trainers add a fused lm-head to the
policy and reference models (`trl.trainer.utils.add_fused_lm_head`), whose forward hands the last hidden states
and the head's weight to `trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets,
temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`, a name it looks up on every call.
`ChunkedLogProbFunction` here takes those arguments and returns the same five per-token outputs (log-probs,
entropy, log sum p^2, mean logit, target-is-argmax; `None` for those not requested), computed by
`rarl_kernels.fused_linear_logprob_stats` in one fused pass. `patch_trl()` binds it to that name; everything else in
TRL runs as shipped.

`FusedGRPOTrainer` (or `FusedGRPOLossMixin` in front of your own `GRPOTrainer` subclass) computes the GRPO loss
itself. Its `_compute_loss` runs the model through TRL's own input handling (`_get_per_token_logps_and_entropies`:
text or vision-language inputs, PEFT, FSDP's gathered head, autocast) and, where TRL's lm-head would compute the
log-probs, computes instead the clipped surrogate, the KL term and their gradients from the hidden states and the
head's weight with `rarl_kernels.fused_linear_grpo_loss` (one pass over the vocabulary; the head is still gathered
there under DeepSpeed ZeRO-3). The loss is normalized as TRL normalizes it (loss type, `num_items_in_batch`,
gradient accumulation, processes) and TRL's metrics are logged under TRL's names. What the fused kernels do not
implement runs TRL's own `_compute_loss`, with one warning naming the reason: a loss type, option or combination
the kernels lack (asked of the kernels: `LOSS_TYPES`, `LossOptions` and `check_loss_options`; today cispo, sapo
and vespo with sequence-level importance sampling), the high-entropy token mask, the off-policy sequence mask, an
entropy bonus, a MoE load-balancing loss, per-token advantages, and models whose logits are soft-capped or scaled.
Every TRL 1.16 loss type (grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo) runs fused, with `delta`,
sequence-level importance sampling, the KL bias correction and vLLM's importance weights.

The two combine: with both, the no-gradient log-prob passes (old and reference log-probs) also run our kernel.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import trl
import trl.trainer.utils as trl_utils
from trl.kernels import ChunkedLogProbFunction as TRLChunkedLogProbFunction

from rarl_kernels.fused_grpo import fused_linear_grpo_loss
from rarl_kernels.linear_logprobs import fused_linear_logprob_stats
from rarl_kernels.loss_types import LOSS_TYPES, LossOptions, check_loss_options

# TRL's names of the optional per-token outputs, in its order, and ours.
TRL_OUTPUTS = {"entropy": "entropy", "log_sum_sq_probs": "log_sum_sq_probs", "mean_logits": "mean_logit",
               "is_top1": "is_argmax"}  # fmt: skip


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype TRL's head multiplies in: autocast's when autocast is on, else the hidden states'."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


class ChunkedLogProbFunction:
    """Stands in for TRL's `trl.kernels.ChunkedLogProbFunction` (the same `apply`), computed by our kernels."""

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = tuple(TRL_OUTPUTS),
    ) -> tuple[torch.Tensor | None, ...]:
        """hidden [N, H], weight [V, H], bias [V] | None, targets [N] -> (log_probs, entropy, log_sum_sq_probs,
        mean_logits, is_top1), [N] each (fp32; is_top1 bool), None where not in `outputs`. Log-probs and entropy
        are differentiable w.r.t. hidden, weight and bias. `chunk_size` (TRL's vocabulary tile) is accepted and
        not used: our working buffer is bounded in bytes (`rarl_kernels._utils.DEFAULT_CHUNK_BYTES`)."""
        unknown = sorted(set(outputs) - set(TRL_OUTPUTS) - {"log_probs"})
        if unknown:
            raise ValueError(f"unknown outputs {unknown} (known: {('log_probs', *TRL_OUTPUTS)})")
        dtype = _compute_dtype(hidden)
        stats = tuple(ours for name, ours in TRL_OUTPUTS.items() if name in outputs)
        # TRL re-gathers a ZeRO-3 partitioned head in its backward; so do we.
        gather = lambda: trl_utils.maybe_gather_lm_head_ctx(weight, bias)
        with torch.autocast(hidden.device.type, enabled=False):
            out = fused_linear_logprob_stats(
                hidden.to(dtype), weight.to(dtype), targets, bias=bias, temperature=temperature,
                softcap=final_logit_softcapping, logit_scale=logit_scale, stats=stats, backward_context=gather,
            )  # fmt: skip
        return out.logp, *(getattr(out, ours) for ours in TRL_OUTPUTS.values())


def _require_fused_head() -> None:
    if not hasattr(trl_utils, "_ChunkedLogProbFunction"):
        raise RuntimeError(
            f"TRL {trl.__version__} has no fused lm-head (TRL 1.15+ does); for TRL 1.10-1.12 bind "
            "rarl_kernels.FusedLinearGRPOLoss as documented in kernels/README.md"
        )


def patch_trl() -> None:
    """Make TRL's fused lm-head (every TRL 1.15+ trainer's log-prob path) compute with our kernels, from the next
    forward on (TRL looks the kernel up on every call). `unpatch_trl()` restores TRL's own."""
    _require_fused_head()
    trl_utils._ChunkedLogProbFunction = ChunkedLogProbFunction


def unpatch_trl() -> None:
    """Give TRL's fused lm-head its own kernel back."""
    _require_fused_head()
    trl_utils._ChunkedLogProbFunction = TRLChunkedLogProbFunction


@contextlib.contextmanager
def _head_kernel(kernel) -> Iterator[None]:
    """TRL's fused lm-head calls `kernel` for the duration (and whatever was bound before, afterwards)."""
    before = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = kernel
    try:
        yield
    finally:
        trl_utils._ChunkedLogProbFunction = before


# How TRL 1.16's `_compute_loss` normalizes each loss type: divided by the global token count of the accumulation
# window (the rest: by their own per-call normalizer, then by the accumulation steps).
_TOKEN_NORMALIZED = ("dapo", "cispo", "vespo")
_TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# Loss types whose clip-ratio metrics TRL logs.
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# TRL options that the fused kernels take under the same name (`LossOptions`), with the value that turns each off.
_OPTIONS = {"delta": None, "importance_sampling_level": "token", "sapo_temperature_pos": None,
            "sapo_temperature_neg": None, "vespo_k_pos": None, "vespo_lambda_pos": None, "vespo_k_neg": None,
            "vespo_lambda_neg": None}  # fmt: skip


def _kernel_options(trainer) -> tuple[dict, str | None]:
    """The keyword arguments of `fused_linear_grpo_loss` for the trainer's GRPO options that change the loss, and the
    reason the kernels cannot compute it (None when they can): each active option must be one of `LossOptions`,
    and the loss type and importance sampling level a combination the kernels define."""
    params = LossOptions._fields
    args, loss_type = trainer.args, trainer.loss_type
    active = {"delta": args.delta, "importance_sampling_level": trainer.importance_sampling_level}
    if loss_type == "sapo":
        active |= {k: getattr(args, k) for k in ("sapo_temperature_pos", "sapo_temperature_neg")}
    if loss_type == "vespo":
        active |= {k: getattr(args, k) for k in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")}
    kw = {k: v for k, v in active.items() if v != _OPTIONS[k]}
    missing = sorted(k for k in kw if k not in params)
    if missing:
        return kw, f"{', '.join(f'{k}={kw[k]!r}' for k in missing)} (not implemented by the fused kernels)"
    try:
        check_loss_options(loss_type, trainer.importance_sampling_level)
    except ValueError:
        level = trainer.importance_sampling_level
        return kw, f"loss_type={loss_type!r} with importance_sampling_level={level!r} (not in the fused kernels)"
    return kw, None


class _FusedLossHead:
    """Stands in for TRL's head kernel during one `_compute_loss`: computes the fused GRPO loss from the rows TRL
    hands over and returns zero placeholders for TRL's own outputs (the loss is taken from `result`).

    TRL hands over either every position of the B sequences but the last (`positions` each; its layout off Triton
    devices) or only the positions with a label, in order (on Triton devices); the completion's T tokens are the
    last T positions."""

    def __init__(self, labels, positions, loss_fn, previous):
        self.labels, self.positions, self.loss_fn, self.previous = labels, positions, loss_fn, previous
        self.result, self.unsupported = None, None

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=tuple(TRL_OUTPUTS)):  # fmt: skip
        (B, T), (rows_in, H) = self.labels.shape, hidden.shape
        valid = self.labels != -100
        if final_logit_softcapping is not None or logit_scale != 1.0:
            self.unsupported = "a model whose logits are soft-capped or scaled (the fused loss forms plain logits)"
        elif rows_in not in (B * self.positions, int(valid.sum())):
            self.unsupported = f"{rows_in} lm-head rows for {B} sequences (context or sequence parallelism?)"
        if self.unsupported is not None:
            return self.previous.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)  # fmt: skip
        if rows_in == B * self.positions:
            rows = hidden.view(B, self.positions, H)[:, self.positions - T :]
        else:
            rows = hidden.new_zeros(B, T, H).masked_scatter(valid[..., None], hidden)
        dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            self.result = self.loss_fn(rows.to(dtype), weight.to(dtype), bias, temperature)
        zeros = lambda dt: hidden.new_zeros(rows_in, dtype=dt)
        return zeros(torch.float32), *(
            (zeros(torch.bool if k == "is_top1" else torch.float32) if k in outputs else None) for k in TRL_OUTPUTS
        )


class FusedGRPOLossMixin:
    """Put in front of `trl.GRPOTrainer` (TRL 1.15+): the GRPO loss and its gradients come from one fused pass over
    the vocabulary (`rarl_kernels.fused_linear_grpo_loss`), normalized and logged as TRL does; see the module
    docstring for what falls back to TRL's own loss."""

    _rarl_disabled: str | None = None
    _rarl_warned: bool = False

    def _compute_loss(self, model, inputs):
        reason = self._fused_loss_unsupported(inputs)
        if reason is None:
            loss = self._fused_loss(model, inputs)
            if loss is not None:
                return loss
            reason = self._rarl_disabled
        if not self._rarl_warned:
            warnings.warn(f"FusedGRPOLossMixin: TRL's own loss runs for {reason}", stacklevel=2)
            self._rarl_warned = True
        return super()._compute_loss(model, inputs)

    def _fused_loss_unsupported(self, inputs) -> str | None:
        """Why the fused loss cannot compute this call (None when it can)."""
        if self._rarl_disabled is not None:
            return self._rarl_disabled
        if self.loss_type not in _TRL_LOSS_TYPES:
            return f"loss_type={self.loss_type!r} (unknown to this mixin)"
        if self.loss_type not in LOSS_TYPES:
            return f"loss_type={self.loss_type!r} (the fused kernels implement {LOSS_TYPES})"
        _, missing = _kernel_options(self)
        checks = [
            (missing is not None, missing),
            (self.top_entropy_quantile < 1.0, "top_entropy_quantile < 1 (its mask needs every entropy first)"),
            (self.off_policy_mask_threshold is not None, "off_policy_mask_threshold (its mask needs logps first)"),
            (self._entropy_bonus_enabled, "an entropy bonus (it needs the entropy's gradient)"),
            (self.aux_loss_enabled, "a MoE load-balancing loss"),
            (inputs["advantages"].dim() != 1, "per-token advantages"),
        ]  # fmt: skip
        return next((why for failed, why in checks if failed), None)

    def _vllm_is_ratio(self, inputs):
        if self.use_vllm and self.vllm_importance_sampling_correction:
            return inputs["importance_sampling_ratio"]
        return None

    def _fused_loss(self, model, inputs) -> torch.Tensor | None:
        """The loss from the fused pass, or None (and `_rarl_disabled` set) when the head turned out unsupported."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        kw, _ = _kernel_options(self)
        if self.loss_type in _TOKEN_NORMALIZED:
            # the generation batch's token count, over the processes, for one accumulation window
            tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                tokens = tokens * accumulation / self.args.steps_per_generation
            kw["num_items_in_batch"] = tokens
            scale = tokens.clamp(min=1.0) / tokens  # the kernel divides by max(tokens, 1); TRL by tokens
        else:
            scale = 1.0 / accumulation
        beta = self.beta
        loss_kw = dict(
            logp_old=inputs.get("old_per_token_logps"), logp_ref=inputs["ref_per_token_logps"] if beta != 0.0 else None,
            is_ratio=self._vllm_is_ratio(inputs), eps_low=self.epsilon_low, eps_high=self.epsilon_high, beta=beta,
            loss_type=self.loss_type, max_completion_length=self.max_completion_length, world_size=1,
            bias_correction_kl=self.args.use_bias_correction_kl, compute_entropy=True, return_per_token=True, **kw,
        )  # fmt: skip
        labels = completion_ids.masked_fill(completion_mask == 0, -100)  # TRL scores what the attention mask keeps
        loss_fn = lambda rows, weight, bias, temperature: fused_linear_grpo_loss(
            rows, weight, labels, mask, inputs["advantages"], bias=bias, temperature=temperature, **loss_kw
        )
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        head = _FusedLossHead(labels, input_ids.size(1) - 1, loss_fn, trl_utils._ChunkedLogProbFunction)
        with _head_kernel(head):
            self._get_per_token_logps_and_entropies(
                model, input_ids,
                torch.cat([inputs["prompt_mask"], completion_mask], dim=1), completion_ids.size(1),
                **{k: inputs.get(k) for k in _MODEL_INPUTS},
            )  # fmt: skip
        if head.unsupported is not None:
            self._rarl_disabled = head.unsupported
            return None
        loss, _, per_token = head.result
        self._log_loss_metrics(inputs, mask, per_token["logp"], per_token["entropy"], mode)
        return loss * scale

    def _log_loss_metrics(self, inputs, mask, logp, entropy, mode) -> None:
        """TRL's `_compute_loss` metrics (names and definitions), from the fused pass's per-token log-probs."""
        metrics = self._metrics[mode]
        old = inputs.get("old_per_token_logps")
        log_ratio = logp - (logp if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
        ratio = torch.exp(log_ratio)
        advantages = inputs["advantages"][:, None]

        def global_mean(x):  # over the tokens of every process ([B, 1]: over the sequences)
            if x.shape[1] == 1:
                total = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                total = torch.stack([(x * mask).sum(), mask.sum().float()])
            total = self.accelerator.reduce(total, reduction="sum")
            return (total[0] / total[1].clamp(min=1.0)).item()

        def sequence_means(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            metrics["kl"].append(global_mean(kl * ratio if self.args.use_bias_correction_kl else kl))
        metrics["entropy"].append(global_mean(entropy))
        if self.loss_type in _CLIPPED:
            if self.args.delta is not None:
                ratio = ratio.clamp(max=self.args.delta)
            low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
            high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
            metrics["clip_ratio/low_mean"].append(global_mean(low))
            metrics["clip_ratio/high_mean"].append(global_mean(high))
            metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
            metrics["clip_ratio/low_min"].append(trl_utils.nanmin(self.accelerator.gather(sequence_means(low))).item())
            metrics["clip_ratio/high_max"].append(trl_utils.nanmax(self.accelerator.gather(sequence_means(high))).item())
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean(((ratio > self.epsilon_high) & (advantages > 0)).float()))
        elif self.loss_type == "vespo":
            phi = self.get_gamma_weights(
                advantages=advantages, log_ratio_per_token=logp - (logp if old is None else old), mask=mask,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"), k_pos=self.args.vespo_k_pos,
                lambda_pos=self.args.vespo_lambda_pos, k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg,
            )  # fmt: skip
            metrics["vespo/phi_seq_mean"].append(global_mean(phi))


# The multimodal and model-specific inputs `_compute_loss` passes to `_get_per_token_logps_and_entropies`.
_MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")  # fmt: skip


class FusedGRPOTrainer(FusedGRPOLossMixin, trl.GRPOTrainer):
    """`trl.GRPOTrainer` whose loss is computed by the fused GRPO kernel (see `FusedGRPOLossMixin`)."""
