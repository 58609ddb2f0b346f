"""Ablation variants (configs/ablations/), `rarl-fast ablate` at toy size, `rarl-fast report` and the paired
differences behind it, and the paper's published rows."""

from __future__ import annotations

import csv
import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch

from rarl_fast.ablation import find_variants, load_variant, stage1_signature, variant_config
from rarl_fast.config import ConfigError
from rarl_fast.config_loader import dump_config, load_config, overlay_config

ROOT = Path(__file__).resolve().parents[1]
UTKFACE = ROOT / "configs" / "utkface_3b.yaml"
ALL = ["base", "sft", "reg_only", "rank_only", "stage1_only", "no_rmo", "rarl"]


def _answer(items: list[tuple[int, float]]) -> str:
    return "<think>t</think> <answer>" + json.dumps([{"image_id": i, "value": v} for i, v in items]) + "</answer>"


# ----------------------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------------------


def test_every_variant_is_an_overlay_that_names_its_table():
    base = load_config(UTKFACE)
    variants = {v.name: v for v in find_variants(ALL, config_path=UTKFACE)}
    assert list(variants) == ALL
    for name in variants:
        text = (ROOT / "configs" / "ablations" / f"{name}.yaml").read_text()
        assert text.startswith("# ") and "Table" in text.split("variant:")[0], name  # says what it reproduces
    assert [variants[n].train for n in ALL] == ["none", "sft", "rarl", "rarl", "rarl", "rarl", "rarl"]
    cfg = {n: variant_config(base, v, Path("/tmp/x")) for n, v in variants.items()}
    assert cfg["reg_only"].stage_reward_weights(cfg["reg_only"].stage1) == (1.0, 0.0)
    assert cfg["reg_only"].stage_reward_weights(cfg["reg_only"].stage2) == (1.0, 0.0)
    assert cfg["rank_only"].stage_reward_weights(cfg["rank_only"].stage1) == (0.0, 1.0)
    assert cfg["rank_only"].stage_reward_weights(cfg["rank_only"].stage2) == (0.0, 1.0)
    assert cfg["rarl"].stage_reward_weights(cfg["rarl"].stage2) == (0.5, 0.5) and cfg["rarl"].stage2.rmo
    assert not cfg["no_rmo"].stage2.rmo and cfg["no_rmo"].stage2.enabled
    assert not cfg["stage1_only"].stage2.enabled
    assert cfg["rarl"].output_dir == "/tmp/x" and cfg["rarl"].run_name == "rarl"
    # apart from their folder, the full method and the "none"/"sft" variants are the benchmark config itself
    for name in ("rarl", "base", "sft"):
        cfg[name].output_dir, cfg[name].run_name = base.output_dir, base.run_name
        assert dump_config(cfg[name]) == dump_config(base), name


def test_the_rl_variants_share_stage_1_exactly_when_it_is_the_same():
    base = load_config(UTKFACE)
    variants = find_variants(["reg_only", "rank_only", "stage1_only", "no_rmo", "rarl"], config_path=UTKFACE)
    want = stage1_signature(base)
    assert all(stage1_signature(variant_config(base, v, Path("r"))) == want for v in variants)
    # with 2-image groups in stage 1 the ranking term exists there: ranking only trains another stage 1
    mixed = load_config(UTKFACE, ["stage1.group_mix={1: 0.5, 2: 0.5}"])
    by_name = {v.name: variant_config(mixed, v, Path("r")) for v in variants}
    assert stage1_signature(by_name["rank_only"]) != stage1_signature(mixed)
    assert stage1_signature(by_name["no_rmo"]) == stage1_signature(mixed)
    assert stage1_signature(load_config(UTKFACE, ["stage1.steps=7"])) != want
    assert stage1_signature(load_config(UTKFACE, ["stage1.enabled=false"])) is None


