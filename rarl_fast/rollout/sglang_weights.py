"""Weight push into an SGLang engine, and the check that every pushed tensor landed.

SGLang's Qwen2.5-VL ``load_weights`` fuses checkpoint tensors into its own parameters (``q/k/v_proj`` into
``qkv_proj``, ``gate/up_proj`` into ``gate_up_proj``, the vision ``attn.qkv`` into ``attn.qkv_proj``) and
skips, without an error, every name it does not know. A wrong name mapping would therefore leave the rollout
engine on stale weights while the trainer learns. After each push the engine's per-parameter checksums
(``check_weights(action="checksum")``, a hash of each parameter's bytes) are compared with the same hash of
what was pushed, rebuilt in SGLang's layout: every pushed tensor must reach an existing parameter with
identical bytes, and every SGLang weight must be reached by some pushed tensor. A mismatch raises naming
the parameter.

``get_weights_by_name`` cannot do this read-back for Qwen2.5-VL: in sglang 0.5.23 only a few text models
(Llama, OPT, Granite, ...) implement it, and for the others the engine logs an error and returns None.

The layout rebuilt here is SGLang's at tensor-parallel size 1 (one engine per trainer rank), where a fused
parameter is the concatenation of its shards along dim 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "STACKED_PARAMS",
    "PushCheck",
    "Target",
    "buckets",
    "sglang_target",
    "to_sglang_name",
]

# (SGLang parameter substring, checkpoint substring, shard id) of Qwen2_5_VLForConditionalGeneration.load_weights
# in sglang 0.5.23, in its order; tests/test_rollout_sglang.py checks it against the recorded source.
STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    ("gate_up_proj", "up_proj", 1),
    ("gate_up_proj", "gate_proj", 0),
)
_QKV, _GATE_UP = ("q", "k", "v"), (0, 1)  # shard order inside a fused parameter (concatenated along dim 0)


def to_sglang_name(name: str) -> str:
    """transformers 5.x Qwen2.5-VL parameter name -> the checkpoint layout SGLang loads.

    ``model.language_model.X`` -> ``model.X``; ``model.visual.X`` -> ``visual.X``; ``lm_head.*`` unchanged.
    Names already in checkpoint layout pass through.
    """
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


class Target(NamedTuple):
    """Where SGLang loads one checkpoint tensor: its parameter and, for a fused one, the shard."""

    param: str
    shard: str | int | None = None


def sglang_target(name: str) -> Target:
    """The SGLang parameter a checkpoint-layout tensor ``name`` is loaded into (the rules of Qwen2.5-VL's
    ``load_weights`` in sglang 0.5.23: the vision tower fuses only gate/up, and renames ``attn.qkv``)."""
    for param, weight, shard in STACKED_PARAMS:
        if weight not in name:
            continue
        if "visual" in name and "up_proj" not in name and "gate_proj" not in name:
            continue
        return Target(name.replace(weight, param), shard)
    if "visual" in name:
        name = name.replace("attn.qkv.", "attn.qkv_proj.")
    return Target(name)


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def buckets(
    named_tensors: Iterable[tuple[str, Tensor]], *, dtype: torch.dtype, bucket_bytes: int
) -> Iterator[tuple[list[tuple[str, Tensor]], bool]]:
    """``(bucket, is_last)`` pairs of (checkpoint name, tensor in ``dtype``), each about ``bucket_bytes``.

    A bucket is never empty (the last one is the one holding the last tensor); an empty input raises.
    """
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        t = _full(tensor.detach()).to(dtype).contiguous()
        if bucket and size + t.numel() * t.element_size() > bucket_bytes:
            yield bucket, False
            bucket, size = [], 0
        bucket.append((to_sglang_name(name), t))
        size += t.numel() * t.element_size()
    if not bucket:
        raise ValueError("no weights to push: the named-tensor iterable was empty")
    yield bucket, True


def _order(shard: str | int) -> tuple[str | int, ...]:
    return _QKV if shard in _QKV else _GATE_UP


@dataclass
class PushCheck:
    """What one push sent, reduced to one hash per SGLang parameter, compared with the engine's checksums.

    ``add`` each pushed (checkpoint name, tensor) in push order; a fused parameter is hashed once all its
    shards have arrived (they come together: one layer's q/k/v, gate/up), so only hashes are kept.
    """

    tensor_hash: Callable[[Tensor], int]  # SGLang's own hash (sglang.srt.managers.mm_utils.tensor_hash)
    sources: dict[str, list[str]] = field(default_factory=dict)  # SGLang parameter -> checkpoint names
    expected: dict[str, str] = field(default_factory=dict)  # SGLang parameter -> hex hash of what was pushed
    _pending: dict[str, dict[str | int, Tensor]] = field(default_factory=dict)

    def add(self, name: str, tensor: Tensor) -> None:
        target = sglang_target(name)
        self.sources.setdefault(target.param, []).append(name)
        if target.shard is None:
            self.expected[target.param] = self._hex(tensor)
            return
        shards = self._pending.setdefault(target.param, {})
        shards[target.shard] = tensor
        order = _order(target.shard)
        if all(s in shards for s in order):
            self.expected[target.param] = self._hex(torch.cat([shards[s] for s in order], dim=0))
            del self._pending[target.param]

    def _hex(self, t: Tensor) -> str:
        return f"{self.tensor_hash(t):016x}"  # the format of SGLang's weight checker

    def verify(self, checksums: dict[str, str]) -> int:
        """Raise naming the first parameter that did not land; returns the number of parameters checked.

        ``checksums``: SGLang parameter (and buffer) name -> hex hash, as ``check_weights`` reports them.
        """
        for param, shards in self._pending.items():
            missing = [s for s in _order(next(iter(shards))) if s not in shards]
            raise RuntimeError(
                f"SGLang weight push: {param} got only {self.sources[param]}; its shards {missing} were not pushed"
            )
        for param, digest in self.expected.items():
            if param not in checksums:
                raise RuntimeError(
                    f"SGLang weight push: the engine has no parameter {param} for the pushed {self.sources[param]}; "
                    "its load_weights skips such names without an error, so the rollouts would use stale weights"
                )
            if checksums[param] != digest:
                raise RuntimeError(
                    f"SGLang weight push: the engine's {param} differs from the pushed {self.sources[param]} "
                    "after the push (read back with check_weights)"
                )
        unreached = sorted(n for n in checksums if n.endswith((".weight", ".bias")) and n not in self.expected)
        if unreached:
            raise RuntimeError(
                f"SGLang weight push: no pushed tensor reaches the engine's {unreached[0]}"
                + (f" (and {len(unreached) - 1} more)" if len(unreached) > 1 else "")
                + "; it keeps its old weights"
            )
        return len(self.expected)
