"""FSDP2: the policy and the frozen reference sharded across the processes with torch's ``fully_shard``.

``accelerate launch`` starts the processes and owns the process group and the devices; the sharding itself is
applied here rather than by ``Accelerator.prepare``, because accelerate does not shard on the CPU (an FSDP config
there silently runs DDP, or one process), and the CPU test suite must run the sharded path that GPUs run.

Units: every vision block and every decoder layer (the model's ``_no_split_modules`` classes, or those an
accelerate FSDP config names), then the root :class:`~rarl_fast.policy.PolicyModule`, which keeps the
embeddings, the vision merger, the final norm and the lm_head. The fused lm_head + GRPO loss runs inside the
root's forward, so it reads the whole lm_head weight (all-gathered for that forward) and its gradient is
reduce-scattered after backward like any other; tied input/output embeddings are one parameter of the root unit
and stay tied. With bf16 (CUDA) the gathered parameters and the compute are bf16 and gradients are reduced in
fp32; the sharded master weights and the AdamW state stay fp32.

The reference is sharded the same way (it holds no gradient or optimizer state, and is resharded after each
forward), so a model that needs sharding for training does not need a whole copy per device for its reference.

Rollouts and the held-out eval decode with the HF engine, which calls the decoder's sub-modules directly
rather than through their forward; they run inside :func:`whole_parameters`. Checkpoints write each process's
shards of the weights and AdamW state with ``torch.distributed.checkpoint`` (:func:`save_sharded`,
:func:`load_sharded`); :func:`full_state_dict` gathers the weights on the main process for ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rarl_fast.errors import UsageError

if TYPE_CHECKING:
    from rarl_fast.config import Config

log = logging.getLogger(__name__)

__all__ = [
    "ShardingPlan",
    "accelerate_fsdp_launch",
    "broadcast_from_main",
    "clip_sharded_grad_norm",
    "full_state_dict",
    "is_sharded",
    "load_sharded",
    "release",
    "save_sharded",
    "shard_model",
    "sharded_problem",
    "sharding_plan",
    "whole_parameters",
]


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def _reshard_after_forward() -> bool:
    """``fsdp_reshard_after_forward`` of the accelerate config: a boolean, or an FSDP1 sharding strategy name
    (``FULL_SHARD`` reshards, ``SHARD_GRAD_OP`` keeps the gathered parameters until backward)."""
    value = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    return value in ("1", "true", "yes", "on", "full_shard", "hybrid_shard")


@dataclass(frozen=True)
class ShardingPlan:
    """How the processes of this run hold the model (resolved once by :func:`sharding_plan`)."""

    sharded: bool = False  # FSDP2; False: whole model on every process (DDP, or one process)
    reshard_after_forward: bool = True  # free a unit's gathered parameters after its forward (ZeRO-3 style)
    activation_checkpointing: bool = False  # asked for by the accelerate FSDP config
    bf16: bool = False  # gathered parameters and compute in bf16, gradients reduced in fp32
    unit_classes: tuple[str, ...] = ()  # classes sharded one by one; empty: the model's ``_no_split_modules``
    find_unused_parameters: bool = True  # reduce-scatter zeros for parameters a micro-batch left without gradient


def accelerate_fsdp_launch() -> bool:
    """Whether ``accelerate launch`` ran with an FSDP config (it exports ``ACCELERATE_USE_FSDP``)."""
    return _env_flag("ACCELERATE_USE_FSDP")


def sharding_plan(cfg: Config, num_processes: int, mixed_precision: str) -> ShardingPlan:
    """The plan for ``cfg.distributed.strategy`` under the current launch.

    ``auto`` shards when ``accelerate launch`` ran with an FSDP config; that config's
    ``fsdp_reshard_after_forward``, ``fsdp_activation_checkpointing`` and ``fsdp_transformer_layer_cls_to_wrap``
    apply. One process holds the whole model whatever the strategy. Raises :class:`UsageError` for what FSDP2
    here does not do: an FSDP1 config, parameter offload, LoRA."""
    strategy = cfg.distributed.strategy
    fsdp_launch = accelerate_fsdp_launch()
    if strategy == "auto":
        strategy = "fsdp2" if fsdp_launch else "ddp"
    if strategy != "fsdp2":
        return ShardingPlan()
    if fsdp_launch and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UsageError(
            "the accelerate config asks for FSDP1 (fsdp_version 1); rarl-fast shards with FSDP2: set fsdp_version: 2 "
            "(configs/accelerate/fsdp2.yaml)"
        )
    if _env_flag("FSDP_OFFLOAD_PARAMS"):
        raise UsageError("fsdp_offload_params: true is not supported by rarl-fast's FSDP2; set it to false")
    if cfg.model.lora.enabled:
        raise UsageError(
            "model.lora.enabled with FSDP2 is not supported: a LoRA run trains few weights, use DDP "
            "(configs/accelerate/ddp.yaml, distributed.strategy=ddp)"
        )
    if num_processes == 1:
        log.info("distributed.strategy fsdp2 with one process: nothing to shard, the model stays whole")
        return ShardingPlan()
    units = tuple(c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return ShardingPlan(
        sharded=True,
        reshard_after_forward=_reshard_after_forward() if fsdp_launch else True,
        activation_checkpointing=fsdp_launch and _env_flag("FSDP_ACTIVATION_CHECKPOINTING"),
        bf16=mixed_precision == "bf16",
        unit_classes=units if fsdp_launch else (),
        find_unused_parameters=cfg.optim.ddp_find_unused_parameters,
    )


# ----------------------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------------------


def _units(root: nn.Module, classes: tuple[str, ...]) -> list[nn.Module]:
    """The modules sharded one by one, in forward order (vision blocks, then decoder layers)."""
    if not classes:
        inner = getattr(root, "model", root)
        classes = tuple(getattr(inner, "_no_split_modules", None) or ())
    units = [m for m in root.modules() if type(m).__name__ in classes and m is not root]
    if not units:
        raise UsageError(f"FSDP2: no module of the classes {list(classes)} in {type(root).__name__} to shard")
    return units


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by :func:`shard_model`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_model(root: nn.Module, plan: ShardingPlan, device: torch.device, *, trainable: bool = True) -> nn.Module:
    """Shard ``root`` in place across all processes (every unit of the plan, then ``root``) and give every
    process the main process's weights; returns ``root``. All processes call it.

    The broadcast makes the start identical on every rank, as DDP's does, and lets the other processes hold
    placeholders: with accelerate's ``fsdp_cpu_ram_efficient_loading`` transformers loads real weights on the
    first process of each node only. A frozen ``root`` (``trainable=False``, the reference) keeps its dtype."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    main_weights = root.state_dict() if dist.get_rank() == 0 else {}  # keeps the whole tensors alive to broadcast
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if plan.bf16 and trainable:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in _units(root, plan.unit_classes):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=plan.reshard_after_forward)
    # The root's inputs carry the fp32 advantages and old/reference log-probs the loss needs in fp32: not cast.
    # It keeps its parameters gathered from forward to backward (torch's default for the root).
    fully_shard(root, mesh=mesh, mp_policy=dataclasses.replace(mp, cast_forward_inputs=False))
    if trainable and plan.find_unused_parameters:
        root.set_reduce_scatter_unused_params(True)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(root, main_weights, options=options)
    return root


