"""Metrics agree with numpy/scipy, follow docs/method.md section 7's failure rules, and render the results table."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from scipy import stats

from rarl_fast.metrics import (
    MetricResult,
    counting_accuracy,
    evaluate_answers,
    group_kendall,
    listed_positions,
    mae,
    results_csv,
    results_markdown,
    single_predictions,
    srcc,
)
from rarl_fast.rewards.parse import parse_responses


def _answer(pairs: list[tuple[int, float]]) -> str:
    return "<think>x</think> <answer>" + json.dumps([{"image_id": i, "value": v} for i, v in pairs]) + "</answer>"


@pytest.mark.parametrize("seed", range(5))
def test_mae_and_accuracy_agree_with_numpy(seed: int):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 50, size=300).astype(float)
    pred = truth + rng.normal(0, 2, size=300)
    pred[:20] = truth[:20] + 0.5  # exact halves: round half to even
    assert mae(torch.tensor(pred), truth.tolist()) == pytest.approx(np.abs(pred - truth).mean(), abs=1e-12)
    expected = np.mean([round(p) == t for p, t in zip(pred.tolist(), truth.tolist())])
    assert counting_accuracy(pred.tolist(), truth.tolist()) == pytest.approx(expected, abs=1e-12)
    assert counting_accuracy([2.5, 3.5, -0.5], [2, 4, 0]) == 1.0


@pytest.mark.parametrize("seed", range(8))
def test_srcc_agrees_with_scipy_including_ties(seed: int):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 200))
    truth = rng.integers(0, 10, size=size).astype(float)  # many ties
    pred = truth + rng.normal(0, 3, size=size)
    if seed % 2:
        pred = np.round(pred)
    expected = stats.spearmanr(pred, truth).statistic
    if np.isnan(expected):
        assert srcc(pred.tolist(), truth.tolist()) == 0.0
    else:
        assert srcc(torch.tensor(pred), torch.tensor(truth)) == pytest.approx(expected, abs=1e-12)


def test_srcc_is_zero_where_undefined():
    assert srcc([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0 and srcc([1.0], [2.0]) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_group_kendall_agrees_with_scipy_on_random_answers(seed: int):
    rng = np.random.default_rng(seed)
    texts, truths, expected = [], [], []
    for _ in range(60):
        n = int(rng.choice([2, 4, 8]))
        truth = rng.permutation(100)[:n].astype(float).tolist()
        listed = (rng.permutation(n) + 1).tolist()
        texts.append(_answer([(i, truth[i - 1]) for i in listed]))
        truths.append(truth)
        expected.append(stats.kendalltau(np.arange(n), [truth[i - 1] for i in listed]).statistic)
    for n in (2, 4, 8):
        rows = [k for k, t in enumerate(truths) if len(t) == n]
        tau, failed = group_kendall([texts[k] for k in rows], [truths[k] for k in rows])
        assert not failed.any()
        np.testing.assert_allclose(tau.numpy(), [expected[k] for k in rows], atol=1e-12)


def test_listed_positions_first_occurrence_and_range():
    parsed = parse_responses([_answer([(3, 1), (9, 0), (1, 5), (3, 7), (2, 2)]), _answer([(1, 1)]), "garbage"])
    positions, first, complete = listed_positions(parsed, 3)
    assert positions.tolist() == [[1, 2, 0], [0, -1, -1], [-1, -1, -1]]
    assert first[0].tolist() == [True, False, True, False, True]
    assert complete.tolist() == [True, False, False]


def test_failure_rules_for_ranking():
    truth = [[10.0, 30.0, 20.0]]
    cases = {
        _answer([(1, 10), (3, 20), (2, 30)]): (1.0, False),
        _answer([(2, 30), (3, 20), (1, 10)]): (-1.0, False),
        _answer([(1, 10), (3, 20)]): (0.0, True),  # image 2 not listed
        _answer([(1, 10), (3, 20), (3, 25), (7, 0), (2, 30)]): (1.0, False),  # repeat and out-of-range ignored
        "<answer>[]</answer>": (0.0, True),  # unparseable
        _answer([(1, 10), (2, 30), (3, 20)]).replace("</answer>", ""): (0.0, True),
    }
    for text, (tau, failed) in cases.items():
        got_tau, got_failed = group_kendall([text], truth)
        assert (got_tau.item(), bool(got_failed.item())) == pytest.approx((tau, failed)), text
    cell = evaluate_answers(list(cases), truth * len(cases), metric="mae", value_min=0, value_max=116)
    assert cell.name == "kendall_tau" and cell.count == 6
    assert cell.value == pytest.approx((1 - 1 + 1) / 6) and cell.failure_rate == pytest.approx(3 / 6)


def test_failure_rules_for_one_image():
    texts = [_answer([(1, 12.0)]), "nonsense", _answer([(2, 3.0)]), _answer([(1, 40.0), (1, 1.0)])]
    truth = [[10.0], [58.0], [30.0], [40.0]]
    pred, failed = single_predictions(texts, midpoint=58.0)
    assert pred.tolist() == [12.0, 58.0, 58.0, 40.0] and failed.tolist() == [False, True, True, False]
    cell = evaluate_answers(texts, truth, metric="mae", value_min=0, value_max=116)
    assert cell == MetricResult("mae", (2 + 0 + 28 + 0) / 4, 0.5, 4)
    # a failure never counts as right, even when the midpoint rounds to the truth
    acc = evaluate_answers(texts, truth, metric="accuracy", value_min=0, value_max=116)
    assert acc.value == pytest.approx(1 / 4) and acc.failure_rate == 0.5
    rho = evaluate_answers(texts, truth, metric="srcc", value_min=0, value_max=116)
    assert rho.value == pytest.approx(stats.spearmanr([12.0, 58.0, 58.0, 40.0], [10, 58, 30, 40]).statistic)
    with pytest.raises(ValueError, match="metric"):
        evaluate_answers(texts, truth, metric="rmse", value_min=0, value_max=1)
    with pytest.raises(ValueError, match="truths"):
        evaluate_answers(texts, [[1.0]], metric="mae", value_min=0, value_max=1)


def _toy_results() -> dict[str, dict[str, dict[int, MetricResult]]]:
    return {
        "Qwen2.5-VL-3B": {
            "age": {1: MetricResult("mae", 6.31, 0.02, 200), 2: MetricResult("kendall_tau", 0.61, 0.1, 200)},
            "count": {1: MetricResult("accuracy", 0.5025, 0.0, 200), 8: MetricResult("kendall_tau", 0.2, 0.25, 200)},
        },
        "+ RARL": {
            "age": {
                1: MetricResult("mae", 4.02, 0.0, 200),
                2: MetricResult("kendall_tau", 0.843, 0.0, 200),
                4: MetricResult("kendall_tau", 0.831, 0.005, 200),
            },
        },
    }


def test_results_table_markdown():
    text = results_markdown(_toy_results())
    lines = text.strip().split("\n")
    assert lines[0] == (
        "| Model | UTKFace 1 img (MAE ↓) | UTKFace 2 imgs (τ ↑) | UTKFace 4 imgs (τ ↑) "
        "| COCO-REM 1 img (acc. % ↑) | COCO-REM 8 imgs (τ ↑) |"
    )
    assert lines[1] == "|:---|---:|---:|---:|---:|---:|"
    assert (
        lines[2]
        == "| Qwen2.5-VL-3B | 6.31 (fail 2.0%) | 0.610 (fail 10.0%) | - | 50.25 (fail 0.0%) | 0.200 (fail 25.0%) |"
    )
    assert lines[3] == "| + RARL | 4.02 (fail 0.0%) | 0.843 (fail 0.0%) | 0.831 (fail 0.5%) | - | - |"
    assert len(lines) == 4


def test_results_table_csv_round_trips():
    rows = list(csv.DictReader(io.StringIO(results_csv(_toy_results()))))
    assert [r["model"] for r in rows] == ["Qwen2.5-VL-3B", "+ RARL"]
    assert float(rows[1]["age/1img/mae"]) == 4.02 and float(rows[1]["age/4img/parse_failure_rate"]) == 0.005
    assert float(rows[0]["count/1img/accuracy"]) == 0.5025 and rows[0]["count/1img/count"] == "200"
    assert rows[1]["count/8img/kendall_tau"] == "" and rows[0]["age/4img/kendall_tau"] == ""
    assert list(rows[0])[:4] == ["model", "age/1img/mae", "age/1img/parse_failure_rate", "age/1img/count"]
