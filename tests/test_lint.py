"""The code base stays ruff-clean (the configuration is in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    if shutil.which("ruff") is None:
        unavailable("ruff is installed with the test extras")
    proc = subprocess.run(
        ["ruff", "check", "pipeline", "tests", "benchmarks", "notebooks", "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_clean():
    if shutil.which("ruff") is None:
        unavailable("ruff is installed with the test extras")
    proc = subprocess.run(
        ["ruff", "format", "--check", "pipeline", "tests", "benchmarks", "notebooks", "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
