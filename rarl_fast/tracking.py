"""Metrics logging: the one place that turns metric tensors into numbers (``.item()``).

Writes ``metrics.jsonl`` in the run folder (one line per logged step, main process only), forwards to the
accelerate trackers that are installed (TensorBoard, W&B), and shows a console progress bar.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "STAGE_IDS",
    "MetricsLogger",
    "available_trackers",
    "read_metrics",
    "start_trackers",
    "to_number",
    "truncate_metrics",
]

STAGE_IDS = {"sft": 0, "stage1": 1, "stage2": 2}
"""The ``stage`` number of a metrics line: 0 for SFT, 1 and 2 for the RL stages."""

log = logging.getLogger(__name__)

_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def available_trackers(requested: list[str]) -> list[str]:
    """The accelerate trackers among ``requested`` whose package is installed (``jsonl`` is ours, always on)."""
    out = []
    for name in requested:
        if name == "jsonl":
            continue
        if importlib.util.find_spec(_TRACKER_PACKAGES[name]) is None:
            log.warning("tracker %r requested but its package is not installed; skipped", name)
            continue
        out.append(name)
    return out


def start_trackers(accelerator: Any, name: str) -> None:
    """Start the accelerate trackers the accelerator was built with, as run ``name`` (TensorBoard writes its event
    files to ``<run>/tensorboard/<name>/``); nothing when there are none or they run already."""
    if accelerator.log_with and not accelerator.trackers:
        accelerator.init_trackers(name)


def to_number(value: Any) -> float | int | str | None:
    """A JSON-friendly number (tensors are synced here, deliberately)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item() if value.numel() == 1 else value.detach().float().mean().item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


class MetricsLogger:
    """Per-step metrics to ``metrics.jsonl``, trackers and a progress bar."""

    def __init__(self, run_dir: str | Path, accelerator: Any, *, total_steps: int, progress_bar: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.acc = accelerator
        self.bar = None
        if progress_bar and accelerator.is_main_process and total_steps > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any], *, advance: int = 1) -> dict[str, Any]:
        """Convert, write and display ``metrics`` of global step ``step``; returns the plain dict."""
        plain = {k: to_number(v) for k, v in metrics.items()}
        plain["step"] = step
        if self.acc.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(plain, sort_keys=True) + "\n")
            numeric = {k: v for k, v in plain.items() if isinstance(v, int | float) and v is not None}
            if getattr(self.acc, "trackers", None):
                self.acc.log(numeric, step=step)
            if self.bar is not None:
                self.bar.update(advance)
                show = {k: plain[k] for k in ("stage", "reward/total", "loss", "kl") if plain.get(k) is not None}
                self.bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in show.items()})
        return plain

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if getattr(self.acc, "trackers", None):
            self.acc.end_training()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged lines of a run (for plots and tests); a torn last line (killed run) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Keep only the lines of steps <= ``last_step`` (resume: later steps are trained and logged again)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [json.dumps(r, sort_keys=True) for r in read_metrics(run_dir) if int(r.get("step", 0)) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
