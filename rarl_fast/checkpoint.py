"""Checkpoints: written to a temporary folder, completed, then renamed; ``--resume`` takes the newest usable one.

A checkpoint folder ``checkpoint-<step>`` holds:
- ``model/``: ``save_pretrained`` model + processor (loadable by transformers, servable by SGLang / vLLM; gathered
  on the main process when the policy is sharded);
- ``accelerate/``: accelerate's state (prepared model, optimizer, scheduler, RNG states of every process; with a
  sharded policy, the RNG states only);
- ``sharded/`` (sharded policy only): the weights and AdamW state, each process's shards in its own file written
  by ``torch.distributed.checkpoint``, and their index ``.metadata``;
- ``trainer_state.json``: global step, stage and step within it, sampler state, RMO ``best`` cache, counters;
- ``config.yaml``: the config the run was training with when it wrote the checkpoint;
- ``COMPLETE``: written last, listing every file with its size. A folder without it, or still named ``.tmp-*``,
  was cut off and is ignored.

Resuming (:func:`resume_checkpoint`) checks the newest complete checkpoint before loading it (file sizes against
``COMPLETE``, the safetensors headers, the torch files' zip directories, the trainer state's keys, the sharded
index and the shard files it points at); a checkpoint
that fails the check or the load is passed over with a warning naming the bad file, and the previous one is
tried; once one loads, those passed over are renamed ``checkpoint-<step>.unusable`` (kept, never deleted). Only
checkpoints of steps up to the one just written are pruned by ``keep_last``, so a checkpoint of a later step is
never deleted in favour of an earlier one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rarl_fast.errors import RunError

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "ShardedState",
    "checkpoint_problem",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "resume_checkpoint",
    "save_checkpoint",
    "save_model",
]

_NAME = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MARKER = "COMPLETE"
SHARDED_DIR = "sharded"
STATE_KEYS = {"global_step": int, "stage": str, "stage_step": int, "sampler": dict, "best": dict}
"""Keys every trainer state holds, with their JSON types."""


class CheckpointError(RunError):
    """A checkpoint could not be written, or no checkpoint of a run can be resumed from."""


@dataclass(frozen=True)
class ShardedState:
    """A sharded (FSDP2) policy and its optimizer: what a sharded checkpoint saves and restores."""

    module: Any  # the root FSDP2 module (a PolicyModule)
    optimizer: Any  # torch AdamW over its sharded parameters
    prefix: str = "model."  # where the transformers model sits in ``module``'s state dict

    def whole_weights(self) -> dict[str, Any]:
        """The transformers model's whole state dict on the main process (all processes call it)."""
        from rarl_fast.sharding import full_state_dict

        return full_state_dict(self.module, prefix=self.prefix)


