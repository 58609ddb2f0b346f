"""Checkpoints: written to a temporary folder, completed, then renamed; ``--resume`` takes the latest complete one.

A checkpoint folder ``checkpoint-<step>`` holds:
- ``model/``: ``save_pretrained`` model + processor (loadable by transformers, servable by SGLang / vLLM);
- ``accelerate/``: accelerate's state (prepared model, optimizer, scheduler, RNG states of every process);
- ``trainer_state.json``: global step, stage and step within it, sampler state, RMO ``best`` cache, counters;
- ``COMPLETE``: written last. A folder without it, or still named ``.tmp-*``, was cut off and is ignored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

__all__ = ["complete_checkpoints", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_NAME = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"
MARKER = "COMPLETE"


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
) -> Path:
    """Write ``checkpoint-<step>`` atomically (all ranks call this); keep the newest ``keep_last``.

    ``model`` is the unwrapped transformers model (or peft model: then ``model/`` holds the adapter)."""
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step:07d}"
    tmp = run_dir / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if save_optimizer:
        accelerator.save_state(str(tmp / "accelerate"))
    if accelerator.is_main_process:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        processor.save_pretrained(tmp / "model")
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        (tmp / MARKER).write_text("ok\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, checkpoint: str | Path) -> dict[str, Any]:
    """Restore accelerate's state from ``checkpoint`` (model, optimizer, scheduler, RNG) and return the
    trainer state."""
    checkpoint = Path(checkpoint)
    state_dir = checkpoint / "accelerate"
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint} has no optimizer state (saved with checkpoint.save_optimizer=false)")
    accelerator.load_state(str(state_dir))
    return json.loads((checkpoint / STATE_FILE).read_text())


def _fsync_dir(path: Path) -> None:
    """Flush the folder's files before the rename makes it visible (a kill -9 after it leaves whole files)."""
    for p in path.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
