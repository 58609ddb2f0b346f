"""RMO, the Response Mutation Operation (docs/method.md section 5)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rarl_fast.rewards import score
from rarl_fast.rl import (
    BestCache,
    RMOSettings,
    group_advantages,
    group_std,
    gt_answer,
    longest_gt_answer,
    mutate_responses,
)
from rarl_fast.rl.rmo import group_draws, lowest_k

REWARD = {"alpha": 0.5, "beta": 0.5, "lam": 0.2}
TRUTH4 = [31.0, 12.0, 55.0, 40.0]
SETTINGS = {"mode": "stagnant", "source": "gt", "think": "fixed", "baseline": "group", "p_mut": 0.5, "k_mut": 1,
            "sigma_min": 1e-3, **REWARD, "weights": (1 / 3, 1 / 3, 1 / 3), "scale_by_std": True,
            "unbiased": False}  # fmt: skip


def _run(rewards, truths, seed=0, *, tolerance=10.0, texts=None, group_keys=None, cache=None, **kw):
    settings = RMOSettings(**{**SETTINGS, **kw})
    seeds = [1000 * seed + b for b in range(rewards.shape[0])]
    return mutate_responses(rewards, truths, settings, seeds=seeds, tolerance=tolerance, texts=texts,
                            group_keys=group_keys, cache=cache)  # fmt: skip


def _random_groups(seed: int, groups: int = 24, size: int = 8):
    """Stagnant groups at assorted levels (some perfect, some within sigma_min of perfect) and spread groups."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.2, 0.35, 0.8, 0.9985, 1.0, 0.9995], dtype=torch.float64)
    pick = torch.randint(0, len(levels), (groups,), generator=gen)
    rewards = levels[pick].unsqueeze(1).expand(groups, size).clone()
    rewards += 1e-5 * torch.rand(groups, size, generator=gen, dtype=torch.float64) * (pick != 5).unsqueeze(1)
    rewards = rewards.clamp(max=1.0)
    spread = torch.rand(groups, generator=gen) < 0.3
    rewards[spread] = torch.rand(int(spread.sum()), size, generator=gen, dtype=torch.float64)
    truths = [[float(v) for v in torch.randperm(60, generator=gen)[: 1 + b % 8].tolist()] for b in range(groups)]
    return rewards, truths


# ---------------------------------------------------------------- gt rendering


def test_gt_rendering_is_exact(data_dir):
    fixture = next(
        json.loads(line)
        for line in (data_dir / "rewards.jsonl").read_text().splitlines()
        if "RMO ground-truth" in line
    )
    assert gt_answer(fixture["truth"]) == fixture["text"]
    assert gt_answer([5.42, 6.17, 4.88]) == (
        '<think>Reference answer.</think> <answer>[{"image_id": 3, "value": 4.88}, '
        '{"image_id": 1, "value": 5.42}, {"image_id": 2, "value": 6.17}]</answer>'
    )
    assert gt_answer([0.1 + 0.2, 1e-7, 1e20, -3.0, 7]) == (
        '<think>Reference answer.</think> <answer>[{"image_id": 4, "value": -3}, {"image_id": 2, "value": 1e-07}, '
        '{"image_id": 1, "value": 0.30000000000000004}, {"image_id": 5, "value": 7}, '
        '{"image_id": 3, "value": 100000000000000000000}]</answer>'
    )


def test_gt_with_readings_reasons_in_prompt_order():
    assert gt_answer([5.42, 6.17, 4.88], think="readings") == (
        "<think>Image 1: 5.42. Image 2: 6.17. Image 3: 4.88.</think> "
        '<answer>[{"image_id": 3, "value": 4.88}, {"image_id": 1, "value": 5.42}, '
        '{"image_id": 2, "value": 6.17}]</answer>'
    )
    one = '<think>Image 1: 7.</think> <answer>[{"image_id": 1, "value": 7}]</answer>'
    assert gt_answer([7.0], think="readings") == one
    fixed, readings = gt_answer([3.0, 1.0]), gt_answer([3.0, 1.0], think="readings")
    assert fixed.split("</think>")[1] == readings.split("</think>")[1]
    with pytest.raises(ValueError, match="think must be one of"):
        gt_answer([1.0], think="free")
    truths = [[1.0], [5.42, 6.17, 4.88], [3.0, 1.0]]
    longest = max(len(gt_answer(t, think="readings")) for t in truths)
    assert longest_gt_answer(truths, think="readings") == longest > longest_gt_answer(truths)


