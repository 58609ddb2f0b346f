"""The two-stage RARL trainer (docs/method.md sections 4-6).

One step reads top to bottom: ``rollout`` -> ``score`` -> ``mutate`` (RMO, stage 2) -> ``advantages`` ->
``update_policy`` -> ``log``. Stage 1 (1-image prompts, regression reward, no RMO) then stage 2 (mixed N, full
reward, RMO) are two calls of :func:`run_stage` with two stage configs; stage 2 continues from stage 1's
weights and both use the same frozen reference (the initial model).

Data parallelism: every rank draws the same global batch of groups and keeps its round-robin share; rewards,
RMO and advantages are computed per group on the rank that owns it; the loss is normalized by the step's
global token (or row) count, and metrics are reduced across ranks before logging. The model is whole on every
rank (DDP) or sharded (FSDP2, :mod:`rarl_fast.sharding`); the step is the same.

A run owns its folder (:mod:`rarl_fast.run_folder`); ``--resume`` continues from the newest usable checkpoint
(:func:`~rarl_fast.checkpoint.resume_checkpoint`) with the checkpoint's config (:mod:`rarl_fast.resume`). Skipped
optimizer steps are counted over the whole run, and a run that took none ends with an error, not a results table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rarl_fast.checkpoint import latest_checkpoint, resume_checkpoint, save_checkpoint
from rarl_fast.config import Config, ConfigError, StageConfig
from rarl_fast.config_loader import dump_config
from rarl_fast.errors import RunInterrupted
from rarl_fast.evaluate import held_out_eval
from rarl_fast.policy import StepCounts
from rarl_fast.resume import check_resume_config, record_resume
from rarl_fast.rewards import RewardBreakdown, score
from rarl_fast.rl.advantages import group_advantages
from rarl_fast.rl.rmo import BestCache, RMOSettings, longest_gt_answer, mutate_responses, stagnant_groups
from rarl_fast.rl.splice import completion_texts, splice_references
from rarl_fast.rollout import awake
from rarl_fast.rollout.base import Rollouts
from rarl_fast.rollout.sampling import stable_seed
from rarl_fast.runtime import Runtime, build_runtime
from rarl_fast.schedule import lr_at
from rarl_fast.tracking import STAGE_IDS, MetricsLogger, start_trackers, truncate_metrics
from rarl_fast.update import NonFiniteCounter, build_optimizer, optimizer_step, reset_optimizer

if TYPE_CHECKING:
    from rarl_fast.data.groups import Group, GroupSampler

log = logging.getLogger(__name__)

__all__ = ["StageState", "check_completion_budget", "run_stage", "train"]

STAGES = ("stage1", "stage2")


@dataclass
class StageState:
    """Where a stage is: its config, sampler and counters (everything a checkpoint must restore)."""

    name: str
    stage: StageConfig
    sampler: GroupSampler
    alpha: float
    beta: float
    rmo: RMOSettings  # the stage's RMO settings (used when ``stage.rmo``)
    nonfinite: NonFiniteCounter  # the run's: shared by both stages
    step: int = 0  # optimizer steps done in this stage
    best: BestCache = field(default_factory=BestCache)


# ----------------------------------------------------------------------------------------------------------
# One step, phase by phase
# ----------------------------------------------------------------------------------------------------------


def rollout(rt: Runtime, groups: list[Group], seed: int, version: Hashable | None = None) -> Rollouts:
    """G completions for each of this rank's groups, sampled by the engine (counter-based seeds); the engine is
    woken, given the policy's weights unless it holds ``version`` already, and put to sleep again. A sharded
    policy is gathered whole for the rollout (the engine decodes with it, or receives it) and resharded after."""
    from rarl_fast.data import collate

    batch = collate(rt.processor, groups, rt.cache).to(rt.device)
    weights = rt.hf_model.named_parameters
    with torch.no_grad(), rt.acc.autocast(), rt.whole_policy(), awake(rt.engine, version=version, weights=weights):
        return rt.engine.generate(batch, rt.cfg.rollout.num_generations, rt.generation_params(seed))


def score_rollouts(rt: Runtime, ro: Rollouts, groups: list[Group], alpha: float, beta: float) -> RewardBreakdown:
    """The ranking-aware reward of every row (docs/method.md section 3) with the stage's weights."""
    G = ro.num_generations
    truths = [g.values for g in groups for _ in range(G)]
    tolerance = [float(g.tolerance) for g in groups for _ in range(G)]
    r = rt.cfg.reward
    return score(
        completion_texts(ro, rt.tokenizer),
        truths,
        tolerance=tolerance,
        alpha=alpha,
        beta=beta,
        lam=r.lam,
        weights=r.weights,
    )