def test_overlay_replaces_a_mapping_field_whole_and_names_its_file(tmp_path):
    base = load_config(UTKFACE)
    cfg = overlay_config(base, {"stage2": {"group_mix": {8: 1.0}, "rmo": False}}, "x.yaml")
    assert cfg.stage2.group_mix == {8: 1.0} and not cfg.stage2.rmo and cfg.stage2.steps == base.stage2.steps
    with pytest.raises(ConfigError, match=r"'stage2.rmoo' \(x.yaml\): unknown key"):
        overlay_config(base, {"stage2": {"rmoo": False}}, "x.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage2: {rmo: false}\n")
    with pytest.raises(ConfigError, match=r"variant\.train"):
        load_variant(bad)
    bad.write_text("variant: {train: rarl, lable: x}\n")
    with pytest.raises(ConfigError, match=r"variant\.lable"):
        load_variant(bad)
    with pytest.raises(ConfigError, match=r"no variant 'nope'.*'no_rmo'"):
        find_variants(["nope"], config_path=UTKFACE)
    with pytest.raises(ConfigError, match="at least one"):
        find_variants([" ", ""], config_path=UTKFACE)
    with pytest.raises(ConfigError, match="distinct"):
        find_variants(["rarl", "rarl"], config_path=UTKFACE)
    mine = tmp_path / "long_stage2.yaml"
    mine.write_text("variant: {train: rarl}\nstage2: {steps: 9}\n")
    (v,) = find_variants([str(mine)])
    assert v.name == "long_stage2" and v.label == "long_stage2" and variant_config(base, v, tmp_path).stage2.steps == 9


# ----------------------------------------------------------------------------------------------------------
# Paired differences and the paper's rows
# ----------------------------------------------------------------------------------------------------------


def test_paired_cell_difference_for_each_metric():
    from scipy.stats import spearmanr

    from rarl_fast.compare import paired_cell_difference

    rng = random.Random(3)
    truth = [float(rng.randint(0, 50)) for _ in range(12)]
    pa = [t + rng.choice([-2, 0, 0, 1]) for t in truth]
    pb = [t + rng.choice([-9, -3, 0, 4]) for t in truth]
    rows_a = [
        {"n": 1, "key": [f"s{i}"], "truth": [t], "response": _answer([(1, p)])}
        for i, (t, p) in enumerate(zip(truth, pa))
    ]
    rows_b = [
        {"n": 1, "key": [f"s{i}"], "truth": [t], "response": _answer([(1, p)])}
        for i, (t, p) in enumerate(zip(truth, pb))
    ]
    rows_b[0]["response"] = "no answer"  # a failure: the midpoint 25 for MAE and SRCC, wrong for accuracy
    pb[0] = 25.0
    d = [abs(a - t) - abs(b - t) for a, b, t in zip(pa, pb, truth)]
    mae = paired_cell_difference(rows_a, rows_b, 1, metric="mae", value_min=0, value_max=50)
    assert mae["diff"] == pytest.approx(statistics.fmean(d)) and mae["se"] == pytest.approx(
        statistics.stdev(d) / 12**0.5
    )
    assert mae["groups"] == 12 and mae["a"] == pytest.approx(statistics.fmean(abs(a - t) for a, t in zip(pa, truth)))
    acc = paired_cell_difference(rows_a, rows_b, 1, metric="accuracy", value_min=0, value_max=50)
    hits = [float(a == t) - float(b == t and i > 0) for i, (a, b, t) in enumerate(zip(pa, pb, truth))]
    assert acc["diff"] == pytest.approx(statistics.fmean(hits)) and acc["se"] == pytest.approx(
        statistics.stdev(hits) / 12**0.5
    )
    # SRCC is not a mean: its SE is the delete-one jackknife, checked here against scipy's Spearman
    got = paired_cell_difference(rows_a, rows_b, 1, metric="srcc", value_min=0, value_max=50)
    whole = spearmanr(pa, truth)[0] - spearmanr(pb, truth)[0]
    loo = [spearmanr(pa[:i] + pa[i + 1 :], truth[:i] + truth[i + 1 :])[0]
           - spearmanr(pb[:i] + pb[i + 1 :], truth[:i] + truth[i + 1 :])[0] for i in range(12)]  # fmt: skip
    mean = statistics.fmean(loo)
    assert got["diff"] == pytest.approx(whole) and got["se"] == pytest.approx(
        (11 / 12 * sum((x - mean) ** 2 for x in loo)) ** 0.5
    )
    with pytest.raises(ValueError, match="same test groups"):
        paired_cell_difference(rows_a, rows_b[1:], 1, metric="mae")


