"""One optimizer step over micro-batches: the update loop that RL (``train.py``) and SFT (``sft.py``) share.

:func:`optimizer_step` runs forward + backward of each micro-batch under autocast (DDP synchronizes gradients
across ranks only on the last one; FSDP2 reduce-scatters each micro-batch's gradients into the sharded ones, so
no rank ever holds a whole gradient), clips the gradient norm, and steps, unless the loss or the gradient is
non-finite on some rank: then every rank skips the step alike. :class:`NonFiniteCounter` counts the steps taken and
skipped over a whole run (both RL stages, or SFT), stops a run that keeps skipping, and fails one that took no
step or skipped too large a share of them. The loss of each micro-batch is scaled by the caller so that the summed
gradients are the gradient of the whole step's loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from rarl_fast.errors import RunError
from rarl_fast.sharding import clip_sharded_grad_norm

if TYPE_CHECKING:
    from rarl_fast.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = ["NonFiniteCounter", "NonFiniteError", "StepResult", "build_optimizer", "optimizer_step", "reset_optimizer"]

Part = TypeVar("Part")


class NonFiniteError(RunError):
    """Too many non-finite losses or gradients: in a row, or over the run (none or too few steps were taken)."""


@dataclass
class NonFiniteCounter:
    """Optimizer steps of one run: taken, and skipped (non-finite) in a row and in total. ``limit`` skipped in a
    row stop the run at once; :meth:`check_run` fails a run that took no step, or skipped more than
    ``max_fraction`` of its steps."""

    limit: int
    max_fraction: float = 1.0
    in_row: int = 0
    total: int = 0  # skipped
    taken: int = 0

    def record(self, finite: bool, where: str) -> None:
        """Count one optimizer step; raises :class:`NonFiniteError` at ``limit`` non-finite steps in a row."""
        if finite:
            self.in_row = 0
            self.taken += 1
            return
        self.in_row += 1
        self.total += 1
        log.warning("%s: non-finite loss or gradient, step skipped", where)
        if self.in_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_row} non-finite losses/gradients in a row at {where} "
                f"(optim.max_nonfinite_steps={self.limit}): lower the lr or check the data"
            )

    def check_run(self) -> None:
        """Raise :class:`NonFiniteError` when the run took no optimizer step, or skipped more than ``max_fraction``
        of them (``optim.max_skipped_fraction``): its weights are not trained weights."""
        steps = self.taken + self.total
        if steps and not self.taken:
            raise NonFiniteError(
                f"no optimizer step was taken: all {steps} had a non-finite loss or gradient, so the weights are the "
                "initial ones; lower the lr, check rollout.temperature and the data"
            )
        if steps and self.total / steps > self.max_fraction:
            raise NonFiniteError(
                f"{self.total} of {steps} optimizer steps were skipped (non-finite loss or gradient), more than "
                f"optim.max_skipped_fraction={self.max_fraction:g}; lower the lr or check the data"
            )


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports: the summed micro-batch losses and the gradient norm (0-dim tensors,
    before any clipping), and whether the step was taken."""

    loss: Tensor
    grad_norm: Tensor
    finite: bool


def build_optimizer(rt: Runtime, lr: float) -> torch.optim.Optimizer:
    """AdamW over the policy's trainable parameters with ``cfg.optim``'s settings, prepared by accelerate; over a
    sharded policy, plain torch AdamW over the shards (checkpointed with them, not by accelerate)."""
    o = rt.cfg.optim
    params = [p for p in rt.policy.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(params, lr=lr, betas=o.betas, eps=o.adam_eps, weight_decay=o.weight_decay)
    return adamw if rt.plan.sharded else rt.acc.prepare_optimizer(adamw)


def reset_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Forget AdamW's moments (a new stage starts from fresh statistics)."""
    getattr(optimizer, "optimizer", optimizer).state.clear()


def _grad_norm(rt: Runtime, params: list[torch.nn.Parameter], max_norm: float) -> Tensor:
    acc = rt.acc
    if rt.plan.sharded:
        return clip_sharded_grad_norm(params, max_norm).float()
    if max_norm > 0:
        return torch.as_tensor(acc.clip_grad_norm_(params, max_norm)).float()
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())


def optimizer_step(rt: Runtime, lr: float, parts: Sequence[Part], loss_of: Callable[[int, Part], Tensor]) -> StepResult:
    """One optimizer step at learning rate ``lr`` over the micro-batches ``parts``.

    ``loss_of(i, parts[i])`` runs the forward of micro-batch ``i`` (inside autocast) and returns its scaled loss;
    its backward follows at once. Gradient clipping uses ``cfg.optim.max_grad_norm`` (0: no clipping). The step
    is taken only if the summed loss and the gradient norm are finite on every rank (one all-reduce and a host
    sync), and the gradients are cleared either way.
    """
    acc, optimizer = rt.acc, rt.optimizer
    assert optimizer is not None, "build_optimizer first"
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_total = torch.zeros((), device=rt.device)
    for i, part in enumerate(parts):
        sync = i == len(parts) - 1 or rt.plan.sharded
        with nullcontext() if sync else acc.no_sync(rt.policy), acc.autocast():
            loss = loss_of(i, part)
            acc.backward(loss)
        loss_total = loss_total + loss.detach().float()
    params: list[Any] = [p for p in rt.policy.parameters() if p.requires_grad]
    grad_norm = _grad_norm(rt, params, rt.cfg.optim.max_grad_norm)
    finite = torch.isfinite(loss_total) & torch.isfinite(grad_norm)
    finite = bool(acc.reduce(finite.float(), reduction="sum") == acc.num_processes)  # host sync: all ranks agree
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_total, grad_norm=grad_norm, finite=finite)
