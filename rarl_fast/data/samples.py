"""The records every loader produces: samples, the loaded task and its load report.

A :class:`Sample` is one image with its true value; a :class:`TaskData` is a task's train and test samples with
the prompt's rule and value range, the reward tolerance and the report of what the loader read and skipped.
Everything here is plain data (no config objects), so groups, collation and metrics depend on nothing else.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias, runtime_checkable

from rarl_fast.errors import UsageError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DataFormatError",
    "DataNotFoundError",
    "ImageRef",
    "LoadReport",
    "Metric",
    "RenderedImage",
    "Sample",
    "TaskData",
    "hash_unit",
    "seeded_subset",
]



@runtime_checkable
class RenderedImage(Protocol):
    """An image drawn on demand from a deterministic spec (the synthetic benchmark's), instead of read from a file."""

    def render(self) -> Image.Image:
        """The image, the same pixels every time."""
        ...


ImageRef: TypeAlias = "str | RenderedImage"
"""Where a sample's image comes from: an absolute file path, or a spec that renders deterministically."""

Metric = Literal["mae", "accuracy", "srcc"]


class DataNotFoundError(UsageError, FileNotFoundError):
    """A loader found no usable data (or a required file) at the configured path; the message names the path."""


class DataFormatError(UsageError, ValueError):
    """A data file cannot be read as it is (e.g. a manifest line that is not UTF-8); the message names the line."""


@dataclass(frozen=True)
class Sample:
    """One image and its true value.

    Attributes:
        sample_id: stable and unique within the dataset (file name, AVA id, ``<image_id>:<category>``...).
        value: the true value (float; integer-valued for age and counts).
        image: an absolute file path or a :class:`RenderedImage` (e.g. a synthetic benchmark image).
        category: the COCO category name for counting (groups of N are drawn within one category), else None.
    """

    sample_id: str
    value: float
    image: ImageRef
    category: str | None = None


@dataclass
class LoadReport:
    """What a loader read: samples per split, items skipped (dropped) and repaired (kept by a rule), by reason.

    Attributes:
        source: the path (or synthetic task) that was read.
        counts: samples kept per split, ``{"train": ..., "test": ...}``.
        skipped: reason -> items dropped (malformed rows, missing or broken images, out-of-range values...).
        repaired: reason -> items kept after a documented fix (e.g. UTKFace names without a race field).
        eligible_categories: split -> N -> categories with at least N distinct values (COCO-REM counting only).
        notes: free-form lines (which folder was read, which split file was used...).
    """

    source: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)
    eligible_categories: dict[str, dict[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        out = [f"source: {self.source}"]
        out += [f"  {note}" for note in self.notes]
        out.append("samples: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        for title, counter in (("skipped", self.skipped), ("repaired (kept)", self.repaired)):
            total = sum(counter.values())
            out.append(f"{title}: {total}")
            out += [f"  {reason}: {count}" for reason, count in sorted(counter.items())]
        for split, per_n in self.eligible_categories.items():
            text = ", ".join(f"N={n}: {c}" for n, c in sorted(per_n.items()))
            out.append(f"eligible categories ({split}): {text}")
        return out


@dataclass(frozen=True)
class TaskData:
    """A loaded task: samples per split and everything a prompt, the reward and the metrics need.

    Attributes:
        task: ``age``, ``count``, ``aesthetics``, ``jsonl`` or ``synthetic:<name>``.
        train, test: the samples of each split (disjoint ids).
        rule: the quantity in the prompt; for counting a template with ``{category}``, see :meth:`rule_for`.
        value_range: the value-range phrase of the prompt.
        tolerance: regression tolerance delta (eq. 3).
        value_min, value_max: numeric ends of the value range (failed 1-image answers count as their midpoint).
        metric: the 1-image metric (``mae``, ``accuracy`` or ``srcc``).
        report: what the loader read and skipped.
    """

    task: str
    train: list[Sample]
    test: list[Sample]
    rule: str
    value_range: str
    tolerance: float
    value_min: float
    value_max: float
    metric: Metric
    report: LoadReport

    @property
    def midpoint(self) -> float:
        """Middle of the value range: the prediction a failed 1-image answer counts as (docs/method.md section 7)."""
        return (self.value_min + self.value_max) / 2

    def rule_for(self, category: str | None) -> str:
        """The rule with ``{category}`` replaced by the group's category (counting), else the rule itself."""
        if category is None or "{category}" not in self.rule:
            return self.rule
        return self.rule.replace("{category}", category)

    def split(self, name: Literal["train", "test"]) -> list[Sample]:
        """The samples of split ``name``."""
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return self.train if name == "train" else self.test


def hash_unit(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by ``(seed, key)``, stable across runs and machines (unlike ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def seeded_subset(samples: list[Sample], k: int | None, seed: int) -> list[Sample]:
    """At most ``k`` samples, a random subset fixed by ``seed`` (kept in their original order); all when k is None."""
    if k is None or len(samples) <= k:
        return samples
    chosen = set(sorted(range(len(samples)), key=lambda i: hash_unit(seed, "subset:" + samples[i].sample_id))[:k])
    return [s for i, s in enumerate(samples) if i in chosen]
