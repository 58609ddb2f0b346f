"""The commands as functions: SFT, RARL training, evaluation (``rarl-fast sft|train|eval``) and their outputs.

Each takes the config and the model to start from, runs under the current accelerate launch (1..N
processes) and writes into its own run folder: ``model/`` (``save_pretrained``), ``metrics.jsonl``,
``eval/<name>.jsonl`` (every response) and ``eval/results.{md,csv}``.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from rarl_fast.config import Config

log = logging.getLogger(__name__)

__all__ = ["run_eval", "run_rarl", "run_sft", "save_final", "with_model"]


def with_model(cfg: Config, model_path: str | Path | None, *, run_name: str | None = None) -> Config:
    """A copy of ``cfg`` starting from ``model_path`` (None keeps ``cfg.model.name_or_path``)."""
    out = copy.deepcopy(cfg)
    if model_path is not None:
        out.model.name_or_path = str(model_path)
        out.model.local_files_only = True
    if run_name is not None:
        out.run_name = run_name
    return out


def save_final(rt: Any, out: Path) -> Path:
    """The trained policy and processor as a ``save_pretrained`` folder, written by the main process (a sharded
    policy is gathered there first: all processes call this)."""
    from rarl_fast.checkpoint import save_model

    weights = rt.full_weights()
    if rt.acc.is_main_process:
        save_model(rt.peft_model or rt.hf_model, rt.processor, out, weights)
    rt.acc.wait_for_everyone()
    return out


def run_sft(cfg: Config, *, steps: int | None = None, run_dir: Path | None = None, overwrite: bool = False) -> Path:
    """``steps`` (default ``cfg.sft.steps``) SFT steps from ``cfg.model`` in a run folder of their own (``overwrite``
    moves an earlier run aside); returns the saved model folder."""
    from rarl_fast.runtime import build_runtime
    from rarl_fast.sft import train_sft

    rt = build_runtime(cfg, train=True, run_dir=run_dir, claim="overwrite" if overwrite else "new", resumable=False)
    t0 = time.perf_counter()
    train_sft(rt, steps=cfg.sft.steps if steps is None else steps, lr=cfg.sft.lr, mix=cfg.sft.group_mix)
    log.info("SFT: %d steps in %.1f s", steps or cfg.sft.steps, time.perf_counter() - t0)
    return save_final(rt, rt.run_dir / "model")


def run_rarl(
    cfg: Config,
    *,
    resume: bool = False,
    run_dir: Path | None = None,
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> Path:
    """Stage 1 + stage 2 from ``cfg.model`` (see :func:`rarl_fast.train.train`); returns the saved model folder."""
    from rarl_fast.train import train

    rt = train(cfg, resume=resume, run_dir=run_dir, overwrite=overwrite, allow_config_change=allow_config_change)
    return save_final(rt, rt.run_dir / "model")


def run_eval(cfg: Config, name: str, *, run_dir: Path | None = None) -> dict[int, Any]:
    """Greedy evaluation of ``cfg.model`` on the fixed test groups; ``{N: MetricResult}``. Adds its files to the run
    folder (``eval/<name>.jsonl`` and the config it ran with, ``eval/<name>.config.yaml``)."""
    from rarl_fast.config_loader import dump_config
    from rarl_fast.evaluate import evaluate
    from rarl_fast.runtime import build_runtime

    rt = build_runtime(cfg, train=False, run_dir=run_dir)
    if rt.acc.is_main_process:
        (rt.run_dir / "eval").mkdir(parents=True, exist_ok=True)
        dump_config(cfg, rt.run_dir / "eval" / f"{name}.config.yaml")
    return evaluate(rt, name)