def test_paper_rows_and_model_sizes():
    from rarl_fast.paper import model_size, paper_rows

    assert model_size("Qwen/Qwen2.5-VL-3B-Instruct") == "3B" and model_size("Qwen2.5-VL-7B-Instruct") == "7B"
    assert model_size("/runs/utkface_3b/model") is None and model_size("tiny") is None
    (utk,) = paper_rows("age", "3B")
    assert (utk.variant, utk.table, utk.values) == ("rarl", 2, {1: 4.02, 2: 0.843, 4: 0.831, 8: 0.806})
    (coco,) = paper_rows("count", None)
    cells = coco.cells()
    assert cells[1].name == "accuracy" and cells[1].value == pytest.approx(0.6873)  # printed as 68.73 %
    assert cells[8].name == "kendall_tau" and math.isnan(cells[8].failure_rate) and cells[8].count == 0
    assert paper_rows("aesthetics", "7B") == [] and paper_rows("synthetic") == []


def _run_folder(root: Path, name: str, overrides: list[str], answers: dict[int, list[str]]) -> None:
    """A run folder as `rarl-fast eval` leaves it: config.yaml and eval/<name>.jsonl (truths: id order)."""
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", overrides)
    (root / name / "eval").mkdir(parents=True)
    dump_config(cfg, root / name / "config.yaml")
    lines = []
    for n, responses in answers.items():
        for g, response in enumerate(responses):
            lines.append({"model": name, "n": n, "key": [f"{n}-{g}-{i}" for i in range(n)],
                          "truth": [float(g + i) for i in range(n)], "response": response})  # fmt: skip
    (root / name / "eval" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_report_puts_runs_and_the_papers_rows_side_by_side(tmp_path):
    from PIL import Image

    from rarl_fast.cli import main

    age = ["data.task=age", "data.root=/nowhere", "model.name_or_path=Qwen/Qwen2.5-VL-3B-Instruct"]
    right, wrong = _answer([(1, 1), (2, 2)]), _answer([(2, 2), (1, 1)])
    singles = [_answer([(1, g + 3)]) for g in range(4)]  # |error| 3 on every 1-image group
    _run_folder(tmp_path / "utk", "rarl", age, {1: singles, 2: [right, right, right, wrong]})
    _run_folder(tmp_path / "utk", "sft", age, {1: [_answer([(1, g)]) for g in range(4)], 2: [wrong] * 4})
    _run_folder(tmp_path / "shapes", "rarl", [], {1: [_answer([(1, g)]) for g in range(4)], 2: [right] * 4})
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "utk"), str(tmp_path / "shapes"), "--paper", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    with (out / "report.csv").open() as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    # rows from both folders meet in one row per name; each benchmark has its columns
    assert list(table) == ["rarl", "sft", "paper: Qwen2.5-VL-3B + RARL"]
    assert float(table["rarl"]["age/1img/mae"]) == pytest.approx(3.0)
    assert float(table["rarl"]["age/2img/kendall_tau"]) == pytest.approx(0.5)
    assert float(table["rarl"]["synthetic:shapes/2img/kendall_tau"]) == pytest.approx(1.0)
    assert table["sft"]["synthetic:shapes/1img/accuracy"] == ""  # sft was not run on that benchmark
    paper = table["paper: Qwen2.5-VL-3B + RARL"]
    assert float(paper["age/1img/mae"]) == 4.02 and float(paper["age/8img/kendall_tau"]) == 0.806
    assert paper["age/8img/parse_failure_rate"] == "" and paper["age/8img/count"] == "0"
    assert "UTKFace from the paper's Table 2" in md and "no transcribed rows for synthetic:shapes" in md
    with (out / "differences.csv").open() as f:
        diffs = list(csv.DictReader(f))
    paired = {(d["b"], d["task"], d["n"]): d for d in diffs if d["kind"] == "paired"}
    assert set(paired) == {("sft", "age", "1"), ("sft", "age", "2")}
    assert float(paired[("sft", "age", "2")]["diff"]) == pytest.approx(1.5)  # 0.5 - (-1)
    assert float(paired[("sft", "age", "2")]["se"]) == pytest.approx(statistics.stdev([2, 2, 2, 0]) / 2)
    assert float(paired[("sft", "age", "1")]["diff"]) == pytest.approx(3.0)  # MAE 3 vs 0
    ours_vs_paper = [d for d in diffs if d["kind"] == "paper"]
    assert {(d["a"], d["n"]) for d in ours_vs_paper} == {("rarl", "1"), ("rarl", "2")}
    assert "| rarl − sft | +3.00 ± 0.00 * | +1.500 ± 0.500 * |" in md
    assert Image.open(out / "report.png").size[0] > 800
    # a folder without evaluations is a one-line error
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2


