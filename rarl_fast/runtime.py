"""What ``train``, ``sft`` and ``eval`` share: the accelerator, the models, the rollout engine and the data.

Built once from the config by :func:`build_runtime`; everything below it (rewards, RMO, advantages, kernels,
engine) gets plain values.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rarl_fast.accelerator import make_accelerator
from rarl_fast.checkpoint import ShardedState
from rarl_fast.config import Config, ConfigError
from rarl_fast.config_loader import dump_config
from rarl_fast.data_parallel import balanced_shares, round_robin_share
from rarl_fast.errors import UsageError
from rarl_fast.policy import LossSettings, PolicyModule
from rarl_fast.rollout.base import GenerationParams, RolloutEngine, Rollouts, plan_micro_batches, split_to_count
from rarl_fast.run_folder import Claim, claim_run_folder
from rarl_fast.sharding import (
    ShardingPlan,
    accelerate_fsdp_launch,
    broadcast_from_main,
    release,
    shard_model,
    sharding_plan,
    whole_parameters,
)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

    from rarl_fast.data.groups import Group
    from rarl_fast.data.images import ImageCache
    from rarl_fast.data.samples import TaskData

log = logging.getLogger(__name__)

__all__ = ["Runtime", "build_runtime"]


@dataclass
class Runtime:
    """The live objects of a run."""

    cfg: Config
    acc: Accelerator
    run_dir: Path
    processor: ProcessorMixin
    policy: PolicyModule  # prepared by accelerate (DDP) or sharded (FSDP2, ``plan.sharded``)
    reference: PolicyModule | None  # frozen initial weights; None when loss.beta_kl == 0 or LoRA (adapter off)
    engine: RolloutEngine
    task: TaskData
    train_groups: dict[int, list[Group]]
    test_groups: dict[int, list[Group]]
    cache: ImageCache
    peft_model: Any = None  # peft.PeftModel when LoRA is on (peft is an optional dependency)
    optimizer: torch.optim.Optimizer | None = None  # AdamW, built by the first stage
    plan: ShardingPlan = dataclasses.field(default_factory=ShardingPlan)  # how the processes hold the model

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.processor.tokenizer

    @property
    def hf_model(self) -> PreTrainedModel:
        """The transformers model inside the prepared policy (shares its weights)."""
        return self.acc.unwrap_model(self.policy).model

    def loss_settings(self) -> LossSettings:
        return LossSettings.from_config(self.cfg)

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

    def micro_batches(self, rollouts: Rollouts, max_rows: int, max_tokens: int | None) -> list[list[int]]:
        """Length-planned micro-batches (:func:`plan_micro_batches`), as many on every rank: FSDP and ZeRO run
        collectives in each forward/backward, so a rank with fewer micro-batches splits its largest ones."""
        micro = plan_micro_batches(rollouts, max_rows, max_tokens)
        if self.acc.num_processes > 1:
            count = torch.tensor([len(micro)], device=self.device)
            micro = split_to_count(micro, int(self.acc.gather(count).max()))  # host sync: micro-batch count
        return micro

    def my_share(self, items: list[Any]) -> list[Any]:
        """This rank's part of a global list (round robin), the unit of data parallelism being the group."""
        return round_robin_share(items, self.acc.process_index, self.acc.num_processes)

    def my_groups(self, groups: list[Group]) -> list[Group]:
        """This rank's groups of a training batch, balanced by images (:func:`balanced_shares`): the ranks wait
        for each other at every gradient all-reduce, so one holding the 8-image groups would idle the others."""
        if self.acc.num_processes == 1:
            return list(groups)
        shares = balanced_shares([g.n + 1 for g in groups], self.acc.num_processes)
        return [groups[i] for i in shares[self.acc.process_index]]

    def logprobs(self, module: PolicyModule, rollouts: Rollouts) -> torch.Tensor:
        """[R, T] fp32 log-probs of ``rollouts`` under ``module`` (the policy or the reference), without gradient at
        the sampling temperature; a sharded module is resharded after the forward."""
        with torch.no_grad(), self.acc.autocast():
            out = module(rollouts, mode="logprobs", temperature=self.cfg.rollout.temperature)
        release(module)
        return out

    def reference_logprobs(self, rollouts: Rollouts) -> torch.Tensor | None:
        """[R, T] log-probs of the frozen reference (None when the KL term is off)."""
        if self.cfg.loss.beta_kl == 0:
            return None
        if self.reference is not None:
            return self.logprobs(self.reference, rollouts)
        with self.peft_model.disable_adapter():  # LoRA: the reference is the base model
            return self.logprobs(self.policy, rollouts)

    @contextmanager
    def whole_policy(self) -> Iterator[None]:
        """The policy's parameters whole inside the block (for the rollout engine: it decodes with them, or
        receives them); a no-op unless the policy is sharded. All processes enter it together."""
        with whole_parameters(self.policy, self.plan):
            yield

    def sharded_state(self) -> ShardedState | None:
        """The sharded policy and its optimizer (what checkpoints save and restore); None when not sharded."""
        return ShardedState(self.policy, self.optimizer) if self.plan.sharded else None

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """The transformers model's whole state dict on the main process (gathered: all processes call it) when
        the policy is sharded; None when it is not (``hf_model`` then holds the whole weights)."""
        state = self.sharded_state()
        return None if state is None else state.whole_weights()


