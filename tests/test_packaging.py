"""Packaging: the two import packages, the console entry point, light CLI start-up."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout


def test_rarl_kernels_imports_no_rarl_fast_module():
    out = _run_python(
        "import json, sys, rarl_kernels; "
        "print(json.dumps([m for m in sys.modules if m == 'rarl_fast' or m.startswith('rarl_fast.')]))"
    )
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_rarl_kernels_imports_no_trainer():
    """The trainer integrations are separate modules: the core package does not import TRL, verl or Liger."""
    out = _run_python(
        "import json, sys, rarl_kernels, rarl_kernels.integrations; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'trl', 'verl', 'liger_kernel'})))"
    )
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_rarl_kernels_source_never_imports_rarl_fast():
    pattern = re.compile(r"^\s*(from\s+rarl_fast[\s.]|import\s+rarl_fast\b)", re.MULTILINE)
    offenders = [p.name for p in (ROOT / "kernels").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_rarl_kernels_maps_to_the_kernels_folder():
    out = _run_python("import rarl_kernels; print(rarl_kernels.__file__)")
    assert Path(out.strip()).resolve().parent == (ROOT / "kernels").resolve()


def test_cli_help_lists_existing_subcommands_and_imports_nothing_heavy():
    from rarl_fast.cli import COMMANDS

    exe = shutil.which("rarl-fast", path=str(Path(sys.executable).parent)) or shutil.which("rarl-fast")
    assert exe, "the rarl-fast console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out
    heavy = _run_python(
        "import sys; from rarl_fast.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'triton', 'PIL', 'scipy') if m in sys.modules))"
    )
    assert heavy.strip().splitlines()[-1] == "[]"


def test_cli_config_reports_errors_clearly(tmp_path: Path):
    from rarl_fast.cli import main

    assert main(["config", "-c", str(ROOT / "configs" / "demo_cpu.yaml"), "--out", str(tmp_path / "r.yaml")]) == 0
    assert (tmp_path / "r.yaml").read_text().startswith("run_name: demo_cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rarl_fast.cli",
            "config",
            "-c",
            str(ROOT / "configs" / "demo_cpu.yaml"),
            "loss.eps_low=-1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "loss.eps_low" in proc.stderr and "must be >= 0" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_make_tiny(tmp_path: Path):
    from rarl_fast.cli import main

    assert main(["make-tiny", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_cli_config_imports_nothing_heavy(tmp_path: Path):
    """Validating a config (and refusing a bad one, e.g. a YAML alias bomb) needs neither torch nor transformers."""
    heavy = _run_python(
        "import sys; from rarl_fast.cli import main\n"
        f"main(['config', '-c', {str(ROOT / 'configs' / 'demo_cpu.yaml')!r}, '--out', {str(tmp_path / 'r.yaml')!r}])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'triton', 'PIL', 'scipy') if m in sys.modules))"
    )
    assert heavy.strip().splitlines()[-1] == "[]"
