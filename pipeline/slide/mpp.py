"""Pixel-size rules: plausible range, ``--mpp`` override, unequal x and y sizes."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from ..errors import MppError

MPP_RANGE_UM: tuple[float, float] = (0.05, 10.0)
"""Plausible level-0 pixel sizes in um/px; metadata or ``--mpp`` outside this range is an error."""
_MPP_HINT = "pass --mpp UM_PER_PX (e.g. --mpp 0.25)"
_MPP_XY_WARN_FRACTION = 0.05


def _check_mpp_value(path: Path | None, value: float, origin: str) -> float:
    low, high = MPP_RANGE_UM
    if not math.isfinite(value) or not low <= value <= high:
        where = "" if path is None else f"{path}: "
        raise MppError(
            f"{where}{origin} {value:g} um/px is outside the plausible {low:g}-{high:g} um/px; {_MPP_HINT}"
        )
    return value


def check_mpp_option(value: float) -> float:
    """Refuse an implausible ``--mpp`` before any slide is looked at (or skipped).

    Parameters
    ----------
    value
        The pixel size given on the command line, um/px.

    Returns
    -------
    float
        ``value``, if within :data:`MPP_RANGE_UM`.

    Raises
    ------
    MppError
        Outside the range, or not a finite number.
    """
    return _check_mpp_value(None, value, "--mpp")


def _resolve_mpp(path: Path, mpp_xy: tuple[float | None, float | None], override: float | None) -> float:
    """The level-0 pixel size: the override if given, else the (mean) metadata value."""
    if override is not None:
        try:
            value = float(override)
        except (TypeError, ValueError) as exc:
            raise MppError(f"{path}: --mpp {override!r} is not a number; {_MPP_HINT}") from exc
        return _check_mpp_value(path, value, "--mpp")
    values = [v for v in mpp_xy if v is not None]
    if not values:
        raise MppError(f"{path} has no pixel size (MPP) in its metadata; {_MPP_HINT}")
    for value in values:
        _check_mpp_value(path, value, "pixel size")
    mpp = sum(values) / len(values)
    if len(values) == 2 and abs(values[0] - values[1]) > _MPP_XY_WARN_FRACTION * mpp:
        warnings.warn(
            f"{path}: pixel width {values[0]:g} and height {values[1]:g} um differ by more than "
            f"{_MPP_XY_WARN_FRACTION:.0%}; using their mean {mpp:g} um/px",
            UserWarning,
            stacklevel=3,
        )
    return mpp
