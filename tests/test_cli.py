"""The command line as a new user meets it: its name in usage lines, and arguments checked first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main, program_name

from .conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bloodsmear-pipeline"  # [project.scripts] in pyproject.toml


def _env() -> dict[str, str]:
    """The environment of a child process that imports this checkout."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, env=_env(), check=False, timeout=120)


@pytest.mark.parametrize(
    ("argv0", "name"),
    [
        ("/usr/local/bin/bloodsmear-pipeline", "bloodsmear-pipeline"),
        ("/home/me/.venv/bin/bloodsmear-pipeline", "bloodsmear-pipeline"),
        ("/work/pipeline/__main__.py", "python -m pipeline"),
        ("-c", "python -m pipeline"),
    ],
)
def test_program_name_is_the_name_it_was_run_by(argv0, name):
    assert program_name(argv0) == name


def test_version_and_usage_name_the_installed_script():
    if shutil.which(SCRIPT) is None:
        unavailable(f"{SCRIPT} is not on PATH: pip install -e . installs it")
    version = _run(SCRIPT, "--version")
    assert version.returncode == 0 and version.stdout.strip().startswith(f"{SCRIPT} 0.")
    usage = _run(SCRIPT, "run")
    assert usage.returncode == 2 and usage.stderr.startswith(f"usage: {SCRIPT} run ")
    assert "python -m" not in usage.stderr


def test_version_and_usage_under_python_dash_m():
    version = _run(sys.executable, "-m", "pipeline", "--version")
    assert version.returncode == 0 and version.stdout.startswith("python -m pipeline 0.")
    usage = _run(sys.executable, "-m", "pipeline", "evaluate")
    assert usage.returncode == 2 and usage.stderr.startswith("usage: python -m pipeline evaluate ")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small simulated slide and the folder holding its complete gallery."""
    from pipeline.runner import run_slide
    from pipeline.simulate import simulate_slide

    folder = tmp_path_factory.mktemp("finished")
    sim = simulate_slide(
        folder / "s.svs", width_mm=0.5, height_mm=0.5, seed=3, preset="aml", workers=0, progress=False
    )
    assert run_slide(sim.slide_path, folder / "out", workers=0, progress=False).cells > 0
    return sim.slide_path, folder / "out"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "20"])
def test_bad_mpp_is_an_error_even_where_the_gallery_is_complete(finished, value, capsys):
    slide, out = finished
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["run", str(slide), "--out", str(out), "--mpp", value, "--workers", "0", "--quiet"]) == 1
    printed = capsys.readouterr()
    assert "skipped" not in printed.out + printed.err
    assert printed.err.startswith(f"error: --mpp {float(value):g} um/px is outside the plausible")
    assert sorted(p.name for p in out.rglob("*")) == before  # not even the batch record is rewritten
    # a plausible --mpp still skips the complete gallery
    assert main(["run", str(slide), "--out", str(out), "--mpp", "0.25", "--workers", "0", "--quiet"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_a_reader_that_stops_early_is_not_an_error(finished):
    """``evaluate ... | head``: the pipe closes before the report is written; no error line, no traceback."""
    slide, out = finished
    command = ["evaluate", str(out / "s.zarr"), str(slide.with_suffix(".truth.csv"))]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    proc.stdout.close()  # the reader goes away before the command prints anything
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert "error" not in stderr and "Traceback" not in stderr, stderr
