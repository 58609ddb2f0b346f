"""``rarl-fast ablate``: the rows of the paper's Tables 2-6 as named variants, each trained into its own run folder.

A variant is a YAML overlay on a benchmark config (``configs/ablations/<name>.yaml``): its ``variant:`` section
says how it trains (``none``: the starting model as it is; ``sft``: supervised fine-tuning; ``rarl``: the RL
stages) and a label; every other key is laid over the config tree (:func:`~rarl_fast.config_loader.overlay_config`).
``ablate`` runs each variant into ``<output_dir>/<run_name>/<variant>/`` from the config's model, then evaluates it
on the fixed test groups, the same for every variant (they depend on ``data`` only), and writes the table.

RL variants whose stage 1 is the benchmark config's (it would end in the same weights) share one stage-1 run,
``shared_stage1/``: each copies that run's final checkpoint (hard links) into its own folder and resumes into its
own stage 2, as the paper's stage ablation (Table 6) branches "second stage without / with RMO" from one first
stage. A resumed run continues exactly as an uninterrupted one; its KL reference stays the starting model.

Every variant is resumable: one whose evaluation exists is skipped, one cut off in RL training resumes from its
latest checkpoint (an SFT variant, which keeps no checkpoints, trains again), and a folder holding a run of
another config is an error, never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rarl_fast.config import Config, ConfigError
from rarl_fast.config_loader import config_to_dict, dump_config, overlay_config

log = logging.getLogger(__name__)

__all__ = ["Variant", "find_variants", "load_variant", "run_ablation", "stage1_signature", "variant_config"]

Train = Literal["none", "sft", "rarl"]
SHARED_STAGE1 = "shared_stage1"
"""The folder, under the ablation's root, of the stage-1 run that the RL variants share."""
MANIFEST = "ablation.json"


@dataclass(frozen=True)
class Variant:
    """A named ablation row."""

    name: str
    """Row and run-folder name (the overlay file's stem)."""
    train: Train
    """How the variant trains from the config's model: not at all, SFT (``sft.steps``), or the RL stages."""
    label: str
    """The paper's name of the row (``+ Regression only``)."""
    overlay: dict[str, Any] = field(default_factory=dict)
    """Config keys laid over the benchmark config (nested like the config file)."""
    source: str = ""
    """The overlay file (for error messages)."""