def mutate(
    rt: Runtime, st: StageState, ro: Rollouts, rewards: Tensor, groups: list[Group], seed: int
) -> tuple[Rollouts, Tensor, Tensor, dict[str, tuple[Tensor, Any]]]:
    """RMO over this rank's groups (each with its own seed, so a group's outcome does not depend on its batch or
    rank); references are spliced into the rollouts. Returns rollouts, rewards [B, G], advantages [B, G] and
    the RMO metric pairs."""
    res = mutate_responses(
        rewards.cpu(),
        [g.values for g in groups],
        st.rmo,
        seeds=[stable_seed(seed, "rmo", g.key) for g in groups],
        tolerance=[float(g.tolerance) for g in groups],
        texts=completion_texts(ro, rt.tokenizer),
        group_keys=[g.key for g in groups],
        cache=st.best,
    )
    if st.rmo.source == "best" and rt.acc.num_processes > 1:
        share_best(st.best, [g.key for g in groups])
    ro = splice_references(ro, res.mutated, res.ref_texts, rt.tokenizer)
    m = res.metrics
    metrics = {
        "rmo/stagnant_before": (m["stagnant_before"], m["groups"]),
        "rmo/stagnant_after": (m["stagnant_after"], m["groups"]),
        "rmo/mutated": (m["mutated"], _total(rt)),
        "rmo/mutated_groups": (m["mutated_groups"], _total(rt)),
        "rmo/ref_reward": (m["ref_reward_sum"], m["mutated_groups"]),
    }
    return ro, res.rewards.to(rewards.device), res.advantages.to(rewards.device), metrics


def share_best(cache: BestCache, keys: list[Any]) -> None:
    """Every rank takes the entries the other ranks' groups of this step left in their RMO ``best`` caches, so a
    group drawn on another rank later still finds its best answer, and the main rank's checkpoint holds them all
    (a collective: every rank calls it at the same step)."""
    from accelerate.utils import gather_object

    cache.merge(gather_object(cache.entries(keys)))


def advantages(rt: Runtime, rewards: Tensor) -> Tensor:
    """Group-normalized advantages [B, G] (std-scaled GRPO or Dr.GRPO)."""
    return group_advantages(rewards, scale_by_std=rt.cfg.loss.scale_by_std, unbiased=rt.cfg.loss.std_unbiased)


def step_counts(rt: Runtime, ro: Rollouts) -> StepCounts:
    """The optimizer step's global completion-token and row counts (all micro-batches, all ranks)."""
    sizes = torch.tensor([float(ro.completion_mask.sum()), float(ro.num_rows)], device=rt.device)
    sizes = rt.acc.reduce(sizes, reduction="sum")
    return StepCounts(tokens=int(sizes[0]), rows=int(sizes[1]), world_size=rt.acc.num_processes)  # host sync


