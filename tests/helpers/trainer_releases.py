"""Where `make trainers` puts the trainer releases that tests/data/trainer_releases.txt lists (in the venv, or in
$RARL_TRAINERS): their wheels, and TRL 1.12 installed alone as an overlay of the venv's packages."""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Iterator, Sequence
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


@contextlib.contextmanager
def packages_from_wheel(wheel: Path, packages: Sequence[str]) -> Iterator[None]:
    """Inside: modules under `packages` (e.g. "verl", "verl.utils") import from `wheel` (zipimport) without running
    those packages' __init__ (empty package modules stand in, their __path__ inside the wheel). On exit every module
    of the wheel's top-level package is dropped again."""
    top = packages[0].split(".")[0]
    ours = lambda name: name == top or name.startswith(top + ".")
    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in packages:
        package = types.ModuleType(name)
        package.__path__ = [f"{wheel}/{name.replace('.', '/')}"]
        sys.modules[name] = package
    try:
        yield
    finally:
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