def load_variant(path: str | Path) -> Variant:
    """The variant of the overlay file ``path``; a malformed file raises a :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError("", f"cannot read the variant: {err}", str(path)) from None
    head = tree.pop("variant", None) if isinstance(tree, dict) else None
    if not isinstance(head, dict) or head.get("train") not in ("none", "sft", "rarl"):
        problem = "the overlay needs a `variant:` section with train: none|sft|rarl"
        raise ConfigError("variant.train", problem, str(path))
    unknown = set(head) - {"train", "label"}
    if unknown:
        raise ConfigError(f"variant.{sorted(unknown)[0]}", "unknown key; known keys: ['label', 'train']", str(path))
    return Variant(path.stem, head["train"], str(head.get("label", path.stem)), tree, str(path))


def _search_dirs(config_path: str | Path | None) -> list[Path]:
    dirs = [Path(config_path).parent / "ablations"] if config_path else []
    return [*dirs, Path("configs") / "ablations"]


def find_variants(specs: Sequence[str], *, config_path: str | Path | None = None) -> list[Variant]:
    """Variants by name (``<config's folder>/ablations/<name>.yaml``, else ``configs/ablations/``) or by path to
    a YAML overlay; an unknown name raises a :class:`ConfigError` listing the known ones."""
    out: list[Variant] = []
    for spec in (s.strip() for s in specs):
        if not spec:
            continue
        path = Path(spec)
        if path.suffix not in (".yaml", ".yml"):
            path = next((d / f"{spec}.yaml" for d in _search_dirs(config_path) if (d / f"{spec}.yaml").is_file()), None)
        if path is None or not path.is_file():
            known = sorted({p.stem for d in _search_dirs(config_path) if d.is_dir() for p in d.glob("*.yaml")})
            where = ", ".join(str(d) for d in _search_dirs(config_path))
            raise ConfigError("variants", f"no variant {spec!r} in {where} (known: {known})", "command line")
        out.append(load_variant(path))
    names = [v.name for v in out]
    if not names:
        raise ConfigError("variants", "name at least one variant (configs/ablations/<name>.yaml)", "command line")
    if len(set(names)) != len(names) or SHARED_STAGE1 in names:
        problem = f"variant names must be distinct and not {SHARED_STAGE1!r}: {names}"
        raise ConfigError("variants", problem, "command line")
    return out


def variant_config(base: Config, variant: Variant, root: Path) -> Config:
    """The variant's config: its overlay laid over ``base``, run into ``root/<variant>``."""
    cfg = overlay_config(base, variant.overlay, variant.source)
    cfg.output_dir, cfg.run_name = str(root), variant.name
    return cfg


def stage1_signature(cfg: Config) -> dict[str, Any] | None:
    """Everything that decides the weights stage 1 ends with, or None when stage 1 does not train.

    Two configs with equal signatures train the same stage 1: names, stage 2 and (when stage 1 does not mutate)
    the RMO settings are left out, and the reward weights are stage 1's own, with a 1-image-only stage's pair
    folded into (alpha + beta, 0), which is how eq. 8 weighs a 1-image answer.
    """
    if not cfg.stage1.enabled or cfg.stage1.steps == 0:
        return None
    tree = config_to_dict(cfg)
    for key in ("run_name", "output_dir", "stage2", *(() if cfg.stage1.rmo else ("rmo",))):
        tree.pop(key)
    alpha, beta = cfg.stage_reward_weights(cfg.stage1)
    if set(cfg.stage1.group_mix) == {1}:
        alpha, beta = alpha + beta, 0.0
    tree["stage1"].update(alpha=alpha, beta=beta)
    tree["reward"].update(alpha=None, beta=None)
    return tree


def _content(cfg: Config) -> dict[str, Any]:
    """The config without its folder names (a run folder may be reached under another output_dir)."""
    tree = config_to_dict(cfg)
    tree.pop("run_name"), tree.pop("output_dir")
    return tree


def _check_folder(run_dir: Path, cfg: Config) -> None:
    """Raise when ``run_dir`` holds a run of another config than ``cfg``."""
    from rarl_fast.config_loader import load_config

    found = run_dir / "config.yaml"
    if not found.is_file():
        return
    old, new = _content(load_config(found)), _content(cfg)
    if old != new:
        key = _first_difference(old, new)
        raise ConfigError(
            key, f"{run_dir} holds a run of another config (it differs here); use another run_name or output_dir",
            str(found),
        )  # fmt: skip


def _first_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                return _first_difference(a[k], b[k], f"{prefix}{k}.")
            return f"{prefix}{k}"
    return prefix.rstrip(".")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def branch_from(shared: Path, run_dir: Path) -> None:
    """Start ``run_dir`` at the final checkpoint of the stage-1 run ``shared`` (hard-linked files; checkpoints
    are never written in place) with its metrics lines; nothing when ``run_dir`` has a checkpoint already."""
    from rarl_fast.checkpoint import latest_checkpoint

    if latest_checkpoint(run_dir) is not None:
        return
    ckpt = latest_checkpoint(shared)
    if ckpt is None:
        raise FileNotFoundError(f"the shared stage-1 run {shared} has no complete checkpoint to branch from")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".tmp-{ckpt.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp, copy_function=_link_or_copy)
    if (shared / "metrics.jsonl").is_file():
        shutil.copyfile(shared / "metrics.jsonl", run_dir / "metrics.jsonl")
    os.replace(tmp, run_dir / ckpt.name)


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _eval_file(run_dir: Path, name: str) -> Path:
    return run_dir / "eval" / f"{name}.jsonl"


def _previous_times(root: Path) -> dict[str, float]:
    """Wall times of an earlier ``ablate`` into ``root`` (variants it finished are not run again)."""
    try:
        return dict(json.loads((root / MANIFEST).read_text()).get("wall_seconds", {}))
    except (OSError, ValueError):
        return {}


def _resumable(run_dir: Path) -> bool:
    """Whether an RL run was cut off in ``run_dir`` after its first checkpoint (then it resumes, else starts)."""
    from rarl_fast.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir) is not None


