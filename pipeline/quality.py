"""Quality of each candidate: is it a single, well-spread, in-focus cell worth a 40x crop?

Metafer grades every gallery object by cell density and the immediate neighbourhood of the cell; we
compute the same kind of features, in physical units, and document a default for each limit:

``coverage``
    Fraction of a ring around the cell (``ring_gap_um`` to ``ring_gap_um + ring_width_um`` beyond the
    cell's radius) covered by stain. The monolayer shows glass between red cells; the thick head of a
    smear does not.
``overlap``
    Fraction of that ring where stain is at least ``overlap_factor`` times a typical red cell: red cells
    lying on top of each other (thick zone, rouleaux, clumps).
``gap_um``
    Distance from the cell's edge to the nearest other candidate's edge (equivalent radii). Touching or
    crowded cells give crops with two cells in them.
``edge_um``
    Distance from the cell centre to the slide edge; crops reaching past it are white-padded and flagged,
    as Metafer pads at field edges; they are not rejected.
``blur_um``
    Edge blur of the cell at full resolution (estimated during relocation, see :mod:`pipeline.relocate`).

A candidate is accepted when it passes every limit; otherwise its ``reason`` names the first limit it
fails, in the order of :data:`REASONS`. ``quality`` (0-1) is a soft score of the margins, for ranking.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .errors import ParameterError

REASONS = ("thick_zone", "overlapping", "touching", "out_of_focus")


@dataclass(frozen=True)
class QualityParams:
    """Limits of the quality filter (physical units; see the module docstring).

    Attributes
    ----------
    ring_gap_um, ring_width_um
        The neighbourhood ring starts this far outside the cell and is this wide.
    stained_factor
        A ring pixel counts as stained above this fraction of the typical red-cell optical density.
    overlap_factor
        ... and as overlapping red cells above this multiple of it.
    max_coverage
        Reject as ``thick_zone`` when more of the ring than this is stained.
    max_overlap
        Reject as ``overlapping`` when more of the ring than this is overlapping red cells.
    min_gap_um
        Reject as ``touching`` when another candidate's edge is closer than this (negative: overlap).
    max_blur_um
        Reject as ``out_of_focus`` when the cell's estimated edge blur (Gaussian sigma) is larger.
    """

    ring_gap_um: float = 2.0
    ring_width_um: float = 12.0
    stained_factor: float = 0.35
    overlap_factor: float = 1.6
    max_coverage: float = 0.85
    max_overlap: float = 0.08
    min_gap_um: float = 1.0
    max_blur_um: float = 0.9

    def __post_init__(self) -> None:
        for name in ("ring_gap_um", "ring_width_um", "stained_factor", "overlap_factor", "max_blur_um"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ParameterError(f"quality parameter {name} must be > 0, got {value}")
        for name in ("max_coverage", "max_overlap"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ParameterError(f"quality parameter {name} must be in (0, 1], got {value}")

    def as_dict(self) -> dict[str, float]:
        """The parameters as a JSON-safe dict."""
        return asdict(self)


def ring_features(
    od_sum: np.ndarray,
    labels: np.ndarray,
    x_px: np.ndarray,
    y_px: np.ndarray,
    radius_px: np.ndarray,
    mpp: float,
    red_cell_od: float,
    params: QualityParams,
) -> pd.DataFrame:
    """Coverage and overlap of the ring around each object, on one overview tile.

    Parameters
    ----------
    od_sum
        Optical density summed over R, G, B of the tile (with halo).
    labels
        Object labels of the tile (0: background); pixels of other objects count as stained.
    x_px, y_px, radius_px
        Object centres (tile pixels, continuous) and equivalent radii (px).
    mpp
        Pixel size of the tile, um/px.
    red_cell_od
        Typical summed optical density of a red cell on this slide.
    params
        Limits.

    Returns
    -------
    pandas.DataFrame
        Columns ``coverage`` and ``overlap`` (fractions of the ring in the tile), one row per object.
    """
    h, w = od_sum.shape
    stained_level = params.stained_factor * red_cell_od
    overlap_level = params.overlap_factor * red_cell_od
    coverage = np.full(len(x_px), np.nan)
    overlap = np.full(len(x_px), np.nan)
    for k, (x, y, r) in enumerate(zip(x_px, y_px, radius_px, strict=True)):
        inner = r + params.ring_gap_um / mpp
        outer = inner + params.ring_width_um / mpp
        y0, y1 = max(0, math.floor(y - outer)), min(h, math.ceil(y + outer) + 1)
        x0, x1 = max(0, math.floor(x - outer)), min(w, math.ceil(x + outer) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        d2 = (yy + 0.5 - y) ** 2 + (xx + 0.5 - x) ** 2
        ring = (d2 >= inner**2) & (d2 < outer**2)
        n = int(ring.sum())
        if n == 0:
            continue
        window = od_sum[y0:y1, x0:x1][ring]
        other = labels[y0:y1, x0:x1][ring] > 0
        coverage[k] = float(np.mean((window > stained_level) | other))
        overlap[k] = float(np.mean((window > overlap_level) & ~other))
    return pd.DataFrame({"coverage": coverage, "overlap": overlap})


def neighbour_gaps_um(
    x_um: np.ndarray, y_um: np.ndarray, radius_um: np.ndarray, search_um: float = 60.0
) -> np.ndarray:
    """Edge-to-edge distance (um) from each object to its nearest neighbour (inf when alone)."""
    n = len(x_um)
    gaps = np.full(n, np.inf)
    if n < 2:
        return gaps
    # Imported here: only the driver judges neighbours, and scipy.spatial adds a third of a second to
    # every worker's start.
    from scipy.spatial import cKDTree

    points = np.column_stack([x_um, y_um])
    tree = cKDTree(points)
    for i, j in tree.query_pairs(r=search_um + 2 * float(np.max(radius_um))):
        gap = math.hypot(x_um[i] - x_um[j], y_um[i] - y_um[j]) - radius_um[i] - radius_um[j]
        gaps[i] = min(gaps[i], gap)
        gaps[j] = min(gaps[j], gap)
    return gaps


def _soft(margin: np.ndarray, scale: float) -> np.ndarray:
    """1 when comfortably inside a limit, 0.5 at the limit, -> 0 beyond it."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = 1.0 / (1.0 + np.exp(-np.asarray(margin, dtype=float) / scale))
    return np.where(np.isnan(out), 1.0, out)


