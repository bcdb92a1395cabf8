"""Tests that cannot run here: a failure under CI=true, a skip with the reason elsewhere."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """True where the environment variable CI is set to true (as ``.ci/run`` is run)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Stop a test that cannot run here: a failure under CI=true, where everything it needs must be
    present, and a skip with ``reason`` elsewhere (e.g. a fresh clone without ../shared)."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a test that cannot run is a failure)", pytrace=False)
    pytest.skip(reason)
