"""A run folder belongs to one run.

``train`` and ``sft`` write into ``<output_dir>/<run_name>``: checkpoints, ``metrics.jsonl``, the final ``model/``
and the config they ran with. Started without ``--resume`` in a folder that already holds those of an earlier
run, they stop with an error naming the folder and the choices (``--resume``, another ``run_name``, or
``--overwrite``, which renames the old folder to ``<run_name>.replaced-<time>`` and starts afresh: nothing is
deleted). ``--resume`` needs a complete checkpoint in the folder and keeps every config the run was started
with: ``config.yaml`` from the start, ``config.resume-<step>.yaml`` from each resume.

Under several processes every rank checks the folder before any rank writes to it (a barrier separates the
two), so all ranks take the same decision.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from rarl_fast.errors import UsageError

__all__ = ["Claim", "RunFolderError", "claim_run_folder", "move_aside", "run_contents"]

Claim = Literal["new", "overwrite", "resume"]
"""How a command takes a run folder: a fresh run, a fresh run after moving an old one aside, or the same run."""

CONFIG_FILE = "config.yaml"


class RunFolderError(UsageError):
    """The run folder cannot be used as asked: it holds another run, has nothing to resume, or is not writable."""


def run_contents(run_dir: str | Path) -> list[str]:
    """What in ``run_dir`` belongs to a run (checkpoints, complete or cut off, ``metrics.jsonl``, the final
    ``model/``), sorted; empty for a fresh or missing folder. A ``config.yaml`` alone is no run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in run_dir.iterdir()
        if p.name in ("metrics.jsonl", "model") or p.name.startswith(("checkpoint-", ".tmp-checkpoint-"))
    )


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_run_folder(run_dir: Path, claim: Claim, *, resumable: bool = True) -> None:
    """Raise :class:`RunFolderError` when ``run_dir`` cannot be taken as ``claim`` says (reads only)."""
    from rarl_fast.checkpoint import complete_checkpoints

    held = run_contents(run_dir)
    if claim == "new" and held:
        choices = "pass --resume to continue it, " if resumable else ""
        raise RunFolderError(
            f"run folder {run_dir} holds a previous run ({_listing(held)}): {choices}set another run_name "
            f"(run_name=...), or pass --overwrite to move it aside to {run_dir.name}.replaced-<time>"
        )
    if claim == "resume" and not complete_checkpoints(run_dir):
        found = f"it holds {_listing(held)}" if held else "it holds no run" if run_dir.is_dir() else "it does not exist"
        raise RunFolderError(
            f"--resume: no complete checkpoint in {run_dir} ({found}): start the run without --resume "
            "(with --overwrite if the folder holds a run)"
        )


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<name>.replaced-<YYYYmmdd-HHMMSS>`` (a free name) and return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, i = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}"), 0
    while target.exists():
        i += 1
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{i}")
    run_dir.rename(target)
    return target


def prepare_run_folder(run_dir: Path, claim: Claim | None, config_yaml: str) -> Path | None:
    """Create ``run_dir`` (main process); for a fresh run move an earlier run aside (``overwrite``) and write
    ``config.yaml``. Returns where an earlier run was moved, else None."""
    moved = None
    try:
        if claim == "overwrite" and run_contents(run_dir):
            moved = move_aside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if claim in ("new", "overwrite"):
            (run_dir / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    except OSError as err:
        raise RunFolderError(f"cannot use run folder {run_dir}: {err.strerror or err}") from err
    return moved


def claim_run_folder(accelerator: Any, run_dir: Path, claim: Claim | None, config_yaml: str, *,
                     resumable: bool = True) -> None:  # fmt: skip
    """Check and prepare ``run_dir`` for a command (all ranks call this). ``claim`` None uses the folder as it is
    (evaluation adds its files to any folder)."""
    if claim is not None:
        check_run_folder(run_dir, claim, resumable=resumable)
    accelerator.wait_for_everyone()  # every rank has looked before the main process changes anything
    if accelerator.is_main_process:
        moved = prepare_run_folder(run_dir, claim, config_yaml)
        if moved is not None:
            print(f"moved the previous run in {run_dir} to {moved}", flush=True)
    accelerator.wait_for_everyone()
