"""Every kernel variant the launchers make compiles for sm_80, sm_90a and sm_100a, with the per-architecture tiles:
no register spills, tensor-core instructions in the bf16 dots, shared memory within the block limit.

The variants are recorded from real launches (`rarl_kernels.aot`), so a new kernel or flag is compiled here without
editing this file; the checks below fail if the option sweep stops reaching one of them.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

import rarl_kernels
from rarl_kernels import _utils, aot
from rarl_kernels.loss_types import SURROGATE

# Constexpr switches that only the interpreter sets (see `_utils.dot_flags`): always off in a compiled kernel.
INTERPRETER_ONLY = {"DOT_F32"}


def defined_kernels() -> set[str]:
    """Names of the Triton kernels (`*_kernel`) that the package's modules define."""
    pkg = Path(rarl_kernels.__file__).parent
    names = set()
    for path in pkg.glob("*.py"):
        module = __import__(f"rarl_kernels.{path.stem}", fromlist=["_"])
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction | _interpreted_type()):
                names.add(name)
    return names


def _interpreted_type():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile real kernels
    proc = subprocess.run(
        [sys.executable, "-m", "rarl_kernels.aot", "--jobs", str(min(4, os.cpu_count() or 1)), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=1500,
    )  # fmt: skip
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.timeout(1800)
def test_every_variant_meets_the_rules_on_every_architecture(builds):
    failures = [f"{b['kernel']} sm_{b['arch']} {b['dtype']} [{b['flags']}] [{b['operands']}]: {p}"
                for b in builds for p in b["problems"]]  # fmt: skip
    assert not failures, "\n".join(failures)
    assert {b["arch"] for b in builds} == set(aot.ARCHS)


@pytest.mark.timeout(1800)
def test_every_kernel_and_flag_is_compiled(builds):
    by_kernel = collections.defaultdict(list)
    for b in builds:
        by_kernel[b["kernel"]].append(b)
    assert set(by_kernel) == defined_kernels()
    for kernel, bs in by_kernel.items():
        values = collections.defaultdict(set)
        for b in bs:
            for item in filter(None, b["flags"].split(",")):
                name, value = item.split("=")
                values[name].add(value)
        for name, seen in values.items():
            if name in INTERPRETER_ONLY:
                assert seen == {"0"}, (kernel, name, seen)
            elif seen <= {"0", "1"}:
                missing = {"0", "1"} - seen
                assert not missing, f"{kernel}: the option sweep never sets {name} to {missing}"
    surrogates = {item.split("=")[1] for b in by_kernel["_grpo_token_kernel"] for item in b["flags"].split(",")
                  if item.startswith("SURROGATE=")}  # fmt: skip
    assert surrogates == set(SURROGATE.values()), surrogates
    for arch in aot.ARCHS:
        dots = [b for b in builds if b["arch"] == arch and b["has_dot"] and b["dtype"] == "bf16"]
        assert {b["kernel"] for b in dots} == {
            "_linear_logprobs_fwd_kernel", "_linear_logprobs_dlogits_kernel", "_logits_partials_kernel",
            "_matmul_kernel",
        }  # fmt: skip
        assert all(aot.TENSOR_CORE_OP[arch].match(b["tensor_core"]) for b in dots)
        assert sum(b["dtype"] == "fp32" for b in builds if b["arch"] == arch) > 0


@pytest.mark.timeout(1800)
def test_fp32_variants_do_not_spill_either(builds):
    """fp32 inputs take the smaller fp32 tiles, which keep even the CUDA-core dots in registers."""
    spills = [(b["kernel"], b["arch"], b["spill_stores"]) for b in builds if b["spill_stores"] or b["spill_loads"]]
    assert not spills


def test_tiles_follow_the_device_capability(monkeypatch):
    import torch

    cuda = torch.device("cuda")
    for capability, arch in [((8, 0), 80), ((8, 9), 80), ((9, 0), 90), ((10, 0), 100), ((12, 0), 80)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert _utils.gpu_arch(cuda) == arch
        assert _utils.tile_config(cuda, torch.bfloat16) == _utils.GPU_TILES[arch]["16bit"]
        assert _utils.tile_config(cuda, torch.float32) == _utils.GPU_TILES[arch]["fp32"]
    monkeypatch.setitem(_utils.TILE_OVERRIDES, "BLOCK_V", 256)
    assert _utils.tile_config(cuda, torch.bfloat16)["BLOCK_V"] == 256
    assert _utils.gpu_arch(torch.device("cpu")) is None
    assert _utils.tile_config(torch.device("cpu"), torch.float32)["BLOCK_V"] == 256


@pytest.mark.gpu
def test_gpu_loaded_variants_do_not_spill():
    """The compile check's twin on a GPU: after the same option sweep runs for real, every variant the driver
    loaded has no spill and fits the device's shared memory."""
    import itertools

    import torch

    assert not _utils.interpreting(), "run GPU tests with TRITON_INTERPRET=0"
    for (_, dtype), shape in itertools.product(aot.DTYPES.items(), aot.SHAPES.values()):
        collections.deque(aot.option_runs(dtype, shape, device="cuda"), maxlen=0)
    torch.cuda.synchronize()
    rows = aot.loaded_kernels()
    assert {r["kernel"] for r in rows} == defined_kernels()
    assert not [r for r in rows if r["spill_bytes"]], [r for r in rows if r["spill_bytes"]]