@pytest.mark.parametrize("think", ["fixed", "readings"])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (0.5, 0.5), (0.3, 0.6)])
def test_gt_scores_the_maximum(alpha, beta, think):
    gen = torch.Generator().manual_seed(7)
    truths = []
    for n in range(1, 9):
        truths.append([float(v) for v in torch.randperm(117, generator=gen)[:n].tolist()])
        truths.append((torch.randperm(900, generator=gen)[:n].double() / 100 + 1).tolist())
    rb = score([gt_answer(t, think) for t in truths], truths, tolerance=1.0, alpha=alpha, beta=beta, lam=0.2)
    assert rb.total.tolist() == [0.2 + 0.8 * (alpha + beta)] * len(truths)
    assert rb.regression.tolist() == [1.0] * len(truths)


def test_longest_gt_answer():
    truths = [[1.0], [5.42, 6.17, 4.88], [3.0, 1.0]]
    lengths = [len(gt_answer(t)) for t in truths]
    assert longest_gt_answer(truths) == max(lengths)
    assert longest_gt_answer(truths, eos="<|im_end|>") == max(lengths) + len("<|im_end|>")
    assert longest_gt_answer(iter(truths), length=lambda s: s.count('"')) == 4 * 3
    assert longest_gt_answer([]) == 0


# ---------------------------------------------------------------- acceptance


@pytest.mark.parametrize("seed", range(6))
def test_p_mut_one_mutates_every_eligible_stagnant_group(seed):
    rewards, truths = _random_groups(seed)
    gt_reward = score([gt_answer(t) for t in truths], truths, tolerance=10.0, **REWARD).total
    res = _run(rewards, truths, seed, p_mut=1.0, eos="</s>")
    stagnant = group_std(rewards) < 1e-3
    eligible = stagnant & (rewards.mean(dim=1) < gt_reward - 1e-3)
    assert bool(eligible.any()) and bool((stagnant & ~eligible).any())
    group_mutated = res.mutated.any(dim=1)
    assert torch.equal(group_mutated, eligible)
    assert torch.equal(res.mutated.sum(dim=1), eligible.long())  # k_mut = 1
    spread = res.advantages.max(dim=1).values - res.advantages.min(dim=1).values
    assert bool((spread[eligible] > 0.5).all())
    ref_rows = gt_reward.unsqueeze(1).expand_as(rewards)
    assert torch.equal(res.rewards[res.mutated], ref_rows[res.mutated])
    assert torch.equal(res.rewards[~res.mutated], rewards[~res.mutated])
    torch.testing.assert_close(res.advantages, group_advantages(res.rewards), atol=0, rtol=0)
    for b in range(len(truths)):
        if eligible[b]:
            assert res.ref_texts[b] == gt_answer(truths[b]) + "</s>"
            assert res.ref_rewards[b].item() == gt_reward[b].item()
        else:
            assert res.ref_texts[b] is None and math.isnan(res.ref_rewards[b].item())
    m = res.metrics
    assert m["groups"].item() == len(truths)
    assert m["stagnant_before"].item() == stagnant.sum().item()
    after = (group_std(res.rewards) < 1e-3).sum().item()  # a 0.9985 group stays under sigma_min
    assert m["stagnant_after"].item() == after
    assert after < m["stagnant_before"].item()
    assert m["mutated"].item() == int(eligible.sum()) == m["mutated_groups"].item()
    assert m["ref_reward_sum"].item() == pytest.approx(gt_reward[eligible].sum().item())