def update_policy(rt: Runtime, st: StageState, ro: Rollouts, adv: Tensor) -> dict[str, Any]:
    """``optim.update_epochs`` optimizer steps on this rollout batch: length-planned micro-batches, the loss
    normalized by the global token/row count, non-finite steps skipped and counted."""
    c = rt.cfg
    adv = adv.reshape(-1).to(rt.device)
    counts = step_counts(rt, ro)
    micro = rt.micro_batches(ro, c.optim.micro_batch_size, c.optim.micro_batch_tokens)
    parts = [ro.select(rows).trimmed() for rows in micro]
    refs = [rt.reference_logprobs(p) for p in parts]
    olds: list[Tensor | None] = [None] * len(parts)
    if c.optim.update_epochs > 1:  # logp_old from the policy itself, before any update (mutated rows too)
        olds = [rt.logprobs(rt.policy, p) for p in parts]
    settings = rt.loss_settings()
    sums: dict[str, Tensor] = {}

    def loss_of(i: int, part: Rollouts) -> Tensor:
        loss, m = rt.policy(part, mode="loss", advantages=adv[micro[i]], logp_old=olds[i], logp_ref=refs[i],
                            settings=settings, counts=counts)  # fmt: skip
        tokens = part.completion_mask.sum()
        for k, v in m.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * tokens
        return loss

    mu = c.optim.update_epochs
    for epoch in range(mu):
        lr = lr_at(st.step * mu + epoch, peak=st.stage.lr, total=st.stage.steps * mu, warmup_ratio=c.optim.warmup_ratio)
        result = optimizer_step(rt, lr, parts, loss_of)
        st.nonfinite.record(result.finite, f"{st.name} step {st.step}")
    tokens = ro.completion_mask.sum().clamp(min=1) * mu  # the metrics are summed over the epochs
    out: dict[str, Any] = {f"loss/{k}": (v, tokens) for k, v in sums.items()}
    out["loss"] = (result.loss, 1)
    out["grad_norm"] = (result.grad_norm, 1)
    out["skipped_steps"] = (torch.tensor(float(st.nonfinite.total)), 1)
    return out


# ----------------------------------------------------------------------------------------------------------
# Metrics: (sum, count) pairs reduced across ranks with one collective
# ----------------------------------------------------------------------------------------------------------


def reward_metrics(rb: RewardBreakdown, ro: Rollouts, groups: list[Group]) -> dict[str, tuple[Tensor, Any]]:
    """Reward components overall and per N (ranking components over N >= 2 rows only), parse failures,
    truncation, response length."""
    n_img = torch.tensor([g.n for g in groups for _ in range(ro.num_generations)], dtype=torch.float64)
    multi = (n_img >= 2).double()
    out: dict[str, tuple[Tensor, Any]] = {}
    for name in ("total", "format", "regression"):
        out[f"reward/{name}"] = (getattr(rb, name).double().sum(), len(n_img))
    for name in ("length", "consistency", "accuracy", "ranking"):
        out[f"reward/{name}"] = ((getattr(rb, name).double() * multi).sum(), multi.sum())
    for n in sorted({g.n for g in groups}):
        sel = (n_img == n).double()
        out[f"reward_n{n}/total"] = ((rb.total.double() * sel).sum(), sel.sum())
    out["parse_failure_rate"] = ((1 - rb.format.double()).sum(), len(n_img))
    sampled = (~ro.is_mutated.cpu()).double()
    out["truncation_rate"] = ((ro.truncated.cpu().double() * sampled).sum(), sampled.sum())
    out["response_length"] = ((ro.completion_lengths().cpu().double() * sampled).sum(), sampled.sum())
    return out


def _total(rt: Runtime) -> float:
    """The count of a (sum, count) pair whose global value is the sum over ranks (a per-step total, not a
    per-rank mean): 1 on the main process, 0 elsewhere."""
    return 1.0 if rt.acc.is_main_process else 0.0


