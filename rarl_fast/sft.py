"""``rarl-fast sft``: supervised fine-tuning on ground-truth answers (the paper's SFT baseline, the demo's warm
start). The target of a group is RMO's ``gt`` reference (``<think>Reference answer.</think> <answer>[...]</answer>``
+ EOS, or with ``rmo.think: readings`` each image's value as the reasoning); the loss is the token-mean negative
log-likelihood through the fused linear log-prob kernel, normalized by the step's global token count like the GRPO
loss. Non-finite steps are skipped and counted over the run (:class:`~rarl_fast.update.NonFiniteCounter`); groups
with an image that cannot be loaded are replaced by readable ones of the same N.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rarl_fast.evaluate import held_out_eval
from rarl_fast.rl.rmo import gt_answer
from rarl_fast.rollout.base import Rollouts
from rarl_fast.rollout.sampling import stable_seed
from rarl_fast.runtime import Runtime
from rarl_fast.schedule import lr_at
from rarl_fast.tracking import STAGE_IDS, MetricsLogger, start_trackers
from rarl_fast.update import NonFiniteCounter, build_optimizer, optimizer_step

if TYPE_CHECKING:
    from rarl_fast.data.groups import Group

log = logging.getLogger(__name__)

__all__ = ["sft_rollouts", "sft_step", "train_sft"]


def sft_rollouts(rt: Runtime, groups: list[Group]) -> Rollouts:
    """One row per group: its prompt and its ground-truth answer as the completion."""
    from rarl_fast.data import collate

    batch = collate(rt.processor, groups, rt.cache).to(rt.device)
    tok = rt.tokenizer
    targets = [gt_answer(g.values, rt.cfg.rmo.think) + (tok.eos_token or "") for g in groups]
    answers = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
    B, T = len(groups), max(len(a) for a in answers)
    ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, a in enumerate(answers):
        ids[b, : len(a)] = torch.tensor(a)
        mask[b, : len(a)] = True
    dev = rt.device
    zeros = torch.zeros(B, dtype=torch.bool, device=dev)
    return Rollouts(
        prompt_ids=batch.input_ids,
        prompt_mask=batch.attention_mask,
        completion_ids=ids.to(dev),
        completion_mask=mask.to(dev),
        sampling_logp=None,
        group_index=torch.arange(B, device=dev),
        group_keys=[g.key for g in groups],
        is_mutated=zeros,
        truncated=zeros,
        vision_cut=zeros,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        images_per_prompt=batch.image_counts.to(dev),
        num_generations=1,
    )


def sft_step(rt: Runtime, groups: list[Group], lr: float, nonfinite: NonFiniteCounter, where: str) -> dict[str, Any]:
    """One optimizer step on this rank's groups: token-mean NLL of their answers over the step's global token
    count; returns loss and grad norm (tensors)."""
    c, acc = rt.cfg, rt.acc
    ro = sft_rollouts(rt, groups)
    total_tokens = acc.reduce(ro.completion_mask.sum().float(), reduction="sum")
    max_rows = c.sft.micro_batch_size or c.optim.micro_batch_size
    micro = rt.micro_batches(ro, max_rows, c.sft.micro_batch_tokens or c.optim.micro_batch_tokens)
    parts = [ro.select(rows).trimmed() for rows in micro]

    def loss_of(i: int, part: Rollouts) -> Tensor:
        nll, _ = rt.policy(part, mode="nll")
        return nll / total_tokens.clamp(min=1) * acc.num_processes  # DDP and FSDP2 average over ranks

    result = optimizer_step(rt, lr, parts, loss_of)
    nonfinite.record(result.finite, where)
    return {"sft/loss": acc.reduce(result.loss, reduction="mean"), "sft/grad_norm": result.grad_norm}


def train_sft(rt: Runtime, *, steps: int, lr: float, mix: dict[int, float], seed_tag: str = "sft") -> None:
    """``steps`` SFT steps of ``sft.prompts_per_step`` groups drawn with the N ``mix``; logs to metrics.jsonl.
    Raises :class:`~rarl_fast.update.NonFiniteError` when no step (or too small a share) was taken."""
    from rarl_fast.data import GroupSampler, readable_groups

    c = rt.cfg
    if rt.optimizer is None:
        rt.optimizer = build_optimizer(rt, lr)
    sampler = GroupSampler(
        {n: rt.train_groups[n] for n in mix},
        mix,
        batch_size=c.sft.prompts_per_step or c.rollout.prompts_per_step,
        seed=stable_seed(c.seed, seed_tag) % (1 << 62),
    )
    nonfinite = NonFiniteCounter(limit=c.optim.max_nonfinite_steps, max_fraction=c.optim.max_skipped_fraction)
    start_trackers(rt.acc, "sft")
    logger = MetricsLogger(rt.run_dir, rt.acc, total_steps=steps, progress_bar=c.logging.progress_bar)
    held_out = held_out_eval(rt, logger)
    try:
        if held_out is not None:
            held_out(0, "sft")
        for step in range(steps):
            seed = stable_seed(c.seed, seed_tag, step)
            groups, replaced = readable_groups(rt.my_groups(sampler.next_batch()), rt.train_groups, rt.cache, seed=seed)
            lr_now = lr_at(step, peak=lr, total=steps, warmup_ratio=c.optim.warmup_ratio)
            metrics = sft_step(rt, groups, lr_now, nonfinite, f"sft step {step}")
            metrics["data/skipped_groups"] = rt.acc.reduce(torch.tensor(float(replaced), device=rt.device), "sum")
            logger.log(step + 1, {**metrics, "skipped_steps": nonfinite.total, "stage": STAGE_IDS["sft"]})
            if held_out is not None and (step + 1) % c.logging.eval_every == 0:
                held_out(step + 1, "sft")
    finally:
        logger.close()
    nonfinite.check_run()