# ----------------------------------------------------------------------------------------------------------
# `rarl-fast ablate` at toy size
# ----------------------------------------------------------------------------------------------------------


def _utkface(folder: Path, count: int = 40) -> Path:
    """UTKFace-shaped data: tiny one-colour JPEGs whose file names carry the age."""
    from PIL import Image

    rng = random.Random(0)
    faces = folder / "UTKFace"
    faces.mkdir(parents=True)
    for i in range(count):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (32, 32), colour).save(faces / f"{rng.randint(1, 90)}_0_0_20170109{i:09d}.jpg.chip.jpg")
    return folder


@pytest.mark.timeout(600)
def test_ablate_two_variants_then_report(tiny_vlm_dir, tmp_path, monkeypatch):
    from test_train import tiny_overrides
    from transformers import AutoModelForImageTextToText

    from rarl_fast.cli import main
    from rarl_fast.tracking import read_metrics
    from rarl_fast.train import train

    data = ["data.task=age", f"data.root={_utkface(tmp_path / 'utk')}", "rollout.max_new_tokens=64"]
    overrides = tiny_overrides(
        tiny_vlm_dir, tmp_path / "runs", **{"checkpoint.save_every": 0, "checkpoint.keep_last": 1}
    )
    args = ["-c", str(ROOT / "configs" / "demo_cpu.yaml"), *overrides, *data]
    assert main(["ablate", "--variants", "no_rmo,rarl", *args]) == 0
    root = tmp_path / "runs" / "run"
    manifest = json.loads((root / "ablation.json").read_text())
    assert [(v["name"], v["shared_stage1"]) for v in manifest["variants"]] == [("no_rmo", True), ("rarl", True)]
    shared = read_metrics(root / "shared_stage1")
    assert [r["step"] for r in shared] == [1, 2]
    for name in ("no_rmo", "rarl"):
        rows = read_metrics(root / name)
        assert [(r["step"], r["stage"]) for r in rows] == [(1, 1), (2, 1), (3, 2), (4, 2)]
        assert rows[:2] == shared  # stage 1 is the shared run's
    assert all("rmo/mutated" not in r for r in read_metrics(root / "no_rmo"))
    assert all(r["rmo/mutated"] > 0 for r in read_metrics(root / "rarl")[2:])
    # branching stage 2 from the shared stage-1 checkpoint trains what one uninterrupted run trains
    direct = train(load_config(ROOT / "configs" / "demo_cpu.yaml", [*overrides, *data, "run_name=direct"]))
    want = direct.hf_model.state_dict()
    got = AutoModelForImageTextToText.from_pretrained(root / "rarl" / "model").state_dict()
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)

    assert main(["report", str(root), "--paper"]) == 0
    with (root / "report.csv").open() as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    assert list(table) == ["no_rmo", "rarl", "paper: Qwen2.5-VL-3B + RARL"]
    for name in ("no_rmo", "rarl"):  # every variant x N cell, with its failure rate and its 2 test groups
        for n, metric in ((1, "mae"), (2, "kendall_tau")):
            assert table[name][f"age/{n}img/{metric}"] != "" and table[name][f"age/{n}img/count"] == "2"
    assert float(table["paper: Qwen2.5-VL-3B + RARL"]["age/2img/kendall_tau"]) == 0.843
    with (root / "differences.csv").open() as f:
        diffs = list(csv.DictReader(f))
    assert {(d["kind"], d["a"], d["b"], d["n"]) for d in diffs} == {
        ("paired", "rarl", "no_rmo", "1"), ("paired", "rarl", "no_rmo", "2"),
        ("paper", "rarl", "paper: Qwen2.5-VL-3B + RARL", "1"), ("paper", "rarl", "paper: Qwen2.5-VL-3B + RARL", "2"),
    }  # fmt: skip
    assert (root / "report.png").is_file()

    # run again: everything is evaluated already, nothing trains or evaluates
    def refuse(*a, **kw):
        raise AssertionError("a finished variant ran again")

    monkeypatch.setattr("rarl_fast.commands.run_rarl", refuse)
    monkeypatch.setattr("rarl_fast.commands.run_eval", refuse)
    assert main(["ablate", "--variants", "no_rmo,rarl", *args]) == 0
    # the same folders with another config: an error, and nothing is overwritten
    before = (root / "rarl" / "config.yaml").read_text()
    assert main(["ablate", "--variants", "rarl", *args, "stage2.steps=3"]) == 2
    assert (root / "rarl" / "config.yaml").read_text() == before


