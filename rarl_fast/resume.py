"""Resuming a run with the settings it was trained with, and the record of every config it ran with.

A resumed run continues the same run, so its config must be the checkpoint's: :func:`check_resume_config` compares
the new config with the one saved in the newest complete checkpoint (``config.yaml`` in the checkpoint; for
checkpoints written without it, the run folder's newest config up to that step) and refuses any difference
outside :data:`~rarl_fast.config.RESUME_SAFE_KEYS`, naming the keys, unless told to accept them. Each resume
writes the config it runs with to ``config.resume-<step>.yaml`` beside the run's first ``config.yaml``, which is
never overwritten (:func:`record_resume`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rarl_fast.checkpoint import CONFIG_FILE, latest_checkpoint
from rarl_fast.config import RESUME_SAFE_KEYS, Config, ConfigError
from rarl_fast.config_loader import config_diff, dump_config, load_config, short_repr
from rarl_fast.errors import UsageError

__all__ = ["ResumeConfigError", "check_resume_config", "record_resume", "saved_config"]

_RESUMED = re.compile(r"config\.resume-(\d+)(?:-(\d+))?\.yaml")


class ResumeConfigError(UsageError):
    """``--resume`` with a config that differs from the checkpoint's in keys that change the training."""


def saved_config(checkpoint: Path) -> Path | None:
    """The config ``checkpoint`` was written under: its own ``config.yaml``, else the run folder's newest
    ``config.resume-<step>.yaml`` of a step up to the checkpoint's, else the folder's ``config.yaml``."""
    if (checkpoint / CONFIG_FILE).is_file():
        return checkpoint / CONFIG_FILE
    step = int(checkpoint.name.split("-")[1])
    run_dir = checkpoint.parent
    resumed = sorted(
        (int(m.group(1)), int(m.group(2) or 0), p)
        for p in run_dir.glob("config.resume-*.yaml")
        if (m := _RESUMED.fullmatch(p.name))
    )
    earlier = [p for s, _, p in resumed if s <= step]
    if earlier:
        return earlier[-1]
    return run_dir / CONFIG_FILE if (run_dir / CONFIG_FILE).is_file() else None


def _safe(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_SAFE_KEYS)


def _changes(diff: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    text = ", ".join(f"{k} ({short_repr(a)} -> {short_repr(b)})" for k, a, b in diff[:limit])
    return text + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def check_resume_config(cfg: Config, run_dir: Path, *, allow: bool) -> list[tuple[str, Any, Any]]:
    """The differences between ``cfg`` and the config of ``run_dir``'s newest complete checkpoint (empty when
    there is no checkpoint: the run folder check says so). Raises :class:`ResumeConfigError` for a difference
    outside :data:`RESUME_SAFE_KEYS`, or a saved config that cannot be read, unless ``allow``."""
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return []
    path = saved_config(newest)
    hint = "or pass --allow-config-change to resume with this config anyway"
    if path is None:
        if allow:
            return []
        raise ResumeConfigError(f"--resume: {newest} has no saved config to compare with; {hint}")
    try:
        old = load_config(path)
    except ConfigError as err:
        if allow:
            return []
        raise ResumeConfigError(f"--resume: cannot read the config of {newest.name} ({err}); {hint}") from None
    diff = config_diff(old, cfg)
    unsafe = [d for d in diff if not _safe(d[0])]
    if unsafe and not allow:
        raise ResumeConfigError(
            f"--resume: the config differs from the one {newest.name} was trained with in {_changes(unsafe)}: "
            f"resume with the same values (saved in {path}), or pass --allow-config-change to accept the change "
            "(the run folder keeps every config it ran with)"
        )
    return diff


def record_resume(cfg: Config, run_dir: Path, checkpoint: Path, state: dict[str, Any], total_steps: int,
                  diff: list[tuple[str, Any, Any]]) -> Path:  # fmt: skip
    """Say what was resumed (checkpoint, stage, steps) and the config changes, and write
    ``config.resume-<step>.yaml`` (main process); returns its path."""
    stage, step = state["stage"], int(state["global_step"])
    stage_steps = getattr(cfg, stage).steps
    print(
        f"resumed from {checkpoint}: {stage} step {state['stage_step']} of {stage_steps}, "
        f"global step {step} of {total_steps}",
        flush=True,
    )
    if diff:
        print(f"resumed with config changes: {_changes(diff)}", flush=True)
    text, out, i = dump_config(cfg), run_dir / f"config.resume-{step:07d}.yaml", 0
    while out.is_file() and out.read_text(encoding="utf-8") != text:  # resumed at this step before, differently
        i += 1
        out = run_dir / f"config.resume-{step:07d}-{i}.yaml"
    out.write_text(text, encoding="utf-8")
    return out