def broadcast_from_main(module: nn.Module) -> None:
    """Every parameter and buffer of an unsharded ``module`` set to the main process's (all processes call it):
    for a model loaded with placeholders on the other processes (accelerate's ``fsdp_cpu_ram_efficient_loading``)
    and not sharded, such as the model ``eval`` runs."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


@contextmanager
def whole_parameters(root: nn.Module, plan: ShardingPlan) -> Iterator[None]:
    """Every parameter of a sharded ``root`` whole (plain tensors) inside the block, sharded again after it; for
    code that calls sub-modules directly instead of through their forward (the rollout engine's decode) and that
    pushes the weights to an engine. No-op for an unsharded module. All processes enter it together.

    Costs the whole model in the gathered dtype on every device for the block's duration."""
    if not is_sharded(root):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    root._get_fsdp_state()._lazy_init()  # the first FSDP module to run becomes the root: make it this one
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    root.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(plan.reshard_after_forward and unit is not root, recurse=False)
        root.reset_iter_state()  # reshards every unit and forgets the forward order recorded meanwhile


def release(root: nn.Module) -> None:
    """After forwards without backward (log-probs of the reference or of the policy), shard ``root`` again and
    forget the forward order FSDP records for backward prefetching; no-op for an unsharded module."""
    if is_sharded(root):
        root.reset_iter_state()


def clip_sharded_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """The global L2 norm of the sharded gradients (a 0-dim tensor, all processes agree) before clipping them to
    ``max_norm`` (0: no clipping)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# ----------------------------------------------------------------------------------------------------------
# State: gathered for save_pretrained, sharded for checkpoints
# ----------------------------------------------------------------------------------------------------------


def full_state_dict(root: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The whole weights of ``root`` on the main process as CPU tensors (an empty dict elsewhere), keys under
    ``prefix`` only, with ``prefix`` removed; tied parameters stay one tensor. All processes call it (each
    sharded tensor is gathered in turn, so the main process holds the whole model once in CPU memory)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    main = dist.get_rank() == 0
    out: dict[str, Tensor] = {}
    gathered: dict[int, Tensor | None] = {}  # by parameter identity: a tied parameter is gathered once
    with torch.no_grad():
        for name, t in root.state_dict(keep_vars=True).items():
            if not name.startswith(prefix):
                continue
            if id(t) not in gathered:
                whole = t.full_tensor() if isinstance(t, DTensor) else t
                gathered[id(t)] = whole.detach().to("cpu", copy=True) if main else None
            if main:
                out[name[len(prefix) :]] = gathered[id(t)]
    return out


def _dcp_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(root, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_sharded(path: Path, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the sharded weights and AdamW state of ``root`` into the folder ``path`` with
    ``torch.distributed.checkpoint``: each process its own shard file, the main process the index
    (``.metadata``). All processes call it."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(root, optimizer), checkpoint_id=str(path))


def load_sharded(path: Path, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what :func:`save_sharded` wrote into ``root`` and ``optimizer`` (all processes call it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(root, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def sharded_problem(path: Path) -> str | None:
    """None when the folder ``path`` written by :func:`save_sharded` looks whole, else what is wrong (naming the
    file): the index must load, and every shard file it points at must exist and hold the bytes it points at.
    Reads no tensor."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # a missing or cut-off pickle: OSError, EOFError, UnpicklingError, ...
        return f"{path.name}/.metadata is not readable ({type(err).__name__})"
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    if not ends:
        return f"{path.name}/.metadata indexes no shard"
    for rel, end in sorted(ends.items()):
        shard = path / rel
        if not shard.is_file():
            return f"{path.name}/{rel} is missing"
        if shard.stat().st_size < end:
            return f"{path.name}/{rel} has {shard.stat().st_size} bytes, its index needs {end}"
    return None