def judge(candidates: pd.DataFrame, params: QualityParams) -> pd.DataFrame:
    """Accept or reject candidates from their features; returns ``quality``, ``accepted``, ``reason``.

    ``candidates`` needs the columns ``coverage``, ``overlap``, ``gap_um`` and, where relocation has
    measured it, ``blur_um`` (NaN or absent: not judged on focus).
    """
    n = len(candidates)
    coverage = candidates["coverage"].to_numpy(float)
    overlap = candidates["overlap"].to_numpy(float)
    gap = candidates["gap_um"].to_numpy(float)
    blur = candidates["blur_um"].to_numpy(float) if "blur_um" in candidates else np.full(n, np.nan)
    # NaN features (no ring inside the slide) do not fail a limit.
    fails = {
        "thick_zone": coverage > params.max_coverage,
        "overlapping": overlap > params.max_overlap,
        "touching": gap < params.min_gap_um,
        "out_of_focus": blur > params.max_blur_um,
    }
    reason = np.full(n, "", dtype=object)
    for name in reversed(REASONS):
        reason = np.where(fails[name], name, reason)
    quality = (
        _soft(params.max_coverage - coverage, 0.05)
        * _soft(params.max_overlap - overlap, params.max_overlap / 4)
        * _soft(np.minimum(gap, 50.0) - params.min_gap_um, 1.0)
        * _soft(params.max_blur_um - blur, 0.1)
    )
    return pd.DataFrame(
        {"quality": quality, "accepted": reason == "", "reason": reason.astype(str)}, index=candidates.index
    )
