"""Our fused log-prob kernel behind verl's fused-kernel backends (verl 0.9.1).

With `actor_rollout_ref.model.use_fused_kernels=True`, verl patches the model's forward to compute the per-token
log-probs and entropies from the last hidden states, without the logits: with
`fused_kernel_options.impl_backend=triton` through `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`,
with `impl_backend=torch` through `verl.utils.experimental.torch_functional.FusedLinearForPPO`. This module has both
with verl's signatures and returns, computed by `rarl_kernels.fused_linear_logprob_stats` (Triton on CUDA, chunked
torch elsewhere), and `patch_verl()` binds them in verl's modules. `rarl_kernels.integrations.verl_patch` calls it
when imported: name it in verl's `external_lib` hook. Nothing here imports verl until `patch_verl()` runs.

Labels are verl's: already shifted, every one in [0, V) (ours returns 0 for a label outside it, where verl's
kernels read past the vocabulary). The vocabulary-parallel form (`dist_process_group`, verl's Megatron path) is
not implemented.
"""

from __future__ import annotations

import sys

import torch

from rarl_kernels.linear_logprobs import fused_linear_logprob_stats

_REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: torch.distributed.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's `linear_cross_entropy`: log-probs of `labels` and entropies of softmax(hidden @ weight^T / temperature).

    hidden [..., H] (e.g. [1, T, H] with padding removed); weight [V, H]; labels [...] int, shifted already. Returns
    (log-probs, entropy), fp32: log-probs [N] (N = number of labels, flattened as verl returns them) for reduction
    "none", their sum or mean (a scalar) for "sum" / "mean"; entropy [N]. Both differentiable w.r.t. hidden and
    weight.
    """
    if dist_process_group is not None:
        raise NotImplementedError("linear_cross_entropy: a vocabulary-parallel lm_head (dist_process_group) is not "
                                  "implemented by rarl_kernels")  # fmt: skip
    if reduction.lower() not in _REDUCTIONS:
        raise ValueError(f"Invalid reduction: {reduction}")
    out = fused_linear_logprob_stats(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                     temperature=float(temperature), stats=("entropy",))  # fmt: skip
    logp = {"none": out.logp, "sum": out.logp.sum(), "mean": out.logp.mean()}[reduction.lower()]
    return logp, out.entropy


class FusedLinearForPPO(torch.nn.Module):
    """verl's `FusedLinearForPPO` (both of its backends, "torch" and "liger", run our kernel): forward(hidden_states
    [B, T, H] or [T, H], vocab_weights [V, H], input_ids [B, T] or [T], temperature) -> (log_probs fp32, entropy in
    the hidden states' dtype), shaped like input_ids. `chunk_size` is accepted and not used: our working buffer is
    bounded in bytes."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        vocab_weights: torch.Tensor,
        input_ids: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden_states.ndim not in (2, 3) or input_ids.shape != hidden_states.shape[:-1]:
            raise ValueError(f"hidden_states {tuple(hidden_states.shape)} must be 2D or 3D with input_ids of shape "
                             f"{tuple(hidden_states.shape[:-1])}, got {tuple(input_ids.shape)}")  # fmt: skip
        out = fused_linear_logprob_stats(hidden_states, vocab_weights, input_ids.long(), temperature=temperature,
                                         stats=("entropy",))  # fmt: skip
        return out.logp, out.entropy.to(hidden_states.dtype)


def patch_verl() -> None:
    """Make verl's fused-kernel forwards (`use_fused_kernels=True`, either `impl_backend`) call our kernel: binds
    `linear_cross_entropy` and `FusedLinearForPPO` in verl's modules, and wherever an already imported verl module
    holds verl's own under the same name."""
    import verl.utils.experimental.torch_functional as verl_torch
    import verl.utils.kernel.linear_cross_entropy as verl_lce

    ours = {"linear_cross_entropy": linear_cross_entropy, "FusedLinearForPPO": FusedLinearForPPO}
    theirs = {id(verl_lce.linear_cross_entropy), id(verl_torch.FusedLinearForPPO)}
    for name, module in list(sys.modules.items()):
        if name == "verl" or name.startswith("verl."):
            for attr, replacement in ours.items():
                if id(getattr(module, attr, None)) in theirs:
                    setattr(module, attr, replacement)
