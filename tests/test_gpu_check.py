"""bench/gpu_check.sh --dry-run runs every part at toy size on the CPU and writes few, named files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(450)
def test_gpu_check_dry_run(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,  # the rollout part compiles the toy decode step once (cold: up to a minute or two)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8
    assert "gpu_check_cpu-dry-run.log" in files and "gpu_check_cpu-dry-run.md" in files
    summary = (tmp_path / "gpu_check_cpu-dry-run.md").read_text()
    parts = ("env", "install", "gpu-tests", "smoke", "rollout-bench", "rollout-3b", "kernels-3b", "kernels-7b",
             "kernel-report", "step-bench")  # fmt: skip
    for part in parts:
        assert f"| {part} | ok |" in summary, summary
    smoke = (tmp_path / "gpu_smoke_cpu-dry-run.csv").read_text().splitlines()
    assert smoke[0].startswith("date,commit,device") and len(smoke) == 2
    rollout = (tmp_path / "rollout.csv").read_text().splitlines()
    assert rollout[0].startswith("date,commit,device") and len(rollout) == 5  # 3 providers x 4 images + 1 x 1
    kernels = (tmp_path / "kernels.csv").read_text().splitlines()
    assert kernels[0].startswith("date,device") and len(kernels) > 3
    step = (tmp_path / "step.csv").read_text().splitlines()
    assert step[0].startswith("date,commit,device") and len(step) == 3  # ours and torch


def test_gpu_check_rejects_unknown_flags():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