def test_perfect_group_never_mutated():
    rewards = torch.ones(3, 8, dtype=torch.float64)
    rewards[1] = 0.9995  # within sigma_min of the reference: not eligible either
    for mode in ("stagnant", "always"):
        for source_kw in (
            {"source": "gt"},
            {"source": "best", "cache": BestCache(), "texts": ["x"] * 24, "group_keys": [(0,), (1,), (2,)]},
        ):
            res = _run(rewards, [TRUTH4, [1.0, 2.0], [3.0]], p_mut=1.0, mode=mode, **source_kw)
            assert not bool(res.mutated.any())
            assert torch.equal(res.rewards, rewards)


@pytest.mark.parametrize("mode", ["stagnant", "always"])
def test_p_mut_zero_changes_nothing(mode):
    rewards, truths = _random_groups(11)
    res = _run(rewards, truths, p_mut=0.0, mode=mode, k_mut=3)
    assert torch.equal(res.rewards, rewards)
    assert not bool(res.mutated.any())
    torch.testing.assert_close(res.advantages, group_advantages(rewards), atol=0, rtol=0)
    assert res.ref_texts == [None] * len(truths)
    assert res.metrics["mutated"].item() == 0 and res.metrics["ref_reward_sum"].item() == 0
    assert res.metrics["stagnant_after"].item() == res.metrics["stagnant_before"].item()


def test_same_seed_same_result_and_seeded_tie_breaking():
    rewards = torch.full((64, 8), 0.3, dtype=torch.float64)
    truths = [TRUTH4] * 64
    a = _run(rewards, truths, seed=5, p_mut=0.5)
    b = _run(rewards, truths, seed=5, p_mut=0.5)
    assert torch.equal(a.mutated, b.mutated) and torch.equal(a.advantages, b.advantages)
    assert a.ref_texts == b.ref_texts
    c = _run(rewards, truths, seed=6, p_mut=0.5)
    assert not torch.equal(a.mutated, c.mutated)
    assert 16 <= int(a.mutated.any(dim=1).sum()) <= 48  # p_mut = 0.5 over 64 eligible groups
    every = _run(rewards, truths, seed=5, p_mut=1.0)
    columns = every.mutated.nonzero()[:, 1]
    assert len(columns.unique()) >= 6  # ties in a stagnant group are broken at random, not always column 0


