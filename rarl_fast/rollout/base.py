"""What a rollout engine returns (:class:`Rollouts`) and what it must do (:class:`RolloutEngine`).

Rows are prompt-major: row ``r = b * G + j`` is sample ``j`` of prompt ``b``. Image inputs are kept once
per prompt (never copied G times); ``group_index`` maps rows to prompts.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["GenerationParams", "RolloutEngine", "Rollouts", "image_slices", "plan_micro_batches", "split_to_count"]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one ``generate`` call (plain values, from ``cfg.rollout`` in training). The defaults
    are plain sampling: untempered, no top-p or top-k truncation, unseeded."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid generation parameters: {self}")


@dataclass
class Rollouts:
    """G sampled completions for each of B prompts. R = B * G rows, P prompt length, T completion length."""

    prompt_ids: Tensor  # [R, P] long, left-padded
    prompt_mask: Tensor  # [R, P] long, 1 on real prompt tokens
    completion_ids: Tensor  # [R, T] long, right-padded with the pad id
    completion_mask: Tensor  # [R, T] bool, True on generated tokens up to and including EOS
    sampling_logp: Tensor | None  # [R, T] float32, log p(token) under logits / temperature; None if unknown
    group_index: Tensor  # [R] long, prompt index b of each row
    group_keys: list[tuple[str, ...]]  # [B] stable key of each prompt's group (tuple of sample ids)
    is_mutated: Tensor  # [R] bool, completion replaced by RMO (off-policy)
    truncated: Tensor  # [R] bool, no EOS within max_new_tokens
    vision_cut: Tensor  # [R] bool, cut where the model emitted an image/vision special token
    pixel_values: Tensor | None  # [sum_patches, D] patches of the B prompts' images, prompt order
    image_grid_thw: Tensor | None  # [num_images, 3] patch grid of each image, prompt order
    images_per_prompt: Tensor  # [B] long
    num_generations: int  # G
    extras: dict[str, Any] = field(default_factory=dict)  # engine-specific metadata (timings, ...)

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_prompts(self) -> int:
        return len(self.group_keys)

    def to(self, device: torch.device | str) -> Rollouts:
        moved = {
            f.name: getattr(self, f.name).to(device)
            if isinstance(getattr(self, f.name), Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return Rollouts(**moved)

    def trimmed(self) -> Rollouts:
        """The same rows without the prompt columns that are padding in every row (left) and the completion
        columns past every row's last token (right): what a micro-batch of short rows needs to compute."""
        real_prompt = self.prompt_mask.bool().any(dim=0)
        real_completion = self.completion_mask.any(dim=0)
        start = int(real_prompt.int().argmax()) if bool(real_prompt.any()) else self.prompt_ids.shape[1]
        end = int(real_completion.nonzero().max()) + 1 if bool(real_completion.any()) else 0  # host sync: shapes
        end = max(end, 1)  # keep one column so that shapes stay valid for empty completions

        def cols(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[:, :end]

        return replace(
            self,
            prompt_ids=self.prompt_ids[:, start:],
            prompt_mask=self.prompt_mask[:, start:],
            completion_ids=self.completion_ids[:, :end],
            completion_mask=self.completion_mask[:, :end],
            sampling_logp=cols(self.sampling_logp),
        )

    def completion_lengths(self) -> Tensor:
        """[R] number of completion tokens per row."""
        return self.completion_mask.sum(dim=1)

    def select(self, rows: Sequence[int] | Tensor) -> Rollouts:
        """The given rows (e.g. a micro-batch) with only the image inputs of the prompts they use."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        prompts = torch.unique(self.group_index[rows], sorted=True)
        remap = torch.full((self.num_prompts,), -1, dtype=torch.long, device=rows.device)
        remap[prompts] = torch.arange(len(prompts), device=rows.device)
        pixel_values, grid = self.pixel_values, self.image_grid_thw
        if pixel_values is not None and grid is not None:
            patch_sl, image_sl = image_slices(self.images_per_prompt, grid)
            keep = prompts.tolist()  # host sync: small index list
            pixel_values = torch.cat([pixel_values[patch_sl[p]] for p in keep]) if keep else pixel_values[:0]
            grid = torch.cat([grid[image_sl[p]] for p in keep]) if keep else grid[:0]

        def rows_of(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows]

        return replace(
            self,
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            completion_ids=self.completion_ids[rows],
            completion_mask=self.completion_mask[rows],
            sampling_logp=rows_of(self.sampling_logp),
            group_index=remap[self.group_index[rows]],
            group_keys=[self.group_keys[p] for p in prompts.tolist()],
            is_mutated=self.is_mutated[rows],
            truncated=self.truncated[rows],
            vision_cut=self.vision_cut[rows],
            pixel_values=pixel_values,
            image_grid_thw=grid,
            images_per_prompt=self.images_per_prompt[prompts],
        )


def plan_micro_batches(rollouts: Rollouts, max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """Rows of ``rollouts`` split into micro-batches of similar length (for :meth:`Rollouts.select` +
    :meth:`Rollouts.trimmed`).

    Rows are ordered by prompt length (longest first), keeping each prompt's rows together so that its images
    are encoded once, then by completion length; consecutive rows are packed while a micro-batch has at most
    ``max_rows`` rows and, when ``max_tokens`` is given, at most that many padded tokens (rows x (longest
    prompt + longest completion)); a row longer than the budget gets a micro-batch of its own. Every row
    appears exactly once; the gradient of a token-normalized loss does not depend on the split.
    """
    if max_rows < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"max_rows and max_tokens must be >= 1, got {max_rows} and {max_tokens}")
    prompt = rollouts.prompt_mask.sum(dim=1).tolist()  # host sync: small per-row metadata
    completion = rollouts.completion_mask.sum(dim=1).tolist()
    group = rollouts.group_index.tolist()
    order = sorted(range(len(prompt)), key=lambda r: (-prompt[r], group[r], -completion[r], r))
    batches: list[list[int]] = []
    rows: list[int] = []
    longest_p = longest_c = 0
    for r in order:
        p, c = max(longest_p, prompt[r]), max(longest_c, completion[r])
        fits = len(rows) < max_rows and (max_tokens is None or (len(rows) + 1) * (p + c) <= max_tokens)
        if rows and not fits:
            batches.append(rows)
            rows, p, c = [], prompt[r], completion[r]
        rows.append(r)
        longest_p, longest_c = p, c
    if rows:
        batches.append(rows)
    return batches


def split_to_count(micro: list[list[int]], count: int) -> list[list[int]]:
    """``micro`` with its largest micro-batches halved until there are ``count`` of them (ranks under FSDP or
    ZeRO must run as many forwards as each other)."""
    micro = [list(m) for m in micro]
    while len(micro) < count:
        i = max(range(len(micro)), key=lambda j: len(micro[j]), default=None)
        if i is None or len(micro[i]) < 2:
            raise RuntimeError(
                f"this rank has {sum(map(len, micro))} rows, too few for the {count} micro-batches of another "
                "rank: lower optim.micro_batch_tokens or balance rollout.prompts_per_step across ranks"
            )
        half = len(micro[i]) // 2
        micro[i : i + 1] = [micro[i][:half], micro[i][half:]]
    return micro


def image_slices(images_per_prompt: Tensor, image_grid_thw: Tensor) -> tuple[list[slice], list[slice]]:
    """Per prompt: the slice of its patches in ``pixel_values`` and of its rows in ``image_grid_thw``."""
    counts = images_per_prompt.tolist()  # host sync: small metadata
    patches = image_grid_thw.prod(dim=1).tolist()
    patch_sl, image_sl = [], []
    img = patch = 0
    for c in counts:
        n = int(sum(patches[img : img + c]))
        patch_sl.append(slice(patch, patch + n))
        image_sl.append(slice(img, img + c))
        img, patch = img + c, patch + n
    if img != len(patches):
        raise ValueError(f"images_per_prompt sums to {img} but image_grid_thw has {len(patches)} rows")
    return patch_sl, image_sl


@runtime_checkable
class RolloutEngine(Protocol):
    """A rollout backend. ``generate`` returns prompt-major rows; the rest may be no-ops.

    The trainer drives it through :func:`rarl_fast.rollout.awake` only: wake -> push the weights when the engine
    does not hold the current policy -> generate -> sleep.
    """

    weights_version: Hashable | None
    """The policy version whose weights the engine holds (set by ``awake`` after a push; None: unknown, so the
    next ``awake`` pushes). An engine whose ``sleep`` drops its weights resets it to None."""

    def generate(self, batch: Any, n: int, params: GenerationParams) -> Rollouts:
        """Sample ``n`` completions per prompt of ``batch`` (a collated prompt batch)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load the trainer's current weights (transformers parameter names)."""
        ...

    def sleep(self) -> None:
        """Release memory while the trainer updates (colocated engines)."""
        ...

    def wake(self) -> None:
        """Take memory back before the next ``generate``."""
        ...
