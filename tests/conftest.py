"""Shared fixtures: simulated slides are made once per test session (they are the test data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._ci import in_ci, unavailable  # noqa: F401  (re-exported for the test modules)
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (a real SLURM for tests/test_slurm.py)

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_SLIDES = SHARED / "data" / "slides"
BCCD = SHARED / "data" / "bccd"


@pytest.fixture(autouse=True)
def _no_interrupt_between_tests():
    """A test that simulates Ctrl-C must not leave the process-wide interrupt record set for the next."""
    from pipeline.errors import clear_interrupt

    yield
    clear_interrupt()


@pytest.fixture(scope="session")
def mll23_slide(tmp_path_factory: pytest.TempPathFactory):
    """The acceptance slide of the simulator issue: 3 x 3 mm, preset mll23, all zones across it."""
    from pipeline.simulate import simulate_slide

    out = tmp_path_factory.mktemp("mll23") / "mll23.svs"
    return simulate_slide(
        out,
        width_mm=3.0,
        height_mm=3.0,
        seed=23,
        preset="mll23",
        placement="across",
        # Every artefact of a real slide (debris, dust, precipitate, focus changes, seams): detection's
        # accuracy targets hold on them (the simulator's debris are small fragments, not smudge cells).
        artefacts="all",
        workers=0,
        progress=False,
    )


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory: pytest.TempPathFactory):
    """A small monolayer slide (1 x 1 mm, preset aml) for quick detection tests."""
    from pipeline.simulate import simulate_slide

    out = tmp_path_factory.mktemp("small") / "small.svs"
    return simulate_slide(
        out,
        width_mm=1.0,
        height_mm=1.0,
        seed=5,
        preset="aml",
        placement="monolayer",
        artefacts="none",
        workers=0,
        progress=False,
    )


def shared_path(*parts: str) -> Path:
    """A path under ../shared beside the checkout; see :func:`unavailable` where it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        unavailable(f"shared fixture {path} not found (the shared folder belongs beside the checkout)")
    return path
