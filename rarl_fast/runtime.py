"""What ``train``, ``sft`` and ``eval`` share: the accelerator, the models, the rollout engine and the data.

Built once from the config; everything below it (rewards, RMO, advantages, kernels, engine) gets plain values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rarl_fast.config import Config, dump_config
from rarl_fast.rl.loss import LossSettings, PolicyModule
from rarl_fast.rollout.base import GenerationParams, plan_micro_batches, split_to_count

log = logging.getLogger(__name__)

__all__ = ["Runtime", "balanced_shares", "build_runtime", "check_completion_budget", "lr_at", "make_accelerator"]


def make_accelerator(cfg: Config, run_dir: Path, *, trackers: list[str] | None = None):
    """accelerate's Accelerator for this machine: CPU when there is no CUDA (gloo for multi-process runs),
    bf16 autocast on CUDA unless ``optim.mixed_precision`` says otherwise; DDP looks for unused parameters
    unless ``optim.ddp_find_unused_parameters`` is off."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    cuda = torch.cuda.is_available()
    mp = cfg.optim.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda else "no"
    return Accelerator(
        cpu=not cuda,
        mixed_precision=mp,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), automatic_checkpoint_naming=False),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.optim.ddp_find_unused_parameters)],
    )


def lr_at(step: int, *, peak: float, total: int, warmup_ratio: float) -> float:
    """Linear warmup over ``warmup_ratio * total`` steps, then cosine decay to 0 at ``total``."""
    warmup = max(1, round(warmup_ratio * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Runtime:
    """The live objects of a run."""

    cfg: Config
    acc: Any  # accelerate.Accelerator
    run_dir: Path
    processor: Any
    policy: PolicyModule  # prepared by accelerate (DDP / FSDP wrapped where applicable)
    reference: PolicyModule | None  # frozen initial weights; None when loss.beta_kl == 0 or LoRA (adapter off)
    engine: Any  # RolloutEngine
    task: Any  # TaskData
    train_groups: dict[int, list[Any]]
    test_groups: dict[int, list[Any]]
    cache: Any  # ImageCache
    peft_model: Any = None  # the peft wrapper when LoRA is on
    optimizer: Any = None  # AdamW prepared by accelerate (one for both stages; its state is reset between them)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def hf_model(self) -> Any:
        """The transformers model inside the prepared policy (shares its weights)."""
        return self.acc.unwrap_model(self.policy).model

    def loss_settings(self) -> LossSettings:
        c = self.cfg
        return LossSettings(
            beta_kl=c.loss.beta_kl,
            eps_low=c.loss.eps_low,
            eps_high=c.loss.eps_high,
            loss_type=c.loss.loss_type,
            temperature=c.rollout.temperature,
            max_completion_length=c.rollout.max_new_tokens,
            impl=None if c.loss.impl == "auto" else c.loss.impl,
        )

    def generation_params(self, seed: int | None, *, greedy: bool = False) -> GenerationParams:
        r = self.cfg.rollout
        return GenerationParams(
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            greedy=greedy,
            seed=seed,
        )

    def micro_batches(self, rollouts: Any, max_rows: int, max_tokens: int | None) -> list[list[int]]:
        """Length-planned micro-batches (:func:`plan_micro_batches`), as many on every rank: FSDP and ZeRO run
        collectives in each forward/backward, so a rank with fewer micro-batches splits its largest ones."""
        micro = plan_micro_batches(rollouts, max_rows, max_tokens)
        if self.acc.num_processes > 1:
            count = torch.tensor([len(micro)], device=self.device)
            micro = split_to_count(micro, int(self.acc.gather(count).max()))  # host sync: micro-batch count
        return micro

    def my_share(self, items: list[Any]) -> list[Any]:
        """This rank's part of a global list (round robin), the unit of data parallelism being the group."""
        return items[self.acc.process_index :: self.acc.num_processes]

    def my_groups(self, groups: list[Any]) -> list[Any]:
        """This rank's groups of a training batch, balanced by images (:func:`balanced_shares`): the ranks wait
        for each other at every gradient all-reduce, so one holding the 8-image groups would idle the others."""
        if self.acc.num_processes == 1:
            return list(groups)
        shares = balanced_shares([g.n + 1 for g in groups], self.acc.num_processes)
        return [groups[i] for i in shares[self.acc.process_index]]

    def reference_logprobs(self, rollouts: Any) -> torch.Tensor | None:
        """[R, T] log-probs of the frozen reference (None when the KL term is off)."""
        if self.cfg.loss.beta_kl == 0:
            return None
        with torch.no_grad(), self.acc.autocast():
            if self.reference is not None:
                return self.reference(rollouts, mode="logprobs", temperature=self.cfg.rollout.temperature)
            with self.peft_model.disable_adapter():  # LoRA: the reference is the base model
                return self.policy(rollouts, mode="logprobs", temperature=self.cfg.rollout.temperature)


def balanced_shares(costs: list[float], world: int) -> list[list[int]]:
    """Indices of ``costs`` split over ``world`` ranks, as many on each as round robin would give (the first
    ``len % world`` ranks one more), with loads close to even: the costliest first to the least loaded rank that
    has room (ties: lowest index, lowest rank), then up to 4 * world swaps between the most and the least loaded
    rank, each lowering the larger load. Deterministic (the same on every rank), each index exactly once, lists
    ascending."""
    per_rank = [len(costs) // world + (r < len(costs) % world) for r in range(world)]
    load, shares = [0.0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(world) if len(shares[r]) < per_rank[r]), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += costs[i]
    for _ in range(4 * world):  # bounded: this runs every step
        hi = max(range(world), key=lambda r: (load[r], -r))
        lo = min(range(world), key=lambda r: (load[r], r))
        gap = load[hi] - load[lo]
        swaps = [(abs(gap / 2 - (costs[i] - costs[j])), i, j) for i in shares[hi] for j in shares[lo]]
        swaps = [sw for sw in swaps if 0 < costs[sw[1]] - costs[sw[2]] < gap]
        if not swaps:
            break
        _, i, j = min(swaps)
        shares[hi][shares[hi].index(i)], shares[lo][shares[lo].index(j)] = j, i
        load[hi] += costs[j] - costs[i]
        load[lo] += costs[i] - costs[j]
    return [sorted(s) for s in shares]


def _apply_lora(cfg: Config, model: Any) -> Any:
    try:
        import peft
    except ImportError as err:
        raise RuntimeError("model.lora.enabled=true needs peft: pip install 'rarl-fast[peft]'") from err
    lora = cfg.model.lora
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    return peft.get_peft_model(model, config)


def check_completion_budget(cfg: Config, tokenizer: Any, train_groups: dict[int, list[Any]]) -> None:
    """METHOD.md section 5: with RMO on, ``rollout.max_new_tokens`` must hold the longest ``gt`` answer (+ EOS)."""
    from rarl_fast.config import ConfigError
    from rarl_fast.rl.rmo import longest_gt_answer

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


def build_runtime(cfg: Config, *, train: bool = True, run_dir: Path | None = None) -> Runtime:
    """Accelerator, processor, policy (+ reference), engine, task data and groups, from ``cfg``."""
    from rarl_fast.data import ImageCache, build_test_groups, build_train_groups, load_task
    from rarl_fast.model import load_model, load_processor, resolve_model_path
    from rarl_fast.rollout import make_engine
    from rarl_fast.tracking import available_trackers

    run_dir = run_dir or Path(cfg.output_dir) / cfg.run_name
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    acc = make_accelerator(cfg, run_dir, trackers=available_trackers(cfg.logging.trackers) if train else None)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    acc.wait_for_everyone()
    for key, per_step in (("rollout", cfg.rollout.prompts_per_step), ("sft", cfg.sft.prompts_per_step)):
        if train and per_step and per_step % acc.num_processes:
            raise ValueError(
                f"{key}.prompts_per_step={per_step} must be a multiple of the number of processes "
                f"({acc.num_processes}): groups are the unit of data parallelism"
            )
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None and getattr(ds, "zero_stage", 0) == 3:
        raise NotImplementedError(
            "DeepSpeed ZeRO-3 is not supported yet: the fused lm_head + GRPO loss reads the full lm_head weight, "
            "which ZeRO-3 partitions outside the lm_head's own forward; use configs/accelerate/fsdp2.yaml or "
            "deepspeed_zero2.yaml"
        )
    torch.manual_seed(cfg.seed)
    m = cfg.model
    with acc.main_process_first():  # the tiny model is built once, by the main process
        path = resolve_model_path(m.name_or_path, m.tiny_dir, m.tiny_layers)
    processor = load_processor(
        path, min_pixels=m.min_pixels, max_pixels=m.max_pixels, local_files_only=m.local_files_only
    )
    kw = dict(
        device=acc.device,
        dtype="float32" if train else m.dtype,  # fp32 master weights; autocast gives bf16 compute
        attn_implementation=m.attn_implementation,
        use_liger=m.use_liger,
        local_files_only=m.local_files_only,
    )
    model = load_model(
        path, gradient_checkpointing=m.gradient_checkpointing and train, freeze_vision=m.freeze_vision, **kw
    )
    peft_model = None
    if m.lora.enabled:
        peft_model = _apply_lora(cfg, model)
        model = peft_model.get_base_model()
    reference = None
    if train and cfg.loss.beta_kl > 0 and peft_model is None:
        reference = PolicyModule(load_model(path, trainable=False, **{**kw, "dtype": m.dtype}))
    policy = acc.prepare_model(PolicyModule(model)) if train else PolicyModule(model)

    task = load_task(cfg.data, tolerance=cfg.tolerance())
    sizes = list(cfg.data.group_sizes)
    train_groups = build_train_groups(task, sizes, seed=cfg.data.seed, groups_per_n=cfg.data.train_groups_per_n)
    test_groups = build_test_groups(task, sizes, seed=cfg.data.seed, num_groups=cfg.data.num_test_groups)
    engine = make_engine(
        cfg.rollout.backend,
        model=acc.unwrap_model(policy).model,
        tokenizer=processor.tokenizer,
        model_path=path,
        seed=cfg.seed,
        mem_fraction_static=cfg.rollout.sglang_mem_fraction,
        compile=cfg.rollout.compile,
    )
    cache = ImageCache.for_processor(processor, max_mb=cfg.data.image_cache_mb)
    return Runtime(
        cfg=cfg,
        acc=acc,
        run_dir=run_dir,
        processor=processor,
        policy=policy,
        reference=reference,
        engine=engine,
        task=task,
        train_groups=train_groups,
        test_groups=test_groups,
        cache=cache,
        peft_model=peft_model,
    )
