"""Loaders read the real on-disk formats: fixtures in exactly those formats, malformed items counted exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rarl_fast.config_loader import load_config
from rarl_fast.data import DataNotFoundError, load_task
from rarl_fast.data.coco import load_cocorem
from rarl_fast.data.images import check_images, probe_image
from rarl_fast.data.loaders import finish, load_ava, load_jsonl, load_utkface, parse_utkface_name
from rarl_fast.data.samples import LoadReport, Sample


def _jpeg(path: Path, size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (120, 80, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG", quality=90)
    return path


def _garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image")
    return path


def _truncated(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise((160, 120), 60).convert("RGB").save(path, "JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ----------------------------------------------------------------------------------------------------------
# Image checks
# ----------------------------------------------------------------------------------------------------------


def test_probe_image_reasons(tmp_path: Path):
    good, garbage, cut = _jpeg(tmp_path / "a.jpg"), _garbage(tmp_path / "b.jpg"), _truncated(tmp_path / "c.jpg")
    empty = tmp_path / "d.jpg"
    empty.write_bytes(b"")
    assert probe_image(good) is None
    assert probe_image(tmp_path / "missing.jpg") == "missing_image"
    assert probe_image(garbage) == "broken_image" and probe_image(empty) == "broken_image"
    assert probe_image(cut, "decode") == "broken_image"
    assert probe_image(cut, "header") is None  # the header alone looks fine: only decoding catches truncation
    assert probe_image(garbage, "off") is None and probe_image(tmp_path / "missing.jpg", "off") == "missing_image"


def test_check_images_probes_each_file_once_and_counts(tmp_path: Path):
    good, bad = _jpeg(tmp_path / "a.jpg"), _garbage(tmp_path / "b.jpg")
    samples = [
        Sample("1", 1.0, str(good), "cat"),
        Sample("2", 2.0, str(good), "dog"),
        Sample("3", 3.0, str(bad), "cat"),
        Sample("4", 4.0, str(bad), "dog"),
        Sample("5", 5.0, str(tmp_path / "none.jpg")),
    ]
    report = LoadReport(source="x")
    kept = check_images(samples, "decode", report)
    assert [s.sample_id for s in kept] == ["1", "2"]
    assert report.skipped == {"broken_image": 2, "missing_image": 1}


def test_check_images_in_parallel_threads(tmp_path: Path):
    samples = []
    for i in range(90):
        path = tmp_path / f"{i}.jpg"
        if i % 30 == 7:
            _truncated(path)
        elif i % 30 == 8:
            _garbage(path)
        elif i % 30 != 9:
            _jpeg(path, size=(20, 20))
        samples.append(Sample(str(i), float(i), str(path)))
    report = LoadReport(source="x")
    kept = check_images(samples, "decode", report, workers=4)
    assert report.skipped == {"broken_image": 6, "missing_image": 3}
    assert [s.sample_id for s in kept] == [str(i) for i in range(90) if i % 30 not in (7, 8, 9)]


def test_finish_raises_on_an_empty_split_naming_the_source(tmp_path: Path):
    report = LoadReport(source=str(tmp_path / "somewhere"))
    with pytest.raises(DataNotFoundError, match=r"no usable test samples in .*somewhere"):
        finish(
            [Sample("a", 1.0, str(_jpeg(tmp_path / "a.jpg")))],
            [Sample("b", 99.0, str(tmp_path / "a.jpg"))],
            report,
            value_min=0,
            value_max=10,
            check="decode",
            max_samples=None,
            seed=0,
        )
    assert report.skipped == {"value_out_of_range": 1}


# ----------------------------------------------------------------------------------------------------------
# UTKFace
# ----------------------------------------------------------------------------------------------------------

UTK_GOOD = {
    "1_0_0_20161219140623097.jpg.chip.jpg": 1,
    "26_1_2_20170116174525125.jpg.chip.jpg": 26,
    "40_0_3_20170119165539693.jpg.chip.jpg": 40,
    "116_1_0_20170120134035224.jpg.chip.jpg": 116,
    "20_1_0_20170116220224600.jpg": 20,
}
UTK_REPAIRED = {
    "39_1_20170116174525125.jpg.chip.jpg": (39, "missing_race_field"),
    "24_0_1_20170116220224657 .jpg.chip.jpg": (24, "space_before_jpg"),
    "55_0_0_20170116232725357jpg.chip.jpg": (55, "missing_dot"),
    "53__0_20170116184028385.jpg.chip.jpg": (53, "empty_field"),
    "44_1_4_20170116235150272.pg.jpg.chip.jpg": (44, "wrong_extension"),
    "30_0_1_201701162202246570.jpg.chip.jpg": (30, "timestamp_18_digits"),
}
UTK_BAD_NAMES = {
    "README.txt": "not_jpg",
    "abc_0_0_20170116220224657.jpg.chip.jpg": "unparseable_name",
    "30_0_1_2017011622.jpg.chip.jpg": "unparseable_name",
    "30_0_1_2_20170116220224657.jpg.chip.jpg": "unparseable_name",
    "30_x_1_20170116220224657.jpg.chip.jpg": "unparseable_name",
}


def _utkface(tmp_path: Path) -> Path:
    folder = tmp_path / "utk" / "UTKFace"
    for i, name in enumerate([*UTK_GOOD, *UTK_REPAIRED]):
        _jpeg(folder / name, colour=(i * 10, 50, 50))
    for name in UTK_BAD_NAMES:
        (folder / name).write_bytes(b"x")
    _jpeg(folder / "117_0_0_20170116220224657.jpg.chip.jpg")  # age beyond 116
    _garbage(folder / "31_0_0_20170116220224658.jpg.chip.jpg")
    _truncated(folder / "32_0_0_20170116220224659.jpg.chip.jpg")
    (folder / "subfolder").mkdir()
    return tmp_path / "utk"


@pytest.mark.parametrize("name", list(UTK_REPAIRED))
def test_utkface_malformed_names_are_repaired_by_rule(name: str):
    age, fixes = parse_utkface_name(name)
    assert (age, fixes) == (UTK_REPAIRED[name][0], [UTK_REPAIRED[name][1]])


def test_utkface_name_rules():
    assert parse_utkface_name("1_0_0_20161219140623097.jpg.chip.jpg") == (1, [])
    assert parse_utkface_name("1_0_0_20161219140623097.jpg") == (1, [])
    for name, reason in UTK_BAD_NAMES.items():
        assert parse_utkface_name(name) == (None, [reason])
    assert parse_utkface_name("7_0_20170116220224657 jpg") == (
        7,
        ["missing_dot", "space_before_jpg", "missing_race_field"],
    )


def test_utkface_loader_counts_every_case(tmp_path: Path):
    root = _utkface(tmp_path)
    cfg = load_config(None, ["data.task=age", f"data.root={root}", "data.test_fraction=0.5"])
    task = load_task(cfg.data)
    report = task.report
    kept = {s.sample_id: s.value for s in task.train + task.test}
    expected = {**UTK_GOOD, **{k: v[0] for k, v in UTK_REPAIRED.items()}}
    assert kept == expected
    assert report.skipped == {"not_jpg": 1, "unparseable_name": 4, "value_out_of_range": 1, "broken_image": 2}
    assert report.repaired == {v[1]: 1 for v in UTK_REPAIRED.values()}
    assert report.counts == {"train": len(task.train), "test": len(task.test)}
    assert not {s.sample_id for s in task.train} & {s.sample_id for s in task.test}
    assert (task.rule, task.value_range, task.tolerance, task.metric) == (
        "age",
        "an integer from 0 to 116",
        10.0,
        "mae",
    )
    assert all(Path(s.image).is_file() for s in task.train)
    again = load_task(cfg.data)
    assert [s.sample_id for s in again.test] == [s.sample_id for s in task.test]


def test_utkface_reads_crop_part1_and_split_csvs(tmp_path: Path):
    folder = tmp_path / "crop_part1"
    names = [f"{20 + i}_0_0_2017011622022465{i}.jpg.chip.jpg" for i in range(6)]
    for name in names:
        _jpeg(folder / name)
    test_csv = tmp_path / "utk_test.csv"
    # coral-cnn format: unnamed index column, file, age - 21 (a class label, ignored)
    test_csv.write_text(
        f",file,age\n18896,{names[0]},-1\n18897,{names[1]},0\n18898,missing_0_0_1.jpg.chip.jpg,3\n18899,,4\n"
    )
    train_csv = tmp_path / "utk_train.csv"
    train_csv.write_text(f",file,age\n1,{names[2]},1\n2,{names[3]},2\n3,{names[0]},-1\n")
    train, test, report = load_utkface(tmp_path, split_file=test_csv, train_split_file=train_csv)
    assert [s.sample_id for s in test] == names[:2]
    assert [s.sample_id for s in train] == names[2:4]  # names[0] is test: never both
    assert [s.value for s in test] == [20.0, 21.0]  # the age comes from the file name, not the CSV
    assert report.skipped == {"split_csv_unknown_image": 1, "split_csv_malformed_row": 1, "not_in_split_files": 2}
    train, test, _ = load_utkface(tmp_path, split_file=test_csv)
    assert [s.sample_id for s in train] == names[2:]


def test_utkface_finds_nothing(tmp_path: Path):
    with pytest.raises(DataNotFoundError, match=str(tmp_path)):
        load_utkface(tmp_path)
    (tmp_path / "UTKFace").mkdir()
    (tmp_path / "UTKFace" / "notes.txt").write_text("x")
    with pytest.raises(DataNotFoundError, match=r"no UTKFace image names found in .*UTKFace"):
        load_utkface(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# AVA
# ----------------------------------------------------------------------------------------------------------

AVA_ROWS = """1 1001 0 1 5 17 38 36 15 6 5 1 1 22 1396
2 1002 1 2 3 4 5 6 7 8 9 10 0 0 5
3 1003 0 0 0 0 0 0 0 0 0 4 14 15 200
4 1004 2 0 0 0 0 0 0 0 0 0 1 1 1

