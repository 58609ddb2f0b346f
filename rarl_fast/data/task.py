"""The one entry point from the config to data: :func:`load_task`. Everything below it takes plain values."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rarl_fast.data.samples import TaskData

if TYPE_CHECKING:
    from rarl_fast.config import DataConfig

__all__ = ["load_task"]


def load_task(cfg: DataConfig, *, tolerance: float | None = None) -> TaskData:
    """Load ``cfg.task``'s train and test samples with its prompt rule, value range, tolerance and metric.

    ``tolerance`` overrides the data's (pass ``Config.tolerance()`` so that ``reward.tolerance`` wins).

    Real datasets are read from ``cfg.root`` (nothing is downloaded); the synthetic benchmark is generated.
    Values outside ``[value_min, value_max]`` are skipped, ``max_samples`` caps each split, images are checked
    per ``check_images`` and ``max_image_pixels``; counts of everything skipped are in ``TaskData.report``. For
    data with categories (COCO-REM) the report also gives, per N in ``group_sizes``, the categories eligible for
    groups of N.
    Raises :class:`~rarl_fast.data.samples.DataNotFoundError` naming the path when a split comes out empty.
    """
    from rarl_fast.data.groups import eligible_category_counts
    from rarl_fast.data.loaders import finish, load_ava, load_jsonl, load_utkface

    if cfg.task == "synthetic":
        from rarl_fast.data.synthetic import load_synthetic

        train, test, report = load_synthetic(
            cfg.synthetic_task, train_size=cfg.synthetic_train_size, test_size=cfg.synthetic_test_size, seed=cfg.seed
        )
    elif cfg.task == "age":
        train, test, report = load_utkface(
            cfg.root,  # type: ignore[arg-type]
            split_file=cfg.split_file,
            train_split_file=cfg.train_split_file,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
        )
    elif cfg.task == "aesthetics":
        train, test, report = load_ava(cfg.root)  # type: ignore[arg-type]
    elif cfg.task == "count":
        from rarl_fast.data.coco import load_cocorem

        train, test, report = load_cocorem(cfg.root)  # type: ignore[arg-type]
    elif cfg.task == "jsonl":
        train, test, report = load_jsonl(cfg.root, test_fraction=cfg.test_fraction, seed=cfg.seed)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown task {cfg.task!r}")
    value_min, value_max = float(cfg.resolved("value_min")), float(cfg.resolved("value_max"))
    train, test = finish(
        train,
        test,
        report,
        value_min=value_min,
        value_max=value_max,
        check=cfg.check_images,
        max_samples=cfg.max_samples,
        seed=cfg.seed,
        max_pixels=cfg.max_image_pixels,
    )
    if any(s.category is not None for s in train + test):
        report.eligible_categories = {
            "train": eligible_category_counts(train, cfg.group_sizes),
            "test": eligible_category_counts(test, cfg.group_sizes),
        }
    return TaskData(
        task=cfg.defaults_key(),
        train=train,
        test=test,
        rule=cfg.resolved("rule"),
        value_range=cfg.resolved("value_range"),
        tolerance=float(tolerance if tolerance is not None else cfg.resolved("tolerance")),
        value_min=value_min,
        value_max=value_max,
        metric=cfg.resolved("metric"),
        report=report,
    )
