"""The drop-in tests of trainer releases other than the venv's TRL, each in the environment it needs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import trainer_releases

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_trl112_liger_swap_in_its_overlay():
    """tests/trl112_liger_swap.py (our FusedLinearGRPOLoss in TRL 1.12's GRPOTrainer, against Liger's), run with
    TRL 1.12 in front of the venv's TRL 1.16: every case passes."""
    overlay = trainer_releases.overlay("trl", "1.12.0")
    if overlay is None:
        pytest.skip(f"TRL 1.12 {trainer_releases.MISSING}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(overlay), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/trl112_liger_swap.py", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    summary = proc.stdout.strip().splitlines()[-1]
    # one test per CASES entry of trl112_liger_swap.py, nothing skipped or deselected
    assert re.match(r"4 passed(, \d+ warnings?)? in ", summary), out[-2000:]
