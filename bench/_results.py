"""What every bench script writes beside its figures: the folder, the commit, the device, and CSV rows.

The bench scripts run as ``python bench/<script>.py`` (this folder is then first on ``sys.path``). On the GPU
machine the tree arrives without ``.git``: ``gpu_check.sh`` passes the commit in ``$RARL_COMMIT`` and the
output folder in ``$RARL_BENCH_OUT``.
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def results_dir() -> Path:
    """``$RARL_BENCH_OUT`` when set, else ``bench/results`` of this checkout; created if missing."""
    out = Path(os.environ.get("RARL_BENCH_OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def git_commit() -> str:
    """``$RARL_COMMIT``, else the short HEAD of this checkout with ``-dirty`` for uncommitted changes, else
    ``none`` (no git, or not a repository)."""
    if os.environ.get("RARL_COMMIT"):
        return os.environ["RARL_COMMIT"]
    try:
        run = dict(cwd=ROOT, capture_output=True, text=True, check=True)
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()  # type: ignore[call-overload]
        dirty = subprocess.run(["git", "status", "--porcelain"], **run).stdout.strip()  # type: ignore[call-overload]
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "none"


def device_label(cuda_name: str | None = None) -> str:
    """The GPU's name when given, else ``cpu:<processor>x<cores>``."""
    if cuda_name:
        return cuda_name
    return f"cpu:{platform.processor() or platform.machine()}x{os.cpu_count()}"


def append_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Append rows to ``path`` (header first when the file is new); keys outside ``fields`` are ignored."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
