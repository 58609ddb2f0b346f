"""Group building and the group sampler: distinct values, N respected, one category, reproducible, resumable."""

from __future__ import annotations

import functools
import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rarl_fast.data import Group, GroupSampler, Sample, build_groups, build_test_groups, build_train_groups
from rarl_fast.data.groups import eligible_category_counts, truth_json
from rarl_fast.data.samples import LoadReport, TaskData

SETTINGS = settings(max_examples=40, deadline=None)


def _samples(values: list[float], categories: list[str | None] | None = None) -> list[Sample]:
    cats = categories or [None] * len(values)
    return [Sample(f"s{i}", float(v), f"/img/{i}.jpg", c) for i, (v, c) in enumerate(zip(values, cats))]


sample_lists = st.lists(
    st.tuples(st.integers(0, 12), st.sampled_from([None, "cat", "dog"])), min_size=1, max_size=60
).map(lambda rows: _samples([v for v, _ in rows], [c for _, c in rows]))


def _check(groups: list[Group], samples: list[Sample], n: int) -> None:
    by_id = {s.sample_id: s for s in samples}
    for g in groups:
        assert g.n == n and len(g.samples) == n
        assert len(set(g.values)) == n, "values must be pairwise distinct"
        assert len(set(g.key)) == n, "no image twice"
        assert g.key == tuple(s.sample_id for s in g.samples)
        assert all(by_id[s.sample_id] == s for s in g.samples)
        assert g.values == [s.value for s in g.samples]
        assert len({s.category for s in g.samples}) == 1, "one category per group"
        assert g.category == g.samples[0].category


@SETTINGS
@given(samples=sample_lists, n=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**31), k=st.integers(0, 30))
def test_groups_respect_n_distinct_values_and_categories(samples, n, seed, k):
    kw = dict(seed=seed, rule="number of {category}", value_range="r", tolerance=2.0)
    groups = build_groups(samples, n, num_groups=k, **kw)
    _check(groups, samples, n)
    assert groups == build_groups(samples, n, num_groups=k, **kw), "reproducible under the seed"
    assert len(groups) <= k
    assert len({g.key for g in groups}) == len(groups), "no group twice"
    eligible = eligible_category_counts(samples, [n])[n]
    if eligible == 0:
        assert groups == []
    if n == 1:
        assert len(groups) == min(k, len(samples))
    for g in groups:
        assert g.rule == (f"number of {g.category}" if g.category else "number of {category}")


@SETTINGS
@given(samples=sample_lists, seed=st.integers(0, 2**31))
def test_default_count_and_one_image_groups_cover_every_sample(samples, seed):
    kw = dict(seed=seed, rule="age", value_range="r", tolerance=1.0)
    ones = build_groups(samples, 1, num_groups=None, **kw)
    assert sorted(g.key[0] for g in ones) == sorted(s.sample_id for s in samples)
    twos = build_groups(samples, 2, num_groups=None, **kw)
    _check(twos, samples, 2)
    assert len(twos) <= (len(samples) + 1) // 2


def test_seed_and_stream_change_the_groups():
    samples = _samples([i % 20 for i in range(200)])
    kw = dict(num_groups=50, rule="age", value_range="r", tolerance=1.0)
    a = build_groups(samples, 4, seed=0, **kw)
    assert a == build_groups(samples, 4, seed=0, **kw)
    assert a != build_groups(samples, 4, seed=1, **kw)
    assert a != build_groups(samples, 4, seed=0, stream="test", **kw)


def test_image_order_within_a_group_is_unbiased():
    """Values are drawn frequency-first; the images must still be shuffled into prompt order."""
    samples = _samples([i % 3 if i % 2 else i % 10 for i in range(600)])
    groups = build_groups(samples, 2, num_groups=2000, seed=0, rule="r", value_range="r", tolerance=1.0)
    ascending = sum(g.values[0] < g.values[1] for g in groups) / len(groups)
    assert 0.45 < ascending < 0.55
    groups = build_groups(samples, 4, num_groups=2000, seed=0, rule="r", value_range="r", tolerance=1.0)
    first = Counter(min(range(4), key=lambda i: g.values[i]) for g in groups)
    assert all(400 < first[i] < 600 for i in range(4)), first


def test_categories_are_drawn_in_proportion_to_their_samples():
    samples = _samples([i % 10 for i in range(900)], ["cat"] * 600 + ["dog"] * 300)
    groups = build_groups(samples, 4, num_groups=1500, seed=0, rule="r", value_range="r", tolerance=1.0)
    share = sum(g.category == "cat" for g in groups) / len(groups)
    assert 0.62 < share < 0.71


def test_group_rejects_broken_invariants():
    a, b = Sample("a", 1.0, "/a"), Sample("b", 1.0, "/b")
    with pytest.raises(ValueError, match="pairwise distinct"):
        Group.of([a, b], "r", "v", 1.0)
    with pytest.raises(ValueError, match="twice"):
        Group.of([a, a], "r", "v", 1.0)
    with pytest.raises(ValueError, match="does not match"):
        Group(key=("x",), samples=(a,), rule="r", value_range="v", tolerance=1.0)


