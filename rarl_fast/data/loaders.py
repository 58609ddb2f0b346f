"""Loaders of the real datasets' on-disk formats (UTKFace, AVA, a JSONL manifest); COCO-REM is in ``coco.py``.

Nothing is downloaded. Each loader returns ``(train, test, report)``: samples in a fixed order and a
:class:`LoadReport` that counts every dropped item by reason (``skipped``) and every item kept after a fix
(``repaired``). :func:`finish` applies the rules all loaders share: values outside the task's range are
dropped, ``max_samples`` takes a seeded subset per split, images are checked (missing or broken files are
dropped and counted), and a split left empty raises :class:`DataNotFoundError` naming the path.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from rarl_fast.data.images import MAX_IMAGE_PIXELS, CheckMode, check_images
from rarl_fast.data.samples import DataFormatError, DataNotFoundError, LoadReport, Sample, hash_unit, seeded_subset

__all__ = [
    "finish",
    "hash_split",
    "load_ava",
    "load_jsonl",
    "load_utkface",
    "parse_utkface_name",
]

Split = tuple[list[Sample], list[Sample], LoadReport]


def hash_split(samples: list[Sample], test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, test): a sample is test when ``hash_unit(seed, 'split:' + id) < test_fraction`` (stable per id)."""
    train, test = [], []
    for s in samples:
        (test if hash_unit(seed, "split:" + s.sample_id) < test_fraction else train).append(s)
    return train, test


def _read_lines(path: Path) -> list[str]:
    """The lines of the UTF-8 text file ``path``; a line that is not UTF-8 raises :class:`DataFormatError` naming it
    (decoding with replacement characters could make two different ids equal)."""
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataFormatError(
                f"{path} line {number} is not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}): "
                "save the file as UTF-8"
            ) from None
    return lines


def _count(report: LoadReport, reason: str, k: int) -> None:
    """Add ``k`` skips for ``reason`` (no entry when k is 0)."""
    if k:
        report.skipped[reason] += k


def finish(
    train: list[Sample],
    test: list[Sample],
    report: LoadReport,
    *,
    value_min: float,
    value_max: float,
    check: CheckMode,
    max_samples: int | None,
    seed: int,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[list[Sample], list[Sample]]:
    """Range filter, seeded cap, image check (``max_pixels``: larger images are skipped as oversized) and counts;
    raises :class:`DataNotFoundError` on an empty split."""
    out = []
    for name, samples in (("train", train), ("test", test)):
        kept = [s for s in samples if value_min <= s.value <= value_max]
        _count(report, "value_out_of_range", len(samples) - len(kept))
        kept = seeded_subset(kept, max_samples, seed)
        kept = check_images(kept, check, report, max_pixels=max_pixels)
        report.counts[name] = len(kept)
        out.append(kept)
    for name, samples in zip(("train", "test"), out):
        if not samples:
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items())) or "nothing"
            raise DataNotFoundError(f"no usable {name} samples in {report.source} (skipped: {skipped})")
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------
# UTKFace
# ----------------------------------------------------------------------------------------------------------

_UTK_NAME = re.compile(r"(?P<stem>.*?)(?P<dot>\.?)jpg(?:\.chip\.jpg)?")
_DIGITS = re.compile(r"[0-9]+")


def parse_utkface_name(name: str) -> tuple[int | None, list[str]]:
    """``(age, repairs)`` from a UTKFace file name ``[age]_[gender]_[race]_[datetime].jpg[.chip.jpg]``.

    The age is the first ``_`` field; the name is kept when it has 3 or 4 fields, the first an integer and
    the last a 17-digit ``yyyymmddHHMMSSFFF`` timestamp. Known malformed names are kept by rule, each fix
    listed in ``repairs``: ``missing_dot`` (``...357jpg``), ``wrong_extension`` (``....pg.jpg``),
    ``space_before_jpg`` (``...657 .jpg``), ``empty_field`` (``53__0_...``), ``missing_race_field`` (3 fields),
    ``timestamp_18_digits``. Otherwise ``(None, [reason])`` with reason ``not_jpg`` or ``unparseable_name``.
    """
    match = _UTK_NAME.fullmatch(name)
    if match is None:
        return None, ["not_jpg"]
    stem, repairs = match["stem"], []
    if not match["dot"]:
        repairs.append("missing_dot")
    if stem.endswith(".pg"):
        stem = stem[:-3]
        repairs.append("wrong_extension")
    if stem != stem.rstrip():
        stem = stem.rstrip()
        repairs.append("space_before_jpg")
    fields = stem.split("_")
    if len(fields) == 3:
        repairs.append("missing_race_field")
    elif len(fields) != 4:
        return None, ["unparseable_name"]
    age, middle, stamp = fields[0], fields[1:-1], fields[-1]
    if not _DIGITS.fullmatch(age) or not _DIGITS.fullmatch(stamp) or len(stamp) not in (17, 18):
        return None, ["unparseable_name"]
    if any(f and not _DIGITS.fullmatch(f) for f in middle):
        return None, ["unparseable_name"]
    if any(not f for f in middle):
        repairs.append("empty_field")
    if len(stamp) == 18:
        repairs.append("timestamp_18_digits")
    return int(age), repairs


