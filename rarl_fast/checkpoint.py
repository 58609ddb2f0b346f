"""Checkpoints: written to a temporary folder, completed, then renamed; ``--resume`` takes the newest usable one.

A checkpoint folder ``checkpoint-<step>`` holds:
- ``model/``: ``save_pretrained`` model + processor (loadable by transformers, servable by SGLang / vLLM);
- ``accelerate/``: accelerate's state (prepared model, optimizer, scheduler, RNG states of every process);
- ``trainer_state.json``: global step, stage and step within it, sampler state, RMO ``best`` cache, counters;
- ``config.yaml``: the config the run was training with when it wrote the checkpoint;
- ``COMPLETE``: written last, listing every file with its size. A folder without it, or still named ``.tmp-*``,
  was cut off and is ignored.

Resuming (:func:`resume_checkpoint`) checks the newest complete checkpoint before loading it (file sizes against
``COMPLETE``, the safetensors headers, the torch files' zip directories, the trainer state's keys); a checkpoint
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
from pathlib import Path
from typing import Any

from rarl_fast.errors import RunError

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "checkpoint_problem",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "resume_checkpoint",
    "save_checkpoint",
]

_NAME = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MARKER = "COMPLETE"
STATE_KEYS = {"global_step": int, "stage": str, "stage_step": int, "sampler": dict, "best": dict}
"""Keys every trainer state holds, with their JSON types."""


class CheckpointError(RunError):
    """A checkpoint could not be written, or no checkpoint of a run can be resumed from."""


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
) -> Path:
    """Write ``checkpoint-<step>`` atomically (all ranks call this); keep the newest ``keep_last`` of the steps up
    to ``step``. A failed write (a full disk) removes the partial folder and raises :class:`CheckpointError`.

    ``model`` is the unwrapped transformers model (or peft model: then ``model/`` holds the adapter)."""
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
            accelerator.wait_for_everyone()  # every rank's RNG file is whole before the main process lists sizes
        if accelerator.is_main_process:
            model.save_pretrained(tmp / "model", safe_serialization=True)
            processor.save_pretrained(tmp / "model")
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
    return None


def load_checkpoint(accelerator: Any, checkpoint: str | Path) -> dict[str, Any]:
    """Restore accelerate's state from ``checkpoint`` (model, optimizer, scheduler, RNG) and return the
    trainer state."""
    checkpoint = Path(checkpoint)
    state_dir = checkpoint / "accelerate"
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint} has no optimizer state (saved with checkpoint.save_optimizer=false)")
    accelerator.load_state(str(state_dir))
    return json.loads((checkpoint / STATE_FILE).read_text())


def resume_checkpoint(accelerator: Any, run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Load the newest usable complete checkpoint of ``run_dir`` (all ranks call this); returns it and its trainer
    state. A checkpoint that fails :func:`checkpoint_problem` or the load on any rank is passed over with a warning
    naming the bad file, and the previous one is tried; once one loads, those passed over are set aside as
    ``<name>.unusable`` (kept, never deleted), so that the resumed run's checkpoints do not compete with them.
    Raises :class:`CheckpointError`, changing nothing, when none is usable. A load that failed part-way is
    overwritten by the next one, which restores every piece of state."""
    import torch

    passed: list[tuple[Path, str]] = []
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint)
        state: dict[str, Any] = {}
        if problem is None:
            try:
                state = load_checkpoint(accelerator, checkpoint)
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
