"""COCO-REM counting: one sample per (image, category) whose value is the number of that category's objects.

Reads COCO instances JSON (``instances_trainrem.json`` for train, ``instances_valrem.json`` for test) from
``root/`` or ``root/annotations/``, with images in ``train2017/`` and ``val2017/`` under ``root/`` or
``root/images/``. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from rarl_fast.data.samples import DataNotFoundError, LoadReport, Sample

__all__ = ["COCO_SPLITS", "load_cocorem"]

COCO_SPLITS = {"train": ("instances_trainrem.json", "train2017"), "test": ("instances_valrem.json", "val2017")}
"""split -> (annotation file, image folder)."""


def _first_existing(candidates: list[Path], what: str, is_dir: bool) -> Path:
    for path in candidates:
        if path.is_dir() if is_dir else path.is_file():
            return path
    raise DataNotFoundError(f"COCO-REM {what} not found; looked for: {', '.join(str(p) for p in candidates)}")


def _is_id(v: object) -> bool:
    """COCO ids are JSON integers (not bools)."""
    return type(v) is int


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataNotFoundError(f"cannot read COCO annotations {path}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise DataNotFoundError(f"{path} is not a COCO instances file (needs 'images' and 'annotations' lists)")
    return data


def _split_samples(split: str, data: dict[str, Any], image_dir: Path, report: LoadReport) -> list[Sample]:
    """Samples of one split; malformed annotations and crowd pairs counted in ``report.skipped``."""
    files = {
        im["id"]: im["file_name"]
        for im in data["images"]
        if isinstance(im, dict) and _is_id(im.get("id")) and isinstance(im.get("file_name"), str)
    }
    names = {
        c["id"]: c["name"]
        for c in data.get("categories") or []
        if isinstance(c, dict) and _is_id(c.get("id")) and isinstance(c.get("name"), str)
    }
    counts: dict[tuple[int, int], int] = defaultdict(int)
    crowd: set[tuple[int, int]] = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not _is_id(ann.get("image_id")) or not _is_id(ann.get("category_id")):
            report.skipped["malformed_annotation"] += 1
            continue
        pair = (ann["image_id"], ann["category_id"])
        if pair[0] not in files:
            report.skipped["annotation_unknown_image"] += 1
            continue
        if pair[1] not in names:
            report.skipped["annotation_unknown_category"] += 1
            continue
        if ann.get("iscrowd", 0):
            crowd.add(pair)
        else:
            counts[pair] += 1
    samples = []
    for image_id, category_id in sorted(set(counts) | crowd):
        if (image_id, category_id) in crowd:
            report.skipped["crowd"] += 1
            continue
        category = names[category_id]
        samples.append(
            Sample(
                sample_id=f"{split}:{image_id}:{category}",
                value=float(counts[(image_id, category_id)]),
                image=str(image_dir / files[image_id]),
                category=category,
            )
        )
    return samples


def load_cocorem(root: str | Path) -> tuple[list[Sample], list[Sample], LoadReport]:
    """Train and test samples of COCO-REM counting and the load report.

    One sample per (image, category) with at least one annotation: the value is the number of its annotations
    with ``iscrowd == 0``; a pair with any crowd annotation is skipped (``crowd``), since its count is unknown.
    Pairs without annotations (count 0) are not samples. Annotations naming an unknown image or category
    (``annotation_unknown_image``/``_category``) or without integer ids (``malformed_annotation``) are
    skipped. The sample id is ``<split>:<image_id>:<category name>``; the category name is used verbatim in
    the rule ``number of {category}``. Missing or broken images are dropped later by the shared image check,
    one count per pair.
    """
    root = Path(root).resolve()
    report = LoadReport(source=str(root))
    out = []
    for split, (json_name, folder) in COCO_SPLITS.items():
        ann_path = _first_existing([root / json_name, root / "annotations" / json_name], json_name, is_dir=False)
        image_dir = _first_existing([root / folder, root / "images" / folder], f"image folder {folder}/", True)
        samples = _split_samples(split, _read_json(ann_path), image_dir, report)
        report.notes.append(f"{split}: {ann_path} with images in {image_dir}")
        out.append(samples)
    if not out[0] and not out[1]:
        raise DataNotFoundError(f"no (image, category) annotations found in the COCO-REM files under {root}")
    return out[0], out[1], report