5 1005 0 0 1 0 0 0 0 0 0 0 0 0 7
6 1006 0 0 0 1 0 0 0 0 0 0 0 0 7
7 1007 0 0 0 0 0 0 0 0 0 0 0 0 7
8 1008 0 0 0 0 0 0 0 0 0 0 0 0
9 1009 0 0 x 0 0 0 0 0 0 0 0 0 7
10 1001 9 9 9 9 9 9 9 9 9 9 0 0 7
"""


def _ava(tmp_path: Path) -> Path:
    root = tmp_path / "AVA"
    root.mkdir()
    (root / "AVA.txt").write_text(AVA_ROWS)
    for i in (1001, 1002, 1003, 1004):
        _jpeg(root / "images" / f"{i}.jpg")
    _garbage(root / "images" / "1006.jpg")  # 1005 has no image file
    (root / "aesthetics_image_lists").mkdir()
    (root / "aesthetics_image_lists" / "generic_test.jpgl").write_text("1003\n1004\n9999\n")
    return root


def test_ava_loader_counts_every_case(tmp_path: Path):
    root = _ava(tmp_path)
    train, test, report = load_ava(root)
    assert [s.sample_id for s in train] == ["1001", "1002", "1005", "1006"]  # image checks come later
    assert [s.sample_id for s in test] == ["1003", "1004"]
    assert train[0].value == pytest.approx(
        sum(s * c for s, c in zip(range(1, 11), [0, 1, 5, 17, 38, 36, 15, 6, 5, 1])) / 124
    )
    assert train[1].value == pytest.approx(385 / 55) and test[0].value == 10.0 and test[1].value == 1.0
    assert report.skipped == {"no_votes": 1, "malformed_row": 2, "duplicate_id": 1, "test_id_not_in_ava_txt": 1}
    cfg = load_config(None, ["data.task=aesthetics", f"data.root={root}"])
    task = load_task(cfg.data)
    assert [s.sample_id for s in task.train] == ["1001", "1002"]
    assert task.report.skipped["missing_image"] == 1 and task.report.skipped["broken_image"] == 1
    assert task.report.counts == {"train": 2, "test": 2}
    assert (task.metric, task.value_min, task.value_max, task.tolerance) == ("srcc", 1.0, 10.0, 1.0)


def test_ava_missing_files_name_the_path(tmp_path: Path):
    with pytest.raises(DataNotFoundError, match=r"AVA.txt"):
        load_ava(tmp_path)
    (tmp_path / "AVA.txt").write_text(AVA_ROWS)
    with pytest.raises(DataNotFoundError, match=r"generic_test.jpgl"):
        load_ava(tmp_path)
    (tmp_path / "aesthetics_image_lists").mkdir()
    (tmp_path / "aesthetics_image_lists" / "generic_test.jpgl").write_text("1003\n")
    (tmp_path / "AVA.txt").write_text("garbage line\n")
    with pytest.raises(DataNotFoundError, match=r"no usable rows"):
        load_ava(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# COCO-REM
# ----------------------------------------------------------------------------------------------------------


def _ann(image_id, category_id, crowd=0, **extra):
    return {"id": 0, "image_id": image_id, "category_id": category_id, "iscrowd": crowd, "bbox": [0, 0, 1, 1], **extra}


def _coco(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "dining table"}]
    train_images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(1, 8)]
    train_anns = (
        [_ann(1, 1)] * 3
        + [_ann(2, 1)]
        + [_ann(3, 1)] * 2
        + [_ann(3, 2)]
        + [_ann(4, 2)] * 2
        + [_ann(4, 2, crowd=1)]  # the (4, dog) pair has a crowd: skipped
        + [_ann(5, 1)]  # image 5's file is missing
        + [_ann(6, 1)] * 51  # 51 > 50: out of range
        + [_ann(7, 3)] * 4
        + [_ann(99, 1), _ann(1, 42), {"image_id": 1}, "not a dict"]
    )
    val_images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (10, 11, 12)]
    val_anns = [_ann(10, 1), _ann(11, 1), _ann(11, 1), _ann(11, 2), _ann(12, 1)]
    for split, images, anns in (("train", train_images, train_anns), ("val", val_images, val_anns)):
        data = {"images": images, "annotations": anns, "categories": cats}
        path = root / "annotations" / f"instances_{split}rem.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    for i in (1, 2, 3, 4, 6, 7):
        _jpeg(root / "train2017" / f"{i:012d}.jpg")
    for i in (10, 11):
        _jpeg(root / "val2017" / f"{i:012d}.jpg")
    _truncated(root / "val2017" / "000000000012.jpg")
    return root


def test_cocorem_loader_counts_every_case(tmp_path: Path):
    root = _coco(tmp_path)
    train, test, report = load_cocorem(root)
    assert {s.sample_id: s.value for s in train} == {
        "train:1:cat": 3.0,
        "train:2:cat": 1.0,
        "train:3:cat": 2.0,
        "train:3:dog": 1.0,
        "train:5:cat": 1.0,
        "train:6:cat": 51.0,
        "train:7:dining table": 4.0,
    }
    assert all(s.category == s.sample_id.split(":")[2] for s in train + test)
    assert report.skipped == {
        "crowd": 1,
        "annotation_unknown_image": 1,
        "annotation_unknown_category": 1,
        "malformed_annotation": 2,
    }
    cfg = load_config(None, ["data.task=count", f"data.root={root}"])
    task = load_task(cfg.data)
    assert {s.sample_id for s in task.train} == {
        "train:1:cat",
        "train:2:cat",
        "train:3:cat",
        "train:3:dog",
        "train:7:dining table",
    }
    assert {s.sample_id: s.value for s in task.test} == {"test:10:cat": 1.0, "test:11:cat": 2.0, "test:11:dog": 1.0}
    skipped = task.report.skipped
    assert (skipped["missing_image"], skipped["value_out_of_range"], skipped["broken_image"]) == (1, 1, 1)
    # per N, categories with at least N distinct counts: train cat {3, 1, 2}, dog {1}, dining table {4}
    assert task.report.eligible_categories == {
        "train": {1: 3, 2: 1, 4: 0, 8: 0},
        "test": {1: 2, 2: 1, 4: 0, 8: 0},
    }
    assert task.rule == "number of {category}" and task.rule_for("dining table") == "number of dining table"
    assert task.metric == "accuracy" and task.tolerance == 2.0


def test_cocorem_missing_files_name_the_path(tmp_path: Path):
    with pytest.raises(DataNotFoundError, match=r"instances_trainrem.json"):
        load_cocorem(tmp_path)
    (tmp_path / "instances_trainrem.json").write_text("{}")
    with pytest.raises(DataNotFoundError, match=r"train2017"):
        load_cocorem(tmp_path)
    (tmp_path / "train2017").mkdir()
    with pytest.raises(DataNotFoundError, match=r"not a COCO instances file"):
        load_cocorem(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# JSONL manifest
# ----------------------------------------------------------------------------------------------------------


def _manifest(tmp_path: Path) -> Path:
    root = tmp_path / "mine"
    for i in range(6):
        _jpeg(root / "img" / f"{i}.jpg", colour=(i * 30, 0, 0))
    absolute = _jpeg(tmp_path / "elsewhere" / "abs.jpg")
    _garbage(root / "img" / "broken.jpg")
    lines = [
        json.dumps({"image": "img/0.jpg", "value": 10, "split": "train"}),
        json.dumps({"image": "img/1.jpg", "value": 20.5, "split": "train", "category": "red"}),
        json.dumps({"image": "img/2.jpg", "value": 30, "split": "train", "id": "third"}),
        json.dumps({"image": str(absolute), "value": 40, "split": "test"}),
        json.dumps({"image": "img/3.jpg", "value": 50, "split": "test"}),
        "",
        '{"image": "img/4.jpg", "value": ',
        "[1, 2]",
        json.dumps({"value": 3}),
        json.dumps({"image": "img/4.jpg", "value": "3"}),
        json.dumps({"image": "img/4.jpg", "value": True}),
        '{"image": "img/4.jpg", "value": NaN}',
        json.dumps({"image": "img/4.jpg", "value": 1, "split": "val"}),
        json.dumps({"image": "img/4.jpg", "value": 1, "category": 7}),
        json.dumps({"image": "img/4.jpg", "value": 1, "id": 17}),
        json.dumps({"image": "img/0.jpg", "value": 11, "split": "test"}),
        json.dumps({"image": "img/missing.jpg", "value": 1, "split": "train"}),
        json.dumps({"image": "img/broken.jpg", "value": 1, "split": "test"}),
        json.dumps({"image": "img/5.jpg", "value": 200, "split": "test"}),
    ]
    path = root / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_loader_counts_every_case(tmp_path: Path):
    path = _manifest(tmp_path)
    cfg = load_config(
        None,
        [
            "data.task=jsonl",
            f"data.root={path}",
            "data.rule=redness",
            "data.value_range=a number from 0 to 100",
            "data.tolerance=5",
        ],
    )
    task = load_task(cfg.data)
    assert [(s.sample_id, s.value) for s in task.train] == [("img/0.jpg", 10.0), ("img/1.jpg", 20.5), ("third", 30.0)]
    assert [s.sample_id for s in task.test][1:] == ["img/3.jpg"] and task.test[0].value == 40.0
    assert task.train[1].category == "red" and task.train[0].category is None
    assert task.train[0].image == str((path.parent / "img" / "0.jpg").resolve())
    assert task.report.skipped == {
        "bad_json": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "bad_value": 3,
        "bad_split": 1,
        "bad_category": 1,
        "bad_id": 1,
        "duplicate_id": 1,
        "missing_image": 1,
        "broken_image": 1,
        "value_out_of_range": 1,
    }
    assert (task.rule, task.value_range, task.tolerance) == ("redness", "a number from 0 to 100", 5.0)
    assert (task.value_min, task.value_max, task.metric) == (0.0, 100.0, "mae")


def test_jsonl_without_split_uses_a_stable_hash_split(tmp_path: Path):
    root = tmp_path / "m"
    lines = []
    for i in range(40):
        _jpeg(root / f"{i}.jpg")
        lines.append(json.dumps({"image": f"{i}.jpg", "value": i}))
    (root / "m.jsonl").write_text("\n".join(lines))
    train, test, report = load_jsonl(root / "m.jsonl", test_fraction=0.25, seed=3)
    assert len(train) + len(test) == 40 and 2 <= len(test) <= 20
    assert not {s.sample_id for s in train} & {s.sample_id for s in test}
    train2, test2, _ = load_jsonl(root / "m.jsonl", test_fraction=0.25, seed=3)
    assert train2 == train and test2 == test
    _, test3, _ = load_jsonl(root / "m.jsonl", test_fraction=0.25, seed=4)
    assert test3 != test
    assert "hash split" in " ".join(report.notes)


def test_jsonl_finds_nothing(tmp_path: Path):
    with pytest.raises(DataNotFoundError, match=r"manifest not found: .*nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n[1]\n")
    with pytest.raises(DataNotFoundError, match=r"no usable lines in manifest .*empty.jsonl"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_max_samples_takes_a_seeded_subset(tmp_path: Path):
    for i in range(12):
        _jpeg(tmp_path / "UTKFace" / f"{20 + i}_0_0_201701162202246{i:02d}.jpg.chip.jpg")
    base = ["data.task=age", f"data.root={tmp_path}", "data.test_fraction=0.5"]
    full = load_task(load_config(None, base).data)
    cfg = load_config(None, [*base, "data.max_samples=2"])
    task = load_task(cfg.data)
    assert len(task.train) == min(2, len(full.train)) and len(task.test) == min(2, len(full.test))
    assert {s.sample_id for s in task.train} <= {s.sample_id for s in full.train}
    assert [s.sample_id for s in load_task(cfg.data).train] == [s.sample_id for s in task.train]


def test_jsonl_line_that_is_not_utf8_is_an_error_naming_it(tmp_path: Path):
    from rarl_fast.data import DataFormatError

    _jpeg(tmp_path / "a.jpg")
    # two ids that decoding with replacement characters would make equal (both become "caf\ufffd")
    lines = [json.dumps({"image": "a.jpg", "value": 1, "id": "x"}).encode()]
    lines += [b'{"image": "a.jpg", "value": 2, "id": "caf\xe9"}', b'{"image": "a.jpg", "value": 3, "id": "caf\xe8"}']
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    column = lines[1].index(b"\xe9") + 1
    with pytest.raises(DataFormatError, match=rf"m\.jsonl line 2 is not UTF-8 text \(byte 0xe9 at column {column}\)"):
        load_jsonl(tmp_path / "m.jsonl")


def test_images_over_the_pixel_limit_are_skipped_without_decoding(tmp_path: Path, recwarn):
    small, large = _jpeg(tmp_path / "small.jpg", (40, 30)), _jpeg(tmp_path / "large.jpg", (400, 300))
    assert probe_image(large, "decode", max_pixels=100_000) == "oversized_image"
    assert probe_image(large, "header", max_pixels=100_000) == "oversized_image"
    assert probe_image(large, "off", max_pixels=100_000) is None  # off: the file exists, nothing more
    assert probe_image(small, "decode", max_pixels=100_000) is None
    report = LoadReport(source="x")
    samples = [Sample(sample_id=p.name, value=1.0, image=str(p)) for p in (small, large)]
    assert [s.sample_id for s in check_images(samples, "decode", report, max_pixels=100_000)] == ["small.jpg"]
    assert report.skipped == {"oversized_image": 1}
    from rarl_fast.data.images import BrokenImageError, ImageCache

    cache = ImageCache(min_pixels=56 * 56, max_pixels=112 * 112, max_image_pixels=100_000)
    with pytest.raises(BrokenImageError, match=r"more than data\.max_image_pixels=100000") as err:
        cache.get(str(large))
    assert err.value.reason == "oversized_image" and cache.failed == {str(large): "oversized_image"}
    assert cache.decodes == {}  # never decoded
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