@pytest.mark.timeout(600)
def test_demo_with_ablations_at_toy_size(tiny_vlm_dir, tmp_path, monkeypatch):
    from test_train import tiny_overrides

    from rarl_fast import demo
    from rarl_fast.cli import main
    from rarl_fast.tracking import read_metrics

    monkeypatch.setattr(demo, "_spare_cores", lambda cfg: False)
    overrides = tiny_overrides(tiny_vlm_dir, tmp_path, **{"sft.steps": 2})
    assert (
        main(["demo", "--processes", "1", "--ablations", "-c", str(ROOT / "configs" / "demo_cpu.yaml"), *overrides])
        == 0
    )
    root = tmp_path / "run"
    summary = json.loads((root / "demo_summary.json").read_text())
    assert list(summary["results"]) == [
        "untrained", "SFT warm start", "SFT warm start + 4 SFT steps", "SFT warm start + RARL (4 steps)",
        "SFT warm start + RARL stage1_only (2 steps)", "SFT warm start + RARL no_rmo (4 steps)",
        "SFT warm start + RARL reg_only (4 steps)",
    ]  # fmt: skip
    for name in ("stage1_only", "no_rmo", "reg_only"):  # RARL minus each, paired over the 2 test groups of N = 2
        gap = summary[f"rarl_vs_{name}"]
        assert set(gap["per_n"]) == {"2"} and gap["per_n"]["2"]["groups"] == 2
        assert gap["verdict"] in {"ahead", "behind", "within test-set noise"}
    stage1 = read_metrics(root / "shared_stage1")
    for name in ("rarl", "no_rmo", "reg_only"):  # every branch's stage 2 starts from the one stage-1 run
        assert read_metrics(root / name)[:2] == stage1 and len(read_metrics(root / name)) == 4
    assert {"shared_stage1", "no_rmo", "reg_only", "rarl"} <= set(summary["curves"])
    assert all(Path(p).is_file() for p in summary["curves"].values())
    table = (root / "results.md").read_text()
    assert "| SFT warm start + RARL no_rmo (4 steps) |" in table
