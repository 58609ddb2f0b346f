"""Where `make trainers` puts the trainer releases that tests/data/trainer_releases.txt lists (in the venv, or in
$RARL_TRAINERS): their wheels, and TRL 1.12 installed alone as an overlay of the venv's packages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TRAINERS = Path(os.environ.get("RARL_TRAINERS", Path(sys.prefix) / "trainers"))
MISSING = "not fetched: `make trainers` downloads it (tests/data/trainer_releases.txt), which needs the network once"


def wheel(name: str, version: str) -> Path | None:
    """The downloaded wheel of `name`==`version`, or None."""
    path = TRAINERS / "wheels" / f"{name}-{version}-py3-none-any.whl"
    return path if path.is_file() else None


def overlay(name: str, version: str) -> Path | None:
    """The folder `name`==`version` is installed in alone (to put in front of sys.path), or None."""
    path = TRAINERS / f"{name}-{version}"
    return path if (path / f"{name}-{version}.dist-info").is_dir() else None