def run_ablation(base: Config, variants: Sequence[Variant], root: Path) -> dict[str, Any]:
    """Train and evaluate ``variants`` of ``base`` under ``root``; returns the manifest (also ``root/ablation.json``).

    All processes of a launch call this (each step runs data-parallel). The manifest lists, per variant, its run
    folder, the model evaluated, its evaluation file, whether its stage 1 was shared, and its wall time.
    """
    from rarl_fast.commands import run_eval, run_rarl, run_sft, with_model

    root = Path(root)
    configs = {v.name: variant_config(base, v, root) for v in variants}
    stage1_run = Variant(SHARED_STAGE1, "rarl", "shared stage 1", {"stage2": {"enabled": False}})
    shared_cfg = variant_config(base, stage1_run, root)
    signature = stage1_signature(base) if base.checkpoint.save_optimizer else None
    sharers = {
        v.name for v in variants
        if v.train == "rarl" and signature is not None and stage1_signature(configs[v.name]) == signature
    }  # fmt: skip
    shared = root / SHARED_STAGE1
    for v in variants:
        _check_folder(root / v.name, configs[v.name])
    if sharers:
        _check_folder(shared, shared_cfg)
    todo = [v for v in variants if not _eval_file(root / v.name, v.name).is_file()]
    times: dict[str, float] = _previous_times(root)
    if any(v.name in sharers for v in todo):
        t0 = time.perf_counter()
        run_rarl(shared_cfg, resume=_resumable(shared), run_dir=shared)
        times[SHARED_STAGE1] = round(time.perf_counter() - t0, 1)
    models: dict[str, str] = {}
    for v in variants:
        cfg, run_dir = configs[v.name], root / v.name
        stage2 = cfg.stage2.enabled and cfg.stage2.steps > 0
        models[v.name] = str(
            shared / "model" if v.name in sharers and not stage2
            else run_dir / "model" if v.train != "none"
            else cfg.model.name_or_path
        )  # fmt: skip
        if v not in todo:
            continue
        t0 = time.perf_counter()
        if _main_process():
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")  # the variant's training config, whatever evaluates it
        if v.train == "sft":
            if _main_process():  # SFT keeps no checkpoints: a cut-off run trains again, with fresh metrics
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            _barrier()
            run_sft(cfg, run_dir=run_dir)
        elif v.name in sharers and stage2:
            if _main_process():
                branch_from(shared, run_dir)
            _barrier()
            # the branch continues the shared stage-1 checkpoint with its own stage 2: a config change by design
            run_rarl(cfg, resume=True, run_dir=run_dir, allow_config_change=True)
        elif v.train == "rarl" and v.name not in sharers:
            run_rarl(cfg, resume=_resumable(run_dir), run_dir=run_dir)
        model = None if v.train == "none" else models[v.name]
        run_eval(with_model(cfg, model), v.name, run_dir=run_dir)
        times[v.name] = round(time.perf_counter() - t0, 1)
    manifest = {
        "root": str(root),
        "shared_stage1": str(shared) if sharers else None,
        "variants": [
            {
                "name": v.name,
                "label": v.label,
                "train": v.train,
                "overlay": v.source,
                "run_dir": v.name,
                "eval": str(_eval_file(Path(v.name), v.name)),
                "model": models[v.name],
                "shared_stage1": v.name in sharers,
                "wall_seconds": times.get(v.name),
            }
            for v in variants
        ],
        "wall_seconds": times,
    }
    if _main_process():
        (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _barrier()
    return manifest
