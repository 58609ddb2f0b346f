"""``rarl-fast data``: counts, skips and histograms on stdout, and a legible contact sheet PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rarl_fast.cli import main


def test_data_command_on_the_synthetic_task(tmp_path: Path, capsys):
    out = tmp_path / "sheet.png"
    args = ["data", "--out", str(out), "data.synthetic_train_size=60", "data.synthetic_test_size=40"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "task: synthetic:shapes" in text and "rule: 'number of shapes'" in text
    assert "samples: train 60, test 40" in text and "skipped: 0" in text
    assert "value histogram (train):" in text and "value histogram (test):" in text
    train_hist = text.split("value histogram (train):\n")[1].split("value histogram (test):")[0].strip().split("\n")
    assert len(train_hist) == 10 and sum(int(line.split(")")[1].split()[0]) for line in train_hist) == 60
    assert f"wrote {out}" in text
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width == 1200 and im.height > 600
        # the four groups (N = 1, 2, 4, 8) show 15 thumbnails: plenty of non-white pixels
        assert int((np.asarray(im.convert("L")) < 250).sum()) > 15 * 40 * 40


def test_data_command_on_bar_with_two_groups_per_n(tmp_path: Path, capsys):
    out = tmp_path / "bar.png"
    assert main(["data", "--out", str(out), "--per-n", "2", "data.synthetic_task=bar"]) == 0
    text = capsys.readouterr().out
    assert "test groups of 4 image(s): 2 shown" in text and "1-image metric: mae" in text
    assert out.is_file()


def test_data_command_reports_a_missing_dataset(tmp_path: Path, capsys):
    missing = tmp_path / "no_such_folder"
    assert main(["data", "data.task=age", f"data.root={missing}"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_data_command_shows_an_unreadable_image_when_the_check_is_off(tmp_path: Path, capsys):
    import json

    Image.new("RGB", (40, 30), "red").save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines = [{"image": "good.png", "value": 1, "split": "train"}, {"image": "bad.png", "value": 2, "split": "test"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "sheet.png"
    args = ["data", "--out", str(out), "data.task=jsonl", f"data.root={tmp_path / 'm.jsonl'}", "data.rule=redness",
            "data.value_range=a number from 0 to 10", "data.tolerance=1", "data.group_sizes=[1]",
            "data.check_images=off", "sft.group_mix={1: 1.0}", "stage2.group_mix={1: 1.0}"]  # fmt: skip
    assert main(args) == 0  # the contact sheet shows the broken file as a grey box instead of dying on it
    assert f"wrote {out}" in capsys.readouterr().out and out.is_file()
