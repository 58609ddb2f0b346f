"""The accelerate ``Accelerator`` of a run: devices, process group, mixed precision and trackers.

``accelerate launch`` starts the processes and owns the process group; this picks the settings that make the
same code right on one CPU, several CPU processes (gloo) and GPUs. Sharding (FSDP2) is applied by
:mod:`rarl_fast.sharding`, not by accelerate, which does not shard on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from rarl_fast.config import Config

__all__ = ["make_accelerator"]


def make_accelerator(cfg: Config, run_dir: Path, *, trackers: list[str] | None = None) -> Accelerator:
    """accelerate's Accelerator for this machine: CPU when there is no CUDA (gloo for multi-process runs), bf16
    autocast on CUDA unless ``optim.mixed_precision`` says otherwise; DDP looks for unused parameters unless
    ``optim.ddp_find_unused_parameters`` is off; ``trackers`` (e.g. TensorBoard) write under ``run_dir/tensorboard``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    cuda = torch.cuda.is_available()
    mp = cfg.optim.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda else "no"
    return Accelerator(
        cpu=not cuda,
        mixed_precision=mp,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard"), automatic_checkpoint_naming=False
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.optim.ddp_find_unused_parameters)],
    )