def reduce_metrics(acc: Any, pairs: dict[str, tuple[Any, Any]]) -> dict[str, Tensor]:
    """Global means of (sum, count) pairs across ranks; a metric with a global count of 0 is left out (a count
    of 1 on the main process only, :func:`_total`, makes the value the sum over ranks).

    Ranks may hold different names (``reward_n4/total`` exists only where a 4-image group was drawn), so with
    several processes the names are gathered first and a rank lacking one adds (0, 0): every rank then reduces
    the same tensor (a mismatch would abort gloo/NCCL).
    """
    names = set(pairs)
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        names = {k for part in gather_object([sorted(names)]) for k in part}
    names = sorted(names)
    if not names:
        return {}
    stacked = torch.tensor(
        [[float(torch.as_tensor(pairs[k][0]).detach().double()), float(pairs[k][1])] if k in pairs else [0.0, 0.0]
         for k in names],
        device=acc.device,
    )  # fmt: skip  # host sync: metric values (logging step)
    stacked = acc.reduce(stacked, reduction="sum")
    return {k: stacked[i, 0] / stacked[i, 1] for i, k in enumerate(names) if float(stacked[i, 1]) > 0}


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------


def train_step(rt: Runtime, st: StageState) -> dict[str, Any]:
    """One step: rollout -> score -> mutate -> advantages -> update; returns the local metric pairs. A group with
    an image that cannot be loaded is replaced by a readable one of the same N (counted as ``data/skipped_groups``)."""
    from rarl_fast.data import readable_groups

    step_seed = stable_seed(rt.cfg.seed, st.name, st.step)
    groups, replaced = readable_groups(rt.my_groups(st.sampler.next_batch()), rt.train_groups, rt.cache, seed=step_seed)
    t0 = time.perf_counter()
    ro = rollout(rt, groups, step_seed, version=(st.name, st.step))
    t1 = time.perf_counter()
    rb = score_rollouts(rt, ro, groups, st.alpha, st.beta)
    rewards = rb.total.view(len(groups), ro.num_generations)
    pairs = reward_metrics(rb, ro, groups)
    if st.stage.rmo:
        ro, rewards, adv, rmo_pairs = mutate(rt, st, ro, rewards, groups, step_seed)
        pairs.update(rmo_pairs)
    else:
        stagnant = stagnant_groups(rewards, rt.cfg.rmo.sigma_min, unbiased=rt.cfg.loss.std_unbiased)
        pairs["rmo/stagnant_before"] = (stagnant.double().sum(), len(groups))
        adv = advantages(rt, rewards)
    t2 = time.perf_counter()
    pairs.update(update_policy(rt, st, ro, adv))
    t3 = time.perf_counter()
    tokens = float(ro.completion_mask.sum() + ro.prompt_mask.sum())
    pairs.update(
        {
            "time/rollout_s": (t1 - t0, 1),
            "time/reward_s": (t2 - t1, 1),
            "time/update_s": (t3 - t2, 1),
            "tokens_per_s": (tokens / max(t3 - t0, 1e-9), _total(rt)),  # all ranks together
            "data/skipped_groups": (float(replaced), _total(rt)),  # summed over ranks
        }
    )
    return pairs


def _trainer_state(rt: Runtime, st: StageState, global_step: int) -> dict[str, Any]:
    return {
        "global_step": global_step,
        "stage": st.name,
        "stage_step": st.step,
        "sampler": st.sampler.state_dict(),
        "best": st.best.state_dict(),
        "nonfinite_total": st.nonfinite.total,
        "nonfinite_in_row": st.nonfinite.in_row,
        "optimizer_steps": st.nonfinite.taken,
    }


def rmo_settings(cfg: Config, alpha: float, beta: float, eos: str) -> RMOSettings:
    """The RMO settings of a stage with reward weights ``alpha``/``beta`` (``cfg.rmo`` and the advantages')."""
    r = cfg.rmo
    return RMOSettings(
        mode=r.mode, source=r.source, think=r.think, baseline=r.baseline, p_mut=r.p_mut, k_mut=r.k_mut,
        sigma_min=r.sigma_min, alpha=alpha, beta=beta, lam=cfg.reward.lam, weights=cfg.reward.weights,
        scale_by_std=cfg.loss.scale_by_std, unbiased=cfg.loss.std_unbiased, eos=eos,
    )  # fmt: skip