def build_runtime(
    cfg: Config, *, train: bool = True, run_dir: Path | None = None, claim: Claim | None = None, resumable: bool = True
) -> Runtime:
    """Accelerator, processor, policy (+ reference), engine, task data and groups, from ``cfg``.

    ``claim`` says how the run folder is taken (:func:`~rarl_fast.run_folder.claim_run_folder`: a new run, a new
    run after moving an old one aside, or a resumed one); None uses it as it is. ``resumable`` says whether the
    command can ``--resume`` (the error for a folder in use then offers it)."""
    from rarl_fast.data import ImageCache, build_test_groups, build_train_groups, load_task
    from rarl_fast.model import apply_lora, load_policy, load_processor, load_reference, resolve_model_path
    from rarl_fast.rollout import make_engine
    from rarl_fast.tracking import available_trackers

    run_dir = run_dir or Path(cfg.output_dir) / cfg.run_name
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    acc = make_accelerator(cfg, run_dir, trackers=available_trackers(cfg.logging.trackers) if train else None)
    for key, per_step in (("rollout", cfg.rollout.prompts_per_step), ("sft", cfg.sft.prompts_per_step)):
        if train and per_step and per_step % acc.num_processes:
            raise ConfigError(
                f"{key}.prompts_per_step",
                f"{per_step} must be a multiple of the number of processes ({acc.num_processes}): groups are the "
                "unit of data parallelism",
            )
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None and getattr(ds, "zero_stage", 0) == 3:
        raise UsageError(
            "DeepSpeed ZeRO-3 is not supported yet: the fused lm_head + GRPO loss reads the full lm_head weight, "
            "which ZeRO-3 partitions outside the lm_head's own forward; use configs/accelerate/fsdp2.yaml or "
            "deepspeed_zero2.yaml"
        )
    plan = sharding_plan(cfg, acc.num_processes, acc.mixed_precision) if train else ShardingPlan()
    if plan.sharded and ds is not None:
        raise UsageError(
            "FSDP2 sharding (distributed.strategy) under a DeepSpeed launch config: launch with "
            "configs/accelerate/fsdp2.yaml, or set distributed.strategy=ddp"
        )
    claim_run_folder(acc, run_dir, claim, dump_config(cfg), resumable=resumable)
    torch.manual_seed(cfg.seed)
    m = cfg.model
    if plan.activation_checkpointing and not m.gradient_checkpointing:  # fsdp_activation_checkpointing: true
        m = dataclasses.replace(m, gradient_checkpointing=True)
    with acc.main_process_first():  # the tiny model is built once, by the main process
        path = resolve_model_path(m.name_or_path, m.tiny_dir, m.tiny_layers)
    processor = load_processor(
        path, min_pixels=m.min_pixels, max_pixels=m.max_pixels, local_files_only=m.local_files_only
    )
    model = load_policy(m, acc.device, train=train)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and cfg.rollout.max_new_tokens >= context:
        raise ConfigError(
            "rollout.max_new_tokens", f"{cfg.rollout.max_new_tokens} leaves no room for the prompt in the model's "
            f"context of {context} positions"
        )  # fmt: skip
    peft_model = None
    if m.lora.enabled:
        peft_model = apply_lora(m.lora, model)
        model = peft_model.get_base_model()
    placeholders = acc.num_processes > 1 and accelerate_fsdp_launch()  # cpu_ram_efficient_loading may be on
    reference = None
    if train and cfg.loss.beta_kl > 0 and peft_model is None:
        reference = PolicyModule(load_reference(m, acc.device))
        if plan.sharded:
            shard_model(reference, plan, acc.device, trainable=False)
        elif placeholders:
            broadcast_from_main(reference)
    if train and plan.sharded:
        policy = shard_model(PolicyModule(model), plan, acc.device)
    elif train:
        policy = acc.prepare_model(PolicyModule(model))  # DDP broadcasts the main process's weights
    else:
        policy = PolicyModule(model)
        if placeholders:
            broadcast_from_main(policy)

    task = load_task(cfg.data, tolerance=cfg.tolerance())
    sizes = list(cfg.data.group_sizes)
    train_groups = build_train_groups(task, sizes, seed=cfg.data.seed, groups_per_n=cfg.data.train_groups_per_n)
    test_groups = build_test_groups(task, sizes, seed=cfg.data.seed, num_groups=cfg.data.num_test_groups)
    cache = ImageCache.for_processor(
        processor, max_mb=cfg.data.image_cache_mb, max_image_pixels=cfg.data.max_image_pixels
    )
    engine = make_engine(
        cfg.rollout.backend,
        model=acc.unwrap_model(policy).model,
        tokenizer=processor.tokenizer,
        model_path=path,
        seed=cfg.seed,
        mem_fraction_static=cfg.rollout.sglang_mem_fraction,
        image_loader=cache.get,
        compile=cfg.rollout.compile,
    )
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
        plan=plan,
    )
