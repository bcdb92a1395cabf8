"""Quality of each candidate: is it a single, whole, in-focus cell in a readable part of the smear?

Metafer grades every gallery object by *cell density* and *the immediate neighbourhood* of the cell
(MLL23, Scientific Data 2025). Here, in physical units:

``layers``
    How thick the smear is around the cell: the mean red-cell optical density over a ring around it
    (``ring_gap_um`` to ``ring_gap_um + ring_width_um`` beyond the cell's equivalent radius, other
    objects left out), in units of one red cell on this slide
    (:attr:`pipeline.segment.SlideStains.red_cell_od`).
    A sparse field gives 0.2-0.5, a crowded readable monolayer where red cells touch each other and the
    white cell 0.6-1.7 (real photographs of four labs), red cells stacked in the thick head of a smear
    or in rouleaux more.
``density_ratio``
    ``layers`` over the slide's *own* typical density (:func:`slide_density`: the median over the
    stained part of the slide's sample windows, in blocks of ``density_block_um``; at least
    ``min_density``). Density is judged against the slide's own monolayer, not against one absolute
    number: labs, stains and scanners give a readable field anything from 0.5 to 1.3 layers. A cell is
    rejected as ``thick_zone`` when its ring is more than ``thick_factor`` times as dense as the slide's
    typical field.
``coverage``, ``stacked``
    Fraction of the ring covered by stain (or other objects), and of it at least ``stacked_factor`` red
    cells thick: reported, not judged (real readable fields reach coverage 1.0 and stacked 0.8).
``gap_um``
    Distance from the cell's edge to the nearest other candidate's edge (equivalent radii): another
    nucleated cell touching it (``touching``).
``cut``
    The object reaches the edge of the scanned image (``cut``): part of the cell is missing. Crops that
    merely reach past the edge are white-padded and flagged, as Metafer pads at field edges.
``blur_um``
    Edge blur of the cell at full resolution (estimated during relocation, see :mod:`pipeline.relocate`):
    ``out_of_focus``.

Where the defaults come from (``python -m benchmarks.real_smears --split tune``, the tuning halves of
PBC/CellaVision, Raabin, BCD and BCCD tiled into slides; the held-out halves are reported, not tuned on):
on those readable fields the densest ring of a good cell is 1.35-2.3 times its slide's typical density,
and gallery recall stays flat for any ``thick_factor`` from 2.4 up; 2.5 rejects what is denser still.

A candidate is accepted when it passes every limit; otherwise its ``reason`` names the first limit it
fails, in the order of :data:`REASONS`. ``quality`` (0-1) is a soft score of the margins, for ranking.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pandas as pd

from .errors import ParameterError
from .segment import NON_TISSUE_MIN_OD, clip_negative, written_into

REASONS = ("cut", "thick_zone", "touching", "out_of_focus")


@dataclass(frozen=True)
class QualityParams:
    """Limits of the quality filter (physical units; see the module docstring).

    Attributes
    ----------
    ring_gap_um, ring_width_um
        The neighbourhood ring starts this far outside the cell and is this wide.
    stained_factor
        A ring pixel counts towards ``coverage`` above this fraction of a single red cell's OD.
    stacked_factor
        ... and towards ``stacked`` above this multiple of it.
    density_block_um
        Side of the blocks in which the slide's typical density is measured (about three red cells).
    thick_factor
        Reject as ``thick_zone`` when the ring is more than this many times as dense as the slide's
        typical field.
    min_density
        ... where the typical field counts as at least this dense (red-cell layers): the readable
        fields of the real sets measure 0.75-1.0, and on a sparse slide (anaemic blood, samples near
        the smear's borders) a ring of red cells touching the white cell is no thick zone.
    min_gap_um
        Reject as ``touching`` when another candidate's edge is closer than this (negative: overlap).
    max_blur_um
        Reject as ``out_of_focus`` when the cell's estimated edge blur (Gaussian sigma) is larger.
    """

    ring_gap_um: float = 2.0
    ring_width_um: float = 12.0
    stained_factor: float = 0.35
    stacked_factor: float = 1.7
    density_block_um: float = 24.0
    thick_factor: float = 2.5
    min_density: float = 0.6
    min_gap_um: float = 1.0
    max_blur_um: float = 0.9

    def __post_init__(self) -> None:
        positive = (
            "ring_gap_um",
            "ring_width_um",
            "stained_factor",
            "stacked_factor",
            "density_block_um",
            "thick_factor",
            "min_density",
            "max_blur_um",
        )
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ParameterError(f"quality parameter {name} must be > 0, got {value}")
        if not math.isfinite(self.min_gap_um):
            raise ParameterError(f"quality parameter min_gap_um must be finite, got {self.min_gap_um}")

    def as_dict(self) -> dict[str, float]:
        """The parameters as a JSON-safe dict."""
        return asdict(self)


def red_cell_layers(
    od: np.ndarray, red_cell_direction, red_cell_od: float, out: np.ndarray | None = None
) -> np.ndarray:
    """Optical density along the slide's red-cell direction, in single red cells ``(h, w)`` float32.

    Pixels dark in every channel (black or unscanned areas, field stops: not tissue, see
    :data:`pipeline.segment.NON_TISSUE_MIN_OD`) are NaN: they say nothing of how thick the smear is.

    Parameters
    ----------
    od
        Optical density ``(h, w, 3)`` (:func:`pipeline.segment.optical_density`).
    red_cell_direction
        The slide's red-cell OD direction (any length).
    red_cell_od
        A single red cell's typical OD along it.
    out
        A C-contiguous float32 array ``(h, w)`` to write the result into (a part of a larger image).
    """
    od = np.ascontiguousarray(od, dtype=np.float32)
    e = np.asarray(red_cell_direction, dtype=np.float64)
    e = e / np.linalg.norm(e) / max(float(red_cell_od), 1e-6)
    if out is None:
        layers = cv2.transform(od, e.astype(np.float32)[None]).reshape(od.shape[:2])
    else:
        layers = written_into(cv2.transform(od, e.astype(np.float32)[None], dst=out), out)
    clip_negative(layers)
    # Non-tissue pixels are rare: find the few that can be, then test them exactly. Where every channel
    # reaches NON_TISSUE_MIN_OD, so does the projection on a direction of non-negative components (times
    # their sum; 1e-3 of slack covers float32 rounding): a one-channel test on the layers just computed,
    # instead of a minimum over three strided channels of the whole tile (~6 ms of 8).
    if (e >= 0).all():
        bound = np.float32(NON_TISSUE_MIN_OD * float(e.sum()) * (1 - 1e-3))
        maybe = np.flatnonzero((layers >= bound).ravel())
    else:
        maybe = np.arange(layers.size)
    if len(maybe):
        darkest = od.reshape(-1, 3)[maybe].min(axis=1)
        layers.reshape(-1)[maybe[darkest >= NON_TISSUE_MIN_OD]] = np.nan
    return layers


def slide_density(layers: list[np.ndarray], mpp: float, params: QualityParams) -> float:
    """The slide's typical density: median red-cell layers over the stained blocks of its samples.

    Parameters
    ----------
    layers
        :func:`red_cell_layers` of the slide's sample windows.
    mpp
        Their pixel size, um/px.
    params
        ``density_block_um`` sets the block size.

    Returns
    -------
    float
        NaN when no block holds stain (blank glass): then no cell is judged on density.
    """
    b = max(1, round(params.density_block_um / mpp))
    blocks = []
    for window in layers:
        h, w = (window.shape[0] // b) * b, (window.shape[1] // b) * b
        if h and w:
            with warnings.catch_warnings():  # a block of nothing but black is NaN, and left out
                warnings.simplefilter("ignore", RuntimeWarning)
                part = np.nanmean(window[:h, :w].reshape(h // b, b, w // b, b), axis=(1, 3))
            blocks.append(part.ravel())
    values = np.concatenate(blocks) if blocks else np.zeros(0)
    # Blocks of bare glass (a tenth of a red cell's worth of stain) say nothing of the smear's density.
    stained = values[values > 0.1]
    return float(np.median(stained)) if stained.size else math.nan


def ring_features(
    layers: np.ndarray,
    labels: np.ndarray,
    x_px: np.ndarray,
    y_px: np.ndarray,
    radius_px: np.ndarray,
    mpp: float,
    params: QualityParams,
) -> pd.DataFrame:
    """How crowded the ring around each object is, in red cells, on one overview tile.

    Parameters
    ----------
    layers
        :func:`red_cell_layers` of the tile ``(h, w)``, with its halo (0 on glass, about 1 on a red cell,
        more where red cells are stacked).
    labels
        Object labels of the tile (0: background); pixels of other objects are not red cells.
    x_px, y_px, radius_px
        Object centres (tile pixels, continuous) and equivalent radii (px).
    mpp
        Pixel size of the tile, um/px.
    params
        Limits.

    Returns
    -------
    pandas.DataFrame
        One row per object: ``coverage`` (fraction of the ring covered by stain or other objects),
        ``layers`` (mean of ``layers`` over the ring's pixels outside objects) and
        ``stacked`` (fraction of those pixels at least ``stacked_factor`` red cells thick). NaN where
        the ring lies outside the tile.
    """
    h, w = layers.shape
    n = len(x_px)
    coverage, mean_layers, stacked = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    if n == 0:
        return pd.DataFrame({"coverage": coverage, "layers": mean_layers, "stacked": stacked})
    layers = np.ascontiguousarray(layers, dtype=np.float32)
    labels = np.ascontiguousarray(labels)
    gap_px, width_px = params.ring_gap_um / mpp, params.ring_width_um / mpp
    # What each pixel counts towards (see _ring_state), for the whole tile at once where the objects'
    # boxes cover more than half of it (hundreds of objects: one gather each, not six passes), else
    # box by box (a sparse tile: the six passes over the tile would cost more than the boxes).
    side = 2 * (np.asarray(radius_px, np.float64) + gap_px + width_px) + 2
    state = _ring_state(layers, labels, params) if float(np.sum(side * side)) > h * w / 2 else None
    # Pixel centres (i + 0.5), once for the tile.
    rows, cols = np.arange(h) + 0.5, np.arange(w) + 0.5
    for k, (x, y, r) in enumerate(zip(x_px.tolist(), y_px.tolist(), radius_px.tolist(), strict=True)):
        inner = r + gap_px
        outer = inner + width_px
        y0, y1 = max(0, math.floor(y - outer)), min(h, math.ceil(y + outer) + 1)
        x0, x1 = max(0, math.floor(x - outer)), min(w, math.ceil(x + outer) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = rows[y0:y1] - y, cols[x0:x1] - x
        d2 = np.add.outer(dy * dy, dx * dx)
        ring = (d2 >= inner**2) & (d2 < outer**2)
        box = state[y0:y1, x0:x1] if state is not None else None
        if box is None:
            box = _ring_state(layers[y0:y1, x0:x1], labels[y0:y1, x0:x1], params)
        codes = box[ring]
        if not codes.size:
            continue
        count = np.bincount(codes, minlength=8).tolist()
        coverage[k] = sum(count[1::2]) / codes.size
        n_free = count[2] + count[3] + count[6] + count[7]
        if n_free:
            free = layers[y0:y1, x0:x1][ring][(codes & 2) > 0]  # row-major, as a boolean mask gives
            # ndarray.mean's own arithmetic: float32 (pairwise) sum, divided in float64, back to float32
            mean_layers[k] = float(np.float32(float(np.add.reduce(free)) / n_free))
            stacked[k] = (count[6] + count[7]) / n_free
    return pd.DataFrame({"coverage": coverage, "layers": mean_layers, "stacked": stacked})


def _ring_state(layers: np.ndarray, labels: np.ndarray, params: QualityParams) -> np.ndarray:
    """What each pixel counts towards in a ring, uint8 bits: 1 stain or another object (coverage);
    2 red cells that say how thick the smear is (no object, not black); 4 of those, stacked."""
    occupied = labels > 0
    state = ((layers > np.float32(params.stained_factor)) | occupied).view(np.uint8)
    usable = ~occupied & ~np.isnan(layers)
    state |= usable.view(np.uint8) << 1
    state |= (usable & (layers > np.float32(params.stacked_factor))).view(np.uint8) << 2
    return state


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


def judge(candidates: pd.DataFrame, params: QualityParams, density: float = math.nan) -> pd.DataFrame:
    """Accept or reject candidates from their features.

    Parameters
    ----------
    candidates
        Needs ``layers`` and ``gap_um``; optional ``cut`` (bool) and, where relocation has measured it,
        ``blur_um`` (NaN or absent: not judged on focus).
    params
        Limits.
    density
        The slide's typical density (:func:`slide_density`); NaN: not judged on density.

    Returns
    -------
    pandas.DataFrame
        ``density_ratio``, ``quality`` (0-1), ``accepted`` and ``reason`` ("" when accepted), on the
        candidates' index.
    """
    n = len(candidates)
    reference = max(density, params.min_density) if density > 0 else math.nan
    ratio = candidates["layers"].to_numpy(float) / reference
    gap = candidates["gap_um"].to_numpy(float)
    blur = candidates["blur_um"].to_numpy(float) if "blur_um" in candidates else np.full(n, np.nan)
    cut = candidates["cut"].to_numpy(bool) if "cut" in candidates else np.zeros(n, bool)
    # NaN features (no ring inside the slide, focus not measured) do not fail a limit.
    fails = {
        "cut": cut,
        "thick_zone": ratio > params.thick_factor,
        "touching": gap < params.min_gap_um,
        "out_of_focus": blur > params.max_blur_um,
    }
    reason = np.full(n, "", dtype=object)
    for name in reversed(REASONS):
        reason = np.where(fails[name], name, reason)
    quality = (
        np.where(cut, 0.0, 1.0)
        * _soft(params.thick_factor - ratio, 0.1 * params.thick_factor)
        * _soft(np.minimum(gap, 50.0) - params.min_gap_um, 1.0)
        * _soft(params.max_blur_um - blur, 0.1)
    )
    return pd.DataFrame(
        {"density_ratio": ratio, "quality": quality, "accepted": reason == "", "reason": reason.astype(str)},
        index=candidates.index,
    )