def nonfinite_counter(cfg: Config) -> NonFiniteCounter:
    """The run's counter of taken and skipped optimizer steps, with ``cfg.optim``'s limits."""
    return NonFiniteCounter(limit=cfg.optim.max_nonfinite_steps, max_fraction=cfg.optim.max_skipped_fraction)


def make_stage(rt: Runtime, name: str, nonfinite: NonFiniteCounter | None = None) -> StageState:
    """Stage ``name`` at its start; ``nonfinite`` is the run's step counter (a new one when None)."""
    from rarl_fast.data import GroupSampler

    c = rt.cfg
    stage: StageConfig = getattr(c, name)
    alpha, beta = c.stage_reward_weights(stage)
    sampler = GroupSampler(
        {n: rt.train_groups[n] for n in stage.group_mix},
        stage.group_mix,
        batch_size=c.rollout.prompts_per_step,
        seed=stable_seed(c.seed, name) % (1 << 62),
    )
    return StageState(
        name=name,
        stage=stage,
        sampler=sampler,
        alpha=alpha,
        beta=beta,
        rmo=rmo_settings(c, alpha, beta, rt.tokenizer.eos_token or ""),
        nonfinite=nonfinite or nonfinite_counter(c),
    )


def run_stage(rt: Runtime, st: StageState, logger: MetricsLogger, global_step: int, evaluate_fn: Any = None) -> int:
    """Train ``st`` from its current step to ``stage.steps``; returns the global step reached. ``evaluate_fn``
    (``held_out_eval``) runs every ``logging.eval_every`` global steps."""
    c = rt.cfg
    while st.step < st.stage.steps:
        pairs = train_step(rt, st)
        st.step += 1
        global_step += 1
        if global_step % c.logging.log_every == 0 or st.step == st.stage.steps:
            metrics = reduce_metrics(rt.acc, pairs)
            metrics.update({"stage": STAGE_IDS[st.name], "lr": rt.optimizer.param_groups[0]["lr"]})
            logger.log(global_step, metrics)
        if evaluate_fn is not None and c.logging.eval_every and global_step % c.logging.eval_every == 0:
            evaluate_fn(global_step, st.name)
        if (c.checkpoint.save_every and global_step % c.checkpoint.save_every == 0) or st.step == st.stage.steps:
            save_checkpoint(
                rt.acc,
                rt.run_dir,
                global_step,
                model=rt.peft_model or rt.hf_model,
                processor=rt.processor,
                trainer_state=_trainer_state(rt, st, global_step),
                keep_last=c.checkpoint.keep_last,
                save_optimizer=c.checkpoint.save_optimizer,
                config_yaml=dump_config(c),
                shards=rt.sharded_state(),
            )
    return global_step


def check_completion_budget(cfg: Config, tokenizer: Any, train_groups: dict[int, list[Group]]) -> None:
    """docs/method.md section 5: with RMO on, ``rollout.max_new_tokens`` must hold the longest ``gt`` answer (+ EOS),
    else a mutated row would be cut short; a :class:`ConfigError` before the first step."""
    if not any(s.enabled and s.rmo for s in (cfg.stage1, cfg.stage2)):
        return
    sizes = {n for s in (cfg.stage1, cfg.stage2) if s.enabled and s.rmo for n in s.group_mix}
    truths = [g.values for n in sizes for g in train_groups.get(n, [])]
    need = longest_gt_answer(
        truths,
        eos=tokenizer.eos_token or "",
        length=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        think=cfg.rmo.think,
    )
    if cfg.rollout.max_new_tokens < need:
        got = cfg.rollout.max_new_tokens
        raise ConfigError(
            "rollout.max_new_tokens", f"{got} is shorter than the longest RMO reference answer ({need} tokens)"
        )