def _utkface_folder(root: Path) -> Path:
    for sub in ("UTKFace", "crop_part1"):
        if (root / sub).is_dir():
            return root / sub
    if root.is_dir() and any(p.name.endswith("jpg") for p in root.iterdir()):
        return root
    raise DataNotFoundError(
        f"no UTKFace images under {root}: expected a folder UTKFace/ or crop_part1/ of "
        "[age]_[gender]_[race]_[datetime].jpg(.chip.jpg) files, or such files in the folder itself"
    )


def _split_csv_names(path: Path, report: LoadReport) -> list[str]:
    """File names listed in a coral-cnn split CSV (header ``,file,age``; only the ``file`` column is used)."""
    if not path.is_file():
        raise DataNotFoundError(f"split file not found: {path}")
    rows = list(csv.reader(_read_lines(path)))
    if not rows or "file" not in rows[0]:
        raise DataNotFoundError(f"split file {path} has no 'file' column in its header (expected ',file,age')")
    col = rows[0].index("file")
    names = []
    for row in rows[1:]:
        if not row:
            continue
        if len(row) <= col or not row[col].strip():
            report.skipped["split_csv_malformed_row"] += 1
            continue
        names.append(row[col].strip())
    return names


def load_utkface(
    root: str | Path,
    *,
    split_file: str | Path | None = None,
    train_split_file: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """UTKFace: ages from file names in ``root/UTKFace/`` or ``root/crop_part1/`` (or ``root`` itself).

    ``split_file`` lists the test images by exact file name (coral-cnn CSV, whose ``age`` column is a class
    label, age - 21, so the age is always read from the file name); ``train_split_file`` the training images,
    else train is every other image. Without ``split_file`` the split is :func:`hash_split`. Names in a split
    file with no such image count as ``split_csv_unknown_image``; images in neither list as
    ``not_in_split_files``. The sample id is the file name.
    """
    folder = _utkface_folder(Path(root).resolve())
    report = LoadReport(source=str(folder))
    samples: list[Sample] = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        age, fixes = parse_utkface_name(path.name)
        if age is None:
            report.skipped[fixes[0]] += 1
            continue
        for fix in fixes:
            report.repaired[fix] += 1
        samples.append(Sample(sample_id=path.name, value=float(age), image=str(path)))
    if not samples:
        raise DataNotFoundError(f"no UTKFace image names found in {folder}")
    if split_file is None:
        report.notes.append(f"split: hash of file name, test fraction {test_fraction}, seed {seed}")
        train, test = hash_split(samples, test_fraction, seed)
        return train, test, report
    by_name = {s.sample_id: s for s in samples}
    test_names = _split_csv_names(Path(split_file), report)
    train_names = _split_csv_names(Path(train_split_file), report) if train_split_file is not None else None
    report.notes.append(f"test split: {split_file}; train split: {train_split_file or 'every other image'}")
    listed = set(test_names) | set(train_names or ())
    _count(report, "split_csv_unknown_image", sum(1 for n in listed if n not in by_name))
    test_set = set(test_names)
    test = [s for s in samples if s.sample_id in test_set]
    if train_names is None:
        train = [s for s in samples if s.sample_id not in test_set]
    else:
        train_set = set(train_names) - test_set
        train = [s for s in samples if s.sample_id in train_set]
        _count(report, "not_in_split_files", sum(1 for s in samples if s.sample_id not in listed))
    return train, test, report


# ----------------------------------------------------------------------------------------------------------
# AVA
# ----------------------------------------------------------------------------------------------------------


def load_ava(root: str | Path) -> Split:
    """AVA: mean scores from ``root/AVA.txt``, images ``root/images/<id>.jpg``, test ids from
    ``root/aesthetics_image_lists/generic_test.jpgl``, train = every other row.

    Each AVA.txt line has 15 space-separated integers: index, image id, the vote counts for scores 1..10, two
    tag ids and a challenge id; the value is ``sum(s * c_s) / sum(c_s)``. Skipped by reason: ``malformed_row``
    (not 15 integer fields), ``no_votes``, ``duplicate_id`` (the first row is kept), ``test_id_not_in_ava_txt``;
    blank lines are ignored. The sample id is the image id.
    """
    root = Path(root).resolve()
    table, test_list = root / "AVA.txt", root / "aesthetics_image_lists" / "generic_test.jpgl"
    for path in (table, test_list):
        if not path.is_file():
            raise DataNotFoundError(f"AVA file not found: {path} (expected AVA.txt and {test_list.relative_to(root)})")
    report = LoadReport(source=str(root))
    samples: dict[str, Sample] = {}
    for line in table.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 15 or not all(_DIGITS.fullmatch(f) for f in fields):
            report.skipped["malformed_row"] += 1
            continue
        image_id, counts = fields[1], [int(c) for c in fields[2:12]]
        total = sum(counts)
        if total == 0:
            report.skipped["no_votes"] += 1
            continue
        if image_id in samples:
            report.skipped["duplicate_id"] += 1
            continue
        mean = sum(score * c for score, c in zip(range(1, 11), counts)) / total
        samples[image_id] = Sample(sample_id=image_id, value=mean, image=str(root / "images" / f"{image_id}.jpg"))
    if not samples:
        raise DataNotFoundError(f"no usable rows in {table}")
    test_ids = {t for line in _read_lines(test_list) for t in line.split()}
    _count(report, "test_id_not_in_ava_txt", sum(1 for t in test_ids if t not in samples))
    test = [s for i, s in samples.items() if i in test_ids]
    train = [s for i, s in samples.items() if i not in test_ids]
    report.notes.append(f"test split: {test_list}")
    return train, test, report


# ----------------------------------------------------------------------------------------------------------
# JSONL manifest
# ----------------------------------------------------------------------------------------------------------


def _json_number(v: object) -> float | None:
    if type(v) in (int, float) and math.isfinite(v):  # type: ignore[arg-type]
        return float(v)  # type: ignore[arg-type]
    return None


def load_jsonl(path: str | Path, *, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """A JSONL manifest: one ``{"image": path, "value": v}`` object per line (users' own ordinal data).

    Relative image paths are resolved against the manifest's folder. Optional keys: ``id`` (a string; default
    the image path as written), ``split`` (``train`` or ``test``; default :func:`hash_split`), ``category``
    (a string; groups are then drawn within one category). Skipped by reason: ``bad_json``, ``not_an_object``,
    ``missing_field`` (no string ``image`` or no ``value``), ``bad_value`` (not a finite JSON number),
    ``bad_split``, ``bad_category``, ``bad_id`` (not a non-empty string), ``duplicate_id``; blank lines are ignored.
    A line that is not UTF-8 is an error naming it (:class:`DataFormatError`), never decoded with replacements.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise DataNotFoundError(f"manifest not found: {path}")
    report = LoadReport(source=str(path))
    fixed: dict[str, list[Sample]] = {"train": [], "test": []}
    unsplit: list[Sample] = []
    seen: set[str] = set()
    for line in _read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            report.skipped["bad_json"] += 1
            continue
        if not isinstance(row, dict):
            report.skipped["not_an_object"] += 1
            continue
        image, split, category = row.get("image"), row.get("split"), row.get("category")
        if not isinstance(image, str) or not image or "value" not in row:
            report.skipped["missing_field"] += 1
            continue
        value = _json_number(row["value"])
        if value is None:
            report.skipped["bad_value"] += 1
            continue
        if split is not None and split not in fixed:
            report.skipped["bad_split"] += 1
            continue
        if category is not None and not isinstance(category, str):
            report.skipped["bad_category"] += 1
            continue
        sample_id = row.get("id", image)
        if not isinstance(sample_id, str) or not sample_id:
            report.skipped["bad_id"] += 1
            continue
        if sample_id in seen:
            report.skipped["duplicate_id"] += 1
            continue
        seen.add(sample_id)
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        sample = Sample(sample_id=sample_id, value=value, image=str(image_path), category=category)
        (fixed[split] if split is not None else unsplit).append(sample)
    if not seen:
        raise DataNotFoundError(f"no usable lines in manifest {path}")
    train, test = hash_split(unsplit, test_fraction, seed)
    if unsplit:
        report.notes.append(f"{len(unsplit)} lines without 'split': hash split, test fraction {test_fraction}")
    return fixed["train"] + train, fixed["test"] + test, report