def test_truth_json_matches_the_rmo_reference_format():
    assert truth_json([30.0, 12.0, 45.5]) == (
        '[{"image_id": 2, "value": 12}, {"image_id": 1, "value": 30}, {"image_id": 3, "value": 45.5}]'
    )
    assert json.loads(truth_json([0.1 + 0.2]))[0]["value"] == 0.1 + 0.2


def _task(n_train: int = 400, n_test: int = 120) -> TaskData:
    train = [Sample(f"tr{i}", float(i % 37), f"/t/{i}") for i in range(n_train)]
    test = [Sample(f"te{i}", float(i % 29), f"/e/{i}") for i in range(n_test)]
    return TaskData(
        task="age",
        train=train,
        test=test,
        rule="age",
        value_range="an integer from 0 to 116",
        tolerance=10.0,
        value_min=0.0,
        value_max=116.0,
        metric="mae",
        report=LoadReport(source="x"),
    )


def test_train_and_test_groups_of_a_task():
    task = _task()
    train = build_train_groups(task, [1, 2, 4, 8], seed=0)
    assert {n: len(g) for n, g in train.items()} == {1: 400, 2: 200, 4: 100, 8: 50}
    assert build_train_groups(task, [1, 2], seed=0, groups_per_n=7)[2].__len__() == 7
    assert len(build_train_groups(task, [1, 2], seed=0, groups_per_n=7)[1]) == 400  # N = 1: every sample
    test = build_test_groups(task, [1, 2, 4, 8], seed=0, num_groups=50)
    assert all(len(g) == 50 for g in test.values())
    assert all(s.sample_id.startswith("te") for gs in test.values() for g in gs for s in g.samples)
    assert build_test_groups(task, [4], seed=0, num_groups=50)[4] == test[4], "fixed test groups"
    assert len(build_test_groups(task, [1], seed=0, num_groups=500)[1]) == 120
    g = test[4][0]
    assert (g.rule, g.value_range, g.tolerance) == ("age", "an integer from 0 to 116", 10.0)


# ----------------------------------------------------------------------------------------------------------
# GroupSampler
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _pools() -> dict[int, list[Group]]:
    return build_train_groups(_task(), [1, 2, 4, 8], seed=0)


@SETTINGS
@given(
    weights=st.lists(st.integers(0, 5), min_size=4, max_size=4).filter(any),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**31),
)
def test_sampler_batches_follow_the_mix(weights, batch_size, seed):
    pools = _pools()
    mix = dict(zip([1, 2, 4, 8], map(float, weights)))
    sampler = GroupSampler(pools, mix, batch_size=batch_size, seed=seed)
    total = sum(weights)
    for _ in range(5):
        batch = sampler.next_batch()
        assert len(batch) == batch_size
        counts = Counter(g.n for g in batch)
        for n, w in mix.items():
            exact = batch_size * w / total
            assert int(exact) <= counts.get(n, 0) <= int(exact) + 1
            if w == 0:
                assert counts.get(n, 0) == 0
        assert all(g in pools[g.n] for g in batch)


def test_sampler_visits_every_group_once_per_pass():
    pools = _pools()
    sampler = GroupSampler(pools, {8: 1.0}, batch_size=5, seed=3)
    seen = [g.key for _ in range(10) for g in sampler.next_batch()]
    assert sorted(seen) == sorted(g.key for g in pools[8])
    second = [g.key for _ in range(10) for g in sampler.next_batch()]
    assert sorted(second) == sorted(seen) and second != seen


@SETTINGS
@given(seed=st.integers(0, 2**31), before=st.integers(0, 30), after=st.integers(1, 10))
def test_sampler_is_reproducible_and_resumes_exactly(seed, before, after):
    pools = _pools()
    mix = {1: 0.25, 2: 0.25, 4: 0.25, 8: 0.25}
    straight = GroupSampler(pools, mix, batch_size=4, seed=seed)
    expected = [[g.key for g in straight.next_batch()] for _ in range(before + after)]
    first = GroupSampler(pools, mix, batch_size=4, seed=seed)
    for _ in range(before):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # plain data, survives a checkpoint
    resumed = GroupSampler(pools, mix, batch_size=4, seed=seed)
    resumed.load_state_dict(state)
    assert [[g.key for g in resumed.next_batch()] for _ in range(after)] == expected[before:]


def test_sampler_rejects_impossible_mixes():
    pools = _pools()
    with pytest.raises(ValueError, match="N=3"):
        GroupSampler(pools, {3: 1.0}, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="no training groups"):
        GroupSampler({**pools, 8: []}, {8: 1.0}, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="positive mix"):
        GroupSampler(pools, {1: 0.0}, batch_size=2, seed=0)
    sampler = GroupSampler(pools, {1: 1.0, 2: 1.0}, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="state has N"):
        sampler.load_state_dict(GroupSampler(pools, {1: 1.0}, batch_size=2, seed=0).state_dict())