def train(
    cfg: Config,
    *,
    resume: bool = False,
    run_dir: Any = None,
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> Runtime:
    """Stage 1 then stage 2 (each if enabled) in a run folder of its own (``overwrite`` moves an earlier run aside).

    ``resume`` continues from the newest usable checkpoint, refusing a config that differs from the checkpoint's
    outside :data:`~rarl_fast.config.RESUME_SAFE_KEYS` unless ``allow_config_change``. Raises
    :class:`~rarl_fast.update.NonFiniteError` when the run took no optimizer step (or skipped too many), and
    :class:`~rarl_fast.errors.RunInterrupted`, saying where the run can resume, on Ctrl-C."""
    from pathlib import Path

    run_dir = Path(run_dir or Path(cfg.output_dir) / cfg.run_name)
    changes = check_resume_config(cfg, run_dir, allow=allow_config_change) if resume else None
    claim = "resume" if resume else "overwrite" if overwrite else "new"
    rt = build_runtime(cfg, train=True, run_dir=run_dir, claim=claim)
    try:
        return _train(rt, changes)
    except KeyboardInterrupt as err:
        newest = latest_checkpoint(rt.run_dir)
        where = (
            f"resume from {newest.name} with --resume (run folder {rt.run_dir})"
            if newest
            else f"no checkpoint was written yet (run folder {rt.run_dir})"
        )
        raise RunInterrupted(f"interrupted; {where}") from err


def _train(rt: Runtime, changes: list[tuple[str, Any, Any]] | None) -> Runtime:
    """The stages of ``train``; ``changes`` is None for a fresh run, else the config changes of a resumed one."""
    cfg = rt.cfg
    check_completion_budget(cfg, rt.tokenizer, rt.train_groups)
    rt.optimizer = build_optimizer(rt, cfg.stage1.lr)
    total = sum(getattr(cfg, s).steps for s in STAGES if getattr(cfg, s).enabled)
    start_trackers(rt.acc, "rarl")
    logger = MetricsLogger(rt.run_dir, rt.acc, total_steps=total, progress_bar=cfg.logging.progress_bar)
    global_step, start_stage, restored = 0, 0, None
    nonfinite = nonfinite_counter(cfg)
    if changes is not None:
        ckpt, restored = resume_checkpoint(rt.acc, rt.run_dir, shards=rt.sharded_state())
        global_step = int(restored["global_step"])
        start_stage = STAGES.index(restored["stage"])
        nonfinite.total = int(restored.get("nonfinite_total", 0))
        nonfinite.in_row = int(restored.get("nonfinite_in_row", 0))
        optimizer_steps = global_step * cfg.optim.update_epochs - nonfinite.total  # checkpoints without the count
        nonfinite.taken = int(restored.get("optimizer_steps", optimizer_steps))
        if rt.acc.is_main_process:  # steps logged after the checkpoint are run again: drop their old lines
            record_resume(cfg, rt.run_dir, ckpt, restored, total, changes)
            truncate_metrics(rt.run_dir, global_step)
        if logger.bar is not None:
            logger.bar.update(global_step)
    held_out = held_out_eval(rt, logger)
    try:
        for i, name in enumerate(STAGES):
            if i < start_stage or not getattr(cfg, name).enabled:
                continue
            if held_out is not None and global_step == 0:
                held_out(0, name)  # the starting point of the curves
            st = make_stage(rt, name, nonfinite)
            if restored is not None and i == start_stage:
                st.step = int(restored["stage_step"])
                st.sampler.load_state_dict(restored["sampler"])
                st.best.load_state_dict(restored["best"])
            else:
                reset_optimizer(rt.optimizer)
            global_step = run_stage(rt, st, logger, global_step, held_out)
    finally:
        logger.close()
    nonfinite.check_run()
    return rt