def test_k_mut_replaces_the_lowest():
    rewards = torch.tensor([[0.5, 0.1, 0.4, 0.1, 0.9, 0.6], [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    res = _run(rewards, [TRUTH4, TRUTH4], p_mut=1.0, k_mut=3, mode="always")
    assert res.mutated[0].tolist() == [False, True, True, True, False, False]
    assert int(res.mutated[1].sum()) == 3
    assert res.rewards[0].tolist() == [0.5, 1.0, 1.0, 1.0, 0.9, 0.6]
    stagnant_only = _run(rewards, [TRUTH4, TRUTH4], p_mut=1.0, k_mut=3)
    assert not bool(stagnant_only.mutated[0].any()) and int(stagnant_only.mutated[1].sum()) == 3


def test_per_group_tolerance_and_reward_weights():
    rewards = torch.zeros(2, 4, dtype=torch.float64)
    res = _run(rewards, [[3.0], [1.0, 2.0]], p_mut=1.0, tolerance=[1.0, 2.0], alpha=0.3, beta=0.6, lam=0.1)
    assert res.ref_rewards.tolist() == pytest.approx([0.1 + 0.9 * 0.9] * 2)


# ---------------------------------------------------------------- best source


def _answer(pairs):
    return "<think>t</think><answer>" + json.dumps([{"image_id": i, "value": v} for i, v in pairs]) + "</answer>"


def test_best_uses_cache_when_it_beats_the_group_else_gt():
    truths = [[31.0, 12.0], [31.0, 12.0], [31.0, 12.0]]
    keys = [(1, 2), (3, 4), (5, 6)]
    decent = _answer([(2, 17.0), (1, 31.0)])  # right order, one value off by 5
    decent_reward = score([decent], [truths[0]], tolerance=10.0, **REWARD).total.item()
    assert 0.5 < decent_reward < 1.0
    cache = BestCache()
    cache.load_state_dict({"keys": [[1, 2], [3, 4]], "texts": [decent, decent], "rewards": [0.0, 0.0]})
    rewards = torch.tensor([[0.2] * 4, [0.95] * 4, [0.2] * 4], dtype=torch.float64)
    texts = ["junk"] * 12
    res = _run(rewards, truths, p_mut=1.0, source="best", cache=cache, texts=texts, group_keys=keys, eos="<e>")
    assert res.ref_texts[0] == decent + "<e>"  # cached (re-scored, not the stored 0.0) beats 0.2
    assert res.ref_rewards[0].item() == decent_reward
    assert res.ref_texts[1] == gt_answer(truths[1]) + "<e>"  # cached does not beat 0.95: falls back to gt
    assert res.ref_texts[2] == gt_answer(truths[2]) + "<e>"  # nothing cached
    assert res.rewards[0].max().item() == decent_reward


def test_best_cache_consulted_before_update_and_round_trips():
    truths = [TRUTH4, TRUTH4]
    keys = [(10, 11, 12, 13), ("a", "b", "c", "d")]
    texts = [f"r{i}" for i in range(8)]
    rewards = torch.tensor([[0.1, 0.7, 0.3, 0.2], [0.4, 0.4, 0.4, 0.4]], dtype=torch.float64)
    cache = BestCache()
    res = _run(rewards, truths, p_mut=1.0, source="best", cache=cache, texts=texts, group_keys=keys)
    assert res.ref_texts[1] == gt_answer(TRUTH4)  # empty cache: gt, not this step's own best
    assert cache.get(keys[0]) == ("r1", 0.7) and cache.get(keys[1]) == ("r4", 0.4)
    _run(rewards * 0.5, truths, p_mut=0.0, cache=cache, texts=[f"s{i}" for i in range(8)], group_keys=keys)
    assert cache.get(keys[0]) == ("r1", 0.7)  # worse responses do not replace the cached best
    restored = BestCache()
    restored.load_state_dict(json.loads(json.dumps(cache.state_dict())))
    assert len(restored) == 2 and restored.get(list(keys[1])) == ("r4", 0.4)
    assert restored.state_dict() == cache.state_dict()


@pytest.mark.parametrize(
    "kw",
    [{"k_mut": 0}, {"k_mut": 4}, {"mode": "never"}, {"source": "oracle"}, {"source": "best"}, {"cache": BestCache()},
     {"p_mut": 1.5}],
    ids=["k0", "k=G", "mode", "source", "best-without-cache", "cache-without-texts", "p_mut"],
)  # fmt: skip
def test_bad_arguments_raise(kw):
    with pytest.raises(ValueError):
        _run(torch.zeros(2, 4, dtype=torch.float64), [TRUTH4, TRUTH4], **kw)


def test_mutation_renders_the_configured_reasoning():
    rewards = torch.tensor([[0.2] * 4], dtype=torch.float64)
    res = _run(rewards, [TRUTH4], p_mut=1.0, think="readings", eos="<e>")
    assert res.ref_texts[0] == gt_answer(TRUTH4, think="readings") + "<e>"
    assert res.ref_texts[0].startswith("<think>Image 1: ")
    with pytest.raises(ValueError, match="think must be one of"):
        _run(rewards, [TRUTH4], think="free")


@pytest.mark.parametrize("scale_by_std", [True, False], ids=["grpo", "dr_grpo"])
def test_sampled_baseline_normalizes_the_sampled_responses_among_themselves(scale_by_std):
    # group 0 is mutated (mode always, p_mut 1, k_mut 1: its 0.1 is replaced); group 1 is perfect, never mutated
    rewards = torch.tensor([[0.5, 0.1, 0.3, 0.7], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    kw = {"p_mut": 1.0, "mode": "always", "scale_by_std": scale_by_std}
    group = _run(rewards, [TRUTH4, TRUTH4], **kw)
    res = _run(rewards, [TRUTH4, TRUTH4], baseline="sampled", **kw)
    assert res.mutated.tolist() == group.mutated.tolist() == [[False, True, False, False], [False] * 4]
    assert torch.equal(res.rewards, group.rewards)
    ref = float(res.ref_rewards[0])
    assert res.advantages[0, 1] == group.advantages[0, 1]  # the reference keeps its eq. 9 advantage ...
    assert float(group.advantages[0, 1]) > 0
    sampled = torch.tensor([0.5, 0.3, 0.7], dtype=torch.float64)  # ... the sampled ones are centred on their own mean
    centered = sampled - sampled.mean()
    expect = centered / (centered.square().mean().sqrt() + 1e-6) if scale_by_std else centered
    assert res.advantages[0, [0, 2, 3]].tolist() == pytest.approx(expect.tolist(), abs=1e-12)
    assert float(res.advantages[0, [0, 2, 3]].sum()) == pytest.approx(0.0, abs=1e-12)
    # eq. 9 pushes every sampled response down against the reference
    whole = torch.tensor([0.5, ref, 0.3, 0.7], dtype=torch.float64)
    assert float(group.advantages[0, [0, 2, 3]].sum()) < 0 and group.advantages[0, 1] == pytest.approx(
        float((ref - whole.mean()) / ((whole - whole.mean()).square().mean().sqrt() + 1e-6))
        if scale_by_std
        else float(ref - whole.mean()),
        abs=1e-12,
    )
    assert torch.equal(res.advantages[1], group.advantages[1])  # an unmutated group is untouched
    with pytest.raises(ValueError, match="baseline must be one of"):
        _run(rewards, [TRUTH4, TRUTH4], baseline="mean")


def test_sampled_baseline_of_a_stagnant_remainder_is_zero():
    rewards = torch.tensor([[0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    res = _run(rewards, [TRUTH4], p_mut=1.0, k_mut=2, baseline="sampled")
    assert int(res.mutated.sum()) == 2
    assert res.advantages[~res.mutated].tolist() == [0.0, 0.0]  # no spread left among the sampled: no push
    assert bool((res.advantages[res.mutated] > 0).all())


def test_a_group_outcome_depends_on_its_seed_alone():
    """The trainer mutates all of a rank's groups in one call; each group's draws come from its own seed, so the
    result equals mutating the groups one at a time (and so does not depend on the batch or the rank)."""
    rewards, truths = _random_groups(3)
    settings = RMOSettings(**{**SETTINGS, "p_mut": 0.5, "mode": "always", "baseline": "sampled"})
    seeds = list(range(100, 100 + len(truths)))
    whole = mutate_responses(rewards, truths, settings, seeds=seeds, tolerance=10.0)
    for b in range(len(truths)):
        one = mutate_responses(rewards[b : b + 1], [truths[b]], settings, seeds=[seeds[b]], tolerance=10.0)
        assert torch.equal(one.mutated[0], whole.mutated[b]) and torch.equal(one.advantages[0], whole.advantages[b])
        assert one.ref_texts[0] == whole.ref_texts[b]
    draw, ties = group_draws([7, 7, 8], 4)
    assert draw[0] == draw[1] != draw[2] and torch.equal(ties[0], ties[1])


def test_lowest_k_breaks_ties_by_the_keys():
    rewards = torch.tensor([[0.2, 0.1, 0.1, 0.5]], dtype=torch.float64)
    assert lowest_k(rewards, 2, torch.tensor([[0.0, 0.9, 0.1, 0.0]])).tolist() == [[2, 1]]
    assert lowest_k(rewards, 2, torch.tensor([[0.0, 0.1, 0.9, 0.0]])).tolist() == [[1, 2]]
    assert lowest_k(rewards, 3, torch.rand(1, 4))[0, 2].item() == 0