def save_model(model: Any, processor: Any, out: Path, weights: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` of ``model`` (or of the gathered ``weights`` of a sharded one) and ``processor`` into
    ``out`` (the main process calls it)."""
    extra = {} if weights is None else {"state_dict": weights}
    model.save_pretrained(out, safe_serialization=True, **extra)
    processor.save_pretrained(out)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir() and (p / MARKER).is_file() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def save_checkpoint(
    accelerator: Any,
    run_dir: str | Path,
    step: int,
    *,
    model: Any,
    processor: Any,
    trainer_state: dict[str, Any],
    keep_last: int,
    save_optimizer: bool = True,
    config_yaml: str | None = None,
    shards: ShardedState | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (all ranks call this); keep the newest ``keep_last`` of the steps up
    to ``step``. A failed write (a full disk) removes the partial folder and raises :class:`CheckpointError`.

    ``model`` is the unwrapped transformers model (or peft model: then ``model/`` holds the adapter); ``shards``
    is given when it is sharded: its weights and optimizer state go to ``sharded/`` (every process writes its
    own shards) and ``model/`` gets the weights gathered on the main process."""
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step:07d}"
    tmp = run_dir / f".tmp-checkpoint-{step:07d}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if save_optimizer:
            accelerator.save_state(str(tmp / "accelerate"))
            if shards is not None:
                from rarl_fast.sharding import save_sharded

                save_sharded(tmp / SHARDED_DIR, shards.module, shards.optimizer)
            accelerator.wait_for_everyone()  # every rank's files are whole before the main process lists sizes
        weights = shards.whole_weights() if shards is not None else None
        if accelerator.is_main_process:
            save_model(model, processor, tmp / "model", weights)
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
            if config_yaml is not None:
                (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
            sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MARKER).write_text(json.dumps({"files": sizes}, indent=1) + "\n")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except Exception as err:  # any writer's failure: OSError, SafetensorError, ...
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs for anything else
        newest = latest_checkpoint(run_dir)
        resume = f"the run can resume from {newest.name} with --resume" if newest else "no checkpoint to resume from"
        raise CheckpointError(f"cannot write checkpoint {final} ({type(err).__name__}: {err}); {resume}") from err
    if accelerator.is_main_process:
        ours = [p for p in complete_checkpoints(run_dir) if _step(p) <= step]
        for old in ours[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """None when ``checkpoint`` looks usable, else what is wrong with it, naming the file.

    Checks, without loading any tensor: every file listed in ``COMPLETE`` with its written size, the trainer
    state (JSON object with :data:`STATE_KEYS`), the header of every ``.safetensors`` file and the zip directory
    of every torch file (``.bin``/``.pkl``/``.pt``) under ``accelerate/``."""
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    try:
        listed = json.loads((checkpoint / MARKER).read_text()).get("files", {})
    except (ValueError, AttributeError):  # written before sizes were listed ("ok")
        listed = {}
    for rel, size in listed.items():
        path = checkpoint / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {size} were written"
    if not (checkpoint / "accelerate").is_dir():
        return "accelerate/ is missing (saved with checkpoint.save_optimizer=false: nothing to resume)"
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} is not readable JSON ({type(err).__name__})"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            return f"{STATE_FILE} has no {kind.__name__} '{key}'"
    for path in sorted(checkpoint.rglob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError is not an OSError
            return f"{path.relative_to(checkpoint)} is damaged ({err})"
    for path in sorted((checkpoint / "accelerate").iterdir()):
        if path.suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(path):
            return f"{path.relative_to(checkpoint)} is damaged (not a complete torch file)"
    if (checkpoint / SHARDED_DIR).is_dir():
        from rarl_fast.sharding import sharded_problem

        return sharded_problem(checkpoint / SHARDED_DIR)
    return None


def load_checkpoint(accelerator: Any, checkpoint: str | Path, shards: ShardedState | None = None) -> dict[str, Any]:
    """Restore the state of ``checkpoint`` (model, optimizer, scheduler, RNG: accelerate's, and ``sharded/`` into
    ``shards`` when given) and return the trainer state."""
    checkpoint = Path(checkpoint)
    state_dir = checkpoint / "accelerate"
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint} has no optimizer state (saved with checkpoint.save_optimizer=false)")
    accelerator.load_state(str(state_dir))
    if shards is not None:
        from rarl_fast.sharding import load_sharded

        load_sharded(checkpoint / SHARDED_DIR, shards.module, shards.optimizer)
    return json.loads((checkpoint / STATE_FILE).read_text())


def _layout_mismatch(checkpoint: Path, sharded: bool) -> str | None:
    """Why a run that is (or is not) ``sharded`` cannot resume from ``checkpoint``'s layout, or None."""
    has_shards = (checkpoint / SHARDED_DIR).is_dir()
    if sharded and not has_shards:
        return (
            f"{checkpoint.name} was written by an unsharded (DDP or one-process) run and this run is sharded "
            "(FSDP2): resume under the launch config that wrote it, or with distributed.strategy=ddp"
        )
    if not sharded and has_shards:
        return (
            f"{checkpoint.name} holds sharded (FSDP2) state and this run is not sharded: resume under the launch "
            "config that wrote it (configs/accelerate/fsdp2.yaml, or distributed.strategy=fsdp2 with as many processes)"
        )
    return None


def resume_checkpoint(
    accelerator: Any, run_dir: str | Path, shards: ShardedState | None = None
) -> tuple[Path, dict[str, Any]]:
    """Load the newest usable complete checkpoint of ``run_dir`` (all ranks call this); returns it and its trainer
    state. A checkpoint that fails :func:`checkpoint_problem` or the load on any rank is passed over with a warning
    naming the bad file, and the previous one is tried; once one loads, those passed over are set aside as
    ``<name>.unusable`` (kept, never deleted), so that the resumed run's checkpoints do not compete with them.
    Raises :class:`CheckpointError`, changing nothing, when none is usable, or when a checkpoint's layout does not
    match the run's (sharded by ``shards`` or not: a launch config mistake, not a damaged checkpoint). A load that
    failed part-way is overwritten by the next one, which restores every piece of state."""
    import torch

    passed: list[tuple[Path, str]] = []
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint)
        mismatch = _layout_mismatch(checkpoint, shards is not None) if problem is None else None
        if mismatch is not None:
            raise CheckpointError(f"cannot resume: {mismatch}")
        state: dict[str, Any] = {}
        if problem is None:
            try:
                state = load_checkpoint(accelerator, checkpoint, shards)
            except Exception as err:  # torch, safetensors and accelerate raise their own types
                problem = f"loading failed ({type(err).__name__}: {err})"
        ok = torch.tensor(float(problem is None), device=accelerator.device)
        if float(accelerator.reduce(ok, reduction="sum")) == accelerator.num_processes:  # host sync: all ranks
            _set_aside(accelerator, [p for p, _ in passed])
            return checkpoint, state
        problem = problem or "loading failed on another process"
        passed.append((checkpoint, problem))
        log.warning("checkpoint %s is unusable: %s; trying the previous one", checkpoint, problem)
    tried = "; ".join(f"{p.name}: {why}" for p, why in passed) or "none is complete"
    raise CheckpointError(f"no usable checkpoint in {run_dir}: {tried}")


def _set_aside(accelerator: Any, checkpoints: list[Path]) -> None:
    """Rename each of ``checkpoints`` to ``<name>.unusable`` (a free name) on the main process."""
    if accelerator.is_main_process:
        for checkpoint in checkpoints:
            aside = _free_name(checkpoint.with_name(checkpoint.name + ".unusable"))
            checkpoint.rename(aside)
            log.warning("set %s aside as %s", checkpoint.name, aside.name)
    accelerator.wait_for_everyone()


def _free_name(path: Path) -> Path:
    """``path``, or ``path-1``, ``path-2``... whichever does not exist yet."""
    candidate, i = path, 0
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.name}-{i}")
    return candidate


def _fsync_dir(path: Path) -> None:
    """Flush the folder's files before the rename makes it visible (a kill -9 after it leaves whole files)."""
    for p in path.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
