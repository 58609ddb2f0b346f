"""Test-wide setup. TRITON_INTERPRET must be set before anything imports triton (including liger_kernel)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests run only where CUDA exists (bench/gpu_check.sh); elsewhere they are skipped, counted."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def fast_interpreter():
    """The Triton interpreter checks every int32 op for overflow (~1 ms each); the kernels index in int64 where
    it matters, so the kernel test modules switch the check off for speed (``pytestmark`` in each)."""
    try:
        import triton.runtime.interpreter as ti

        old = ti.interpreter_builder.options
        ti.interpreter_builder.options = dataclasses.replace(old, sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):  # another triton layout: run at the normal speed
        yield
        return
    yield
    ti.interpreter_builder.options = old


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: the worked reward cases, the exact prompts and the committed reference curve."""
    return DATA


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen2.5-VL with offline tokenizer/processor, built once per session."""
    from rarl_fast.model import make_tiny_vlm

    out = tmp_path_factory.mktemp("tiny_vlm")
    make_tiny_vlm(out, seed=0)
    return out
