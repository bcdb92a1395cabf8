"""Segmentation of the overview: optical density, an adaptive threshold, merged lobes, 40-800 um^2.

The Metafer recipe: a logarithmic colour transform (optical density, OD = -log10(I / I0)) against the
local white I0 of the glass, a threshold, and stained objects of 40-800 um^2. Here:

1. **White level.** I0 is the local bright level of each channel: the maximum over a square window of
   half-side ``white_radius_um`` of the image after a 3 x 3 mean (against pixel noise), so vignetting,
   tint and uneven illumination across camera fields cancel. Where no glass is near (thick zones) the
   window's maximum is a red cell; I0 is then kept at least ``white_floor`` times the slide's white.
2. **Stain other than red cells.** Red cells, single or stacked (thick zone, rouleaux), all have the
   colour of haemoglobin and eosin: their OD vectors point one way, only longer when stacked. White-cell
   nuclei, granules and platelets (purple) point elsewhere. The *stain feature* removes the component
   along the slide's red-cell direction and keeps what points along the slide's *nuclear* direction
   (colour deconvolution with two measured stains; negative values read as 0). Residues of other hues
   do not count: where stacked red cells meet, the camera averages intensity, not OD, and the mixed
   pixels shift hue away from the nuclear direction (on a simulated smear this removes a third of the
   false objects of thick zones; on BCCD a quarter, recall unchanged). On the BCCD photographs at
   1 um/px red cells give about 0.01 OD (95th percentile 0.04), nuclei about 0.2-0.3.
3. **Adaptive threshold.** Directions and threshold are measured once per slide from sample windows
   (:func:`estimate_slide_stains`), never per tile: the threshold is ``threshold_factor`` times the
   75th percentile, on stained (mostly red-cell) pixels, of the residual's length (the spread that
   noise, JPEG and hue variation give red cells on this slide), and at least ``min_threshold_factor``
   times the red cells' OD (so a clean, noise-free image does not get a threshold of zero) and
   ``min_threshold`` OD. Everything scales with the slide's stain: a paler or darker lab moves the
   threshold with it. ``threshold`` overrides it with a fixed value. The nuclear direction is the mean
   direction of the strongest residuals in the samples (nuclei, platelets); it falls back to the MGG
   nucleus made orthogonal to the red cells when there is too little stain, or when the measured one
   is more than 45 degrees away (a pen mark is not a nucleus).
4. **Objects.** Pixels above the threshold (the *core*: nuclei, granules) are closed with a disc of
   radius ``merge_um`` (the lobes of a segmented neutrophil become one object) and grown by ``grow_um``
   into the cytoplasm, with discs chosen so that the growth in um is the same at any pixel size.
   **Area is measured on this merged, grown object**, not on the core: a small lymphocyte's nucleus
   alone is ~25-40 um^2, below the 40 um^2 limit, while the grown object approximates the cell
   (``core_area_um2`` reports the core). Connected clusters longer than ``max_cluster_um`` (debris,
   streaks) are dropped whole. A cluster holding large cores at least ``split_gap_um`` apart (touching
   cells, each with its nucleus) is split between them, each pixel to the nearest; a cluster of round
   parts joined by a narrow neck is split along the power diagram of its edge-distance maxima. Objects
   of ``min_area_um2`` to ``max_area_um2``, longest side at most ``max_extent_um`` and at least
   ``min_core_um2`` of core are kept: platelets (2-3 um, ~5 um^2 of core) fall below.

Every operation has bounded support (:func:`required_halo_um`): segmenting a tile with that halo gives,
for the objects whose centroid lies in the tile's core, exactly the objects of the whole slide, however
the slide is tiled (beyond the slide's border every tile must see the same: clipped, or one constant).
Objects touching the tile's border are always dropped (they may be cut). Speed of a tile's whole
detection (:func:`pipeline._tile_maps.tile_maps`, segmentation and ring features), CPU time of one core
at 1 um/px, in Mpx/s of slide: 49-60 in 2048-px tiles (40-47 in 1024-px ones) on simulated monolayers,
15-16 on the BCCD photographs tiled edge to edge, a white cell every 46 x 35 um, where the per-object
work dominates (``python -m benchmarks.bench_detect_tile``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
import pandas as pd

from .errors import ParameterError
from .od import optical_density as od_against
from .od import optical_density_of

#: Red-cell OD direction used when a slide has too little stain to measure its own. Measured on real
#: smears: the median, over photographs, of the mean OD direction of each photograph's stained pixels
#: outside its white-cell boxes (middle half by density), on the tuning halves of PBC/CellaVision (MGG),
#: Raabin and BCD (txl-pbc-train) and BCCD, and every other chula-rbc field (``benchmarks/real_smears.py``
#: gives the splits): 99 % of the photographs lie within 18 degrees of it.
DEFAULT_RED_CELL_DIRECTION = (0.452, 0.746, 0.489)

#: Nuclear OD direction before a slide's own is measured: the same photographs, the densest 15 % of the
#: pixels in each white-cell box (99 % of the photographs within 19 degrees of it).
DEFAULT_NUCLEUS_DIRECTION = (0.466, 0.872, 0.149)

#: A single red cell's OD along its direction where a slide has too little stain to measure it: the
#: median over 8-photograph groups of the same tuning sets at 1 um/px (0.10-0.32 across them).
DEFAULT_RED_CELL_OD = 0.18

#: The measured nuclear direction replaces the default only within this angle of it (degrees; both made
#: orthogonal to the slide's red cells): a pen mark or dust dominating the samples must not redefine what
#: a nucleus is.
_MAX_NUCLEUS_ANGLE_DEG = 45.0

#: Pixels darker than this OD in every channel are not stain: black or unscanned areas, the field stop
#: of an eyepiece, label print. At 1 um/px no stained pixel of the four tuning sets has all three
#: channels above 0.3 OD (the darkest nuclei still pass half of the glass's blue light); black borders
#: of some Raabin photographs have 2.3.
NON_TISSUE_MIN_OD = 0.6

#: Usual ranges of a slide's estimate: 8-photograph groups of the four tuning sets at 1 um/px give
#: thresholds of 0.058-0.22 OD, red-cell OD 0.10-0.32 and red-cell directions within 15 degrees of
#: DEFAULT_RED_CELL_DIRECTION; these ranges are about twice as wide. Outside them the run still goes
#: on, with a warning: the estimate may have been misled (black areas, no red cells, another stain).
USUAL_THRESHOLD_OD = (0.03, 0.45)
USUAL_RED_CELL_OD = (0.05, 0.6)
USUAL_RED_CELL_ANGLE_DEG = 30.0

#: Pixel sizes accepted (um/px): an overview is 0.5-2 um/px; beyond this range mpp is surely wrong.
_MPP_RANGE = (0.05, 20.0)

#: Slide statistics use every STATS_STRIDE-th pixel of every STATS_STRIDE-th row of the samples.
STATS_STRIDE = 2

#: Columns of the object table, in order.
COLUMNS = (
    "x_px",
    "y_px",
    "area_um2",
    "extent_um",
    "y0",
    "x0",
    "y1",
    "x1",
    "core_area_um2",
    "nucleus_fraction",
    "n_lobes",
    "stain_mean",
    "stain_max",
    "od_mean",
    "od_max",
    "eccentricity",
)


@dataclass(frozen=True)
class SegmentParams:
    """Parameters of the overview segmentation (physical units; valid at any pixel size).

    Attributes
    ----------
    min_area_um2, max_area_um2
        Objects kept, by the area of the merged, grown object (um^2; 40 and 800, as Metafer).
    max_extent_um
        Longest side of a kept object's bounding box (um; 40).
    max_cluster_um
        Connected stained clusters whose bounding box is longer than this (um; 50), before touching
        cells are split, are dropped whole (clumps, debris, streaks). It bounds the halo.
    white_radius_um
        Half-side of the square window in which the local glass white is measured (um; 25). Glass must
        lie within this distance of every cell; 25 um spans a large white cell.
    white_floor
        The local white is kept at least this fraction of the slide's white (0.85; thick zones).
    threshold_factor
        Adaptive threshold = this factor (2.5) x the 75th percentile of the residual's length (OD vector
        less its red-cell component) on stained pixels, mostly red cells: their noise.
    min_threshold_factor
        ... and at least this fraction (0.35) of the red cells' median OD (a noise-free image).
    min_threshold
        ... and at least this OD (0.02; one 8-bit level of 200 is 0.002 OD).
    threshold
        A fixed stain-feature threshold (OD) overriding the adaptive one; ``None`` (default): adaptive.
    merge_um
        Radius of the closing that joins lobes and fragments of one cell (um; 2): gaps up to about
        twice this are bridged.
    grow_um
        Mean distance by which the merged core is grown into the cytoplasm (um; 1.5).
    min_core_um2
        Objects with less core (stain above threshold) than this (um^2; 12) are dropped: platelets
        (single or in pairs), debris. A small lymphocyte's nucleus is ~25-40 um^2.
    split_nucleus_um2, split_gap_um
        A cluster holding two or more cores at least ``split_nucleus_um2`` large (um^2; 20) and at
        least ``split_gap_um`` apart (um, edge to edge; 3.5) is split between them: touching cells, the
        cytoplasm of both between their nuclei. Closer cores are lobes of one cell (on the BCCD
        photographs the large lobes of single neutrophils and eosinophils lie 1-3.2 um apart at
        0.5-1 um/px) and stay together.
    split_radius_um, split_neck
        Shape split of touching cells whose core is one part: centres are maxima of the distance to the
        object's edge of at least ``split_radius_um`` (um; 3.5); two are kept apart when the neck
        between them is narrower than ``split_neck`` (0.75; 0 never splits) x the smaller one's
        diameter.
    """

    min_area_um2: float = 40.0
    max_area_um2: float = 800.0
    max_extent_um: float = 40.0
    max_cluster_um: float = 50.0
    white_radius_um: float = 25.0
    white_floor: float = 0.85
    threshold_factor: float = 2.5
    min_threshold_factor: float = 0.35
    min_threshold: float = 0.02
    threshold: float | None = None
    merge_um: float = 2.0
    grow_um: float = 1.5
    min_core_um2: float = 12.0
    split_nucleus_um2: float = 20.0
    split_gap_um: float = 3.5
    split_radius_um: float = 3.5
    split_neck: float = 0.75

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "threshold":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ParameterError(
                    f"segmentation parameter {f.name} must be a finite number, got {value!r}"
                )
        positive = (
            "min_area_um2",
            "max_area_um2",
            "max_extent_um",
            "max_cluster_um",
            "white_radius_um",
            "threshold_factor",
            "split_radius_um",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ParameterError(f"segmentation parameter {name} must be > 0, got {getattr(self, name)}")
        nonnegative = (
            "min_threshold_factor",
            "min_threshold",
            "merge_um",
            "grow_um",
            "min_core_um2",
            "split_nucleus_um2",
            "split_gap_um",
            "split_neck",
        )
        for name in nonnegative:
            if getattr(self, name) < 0:
                raise ParameterError(f"segmentation parameter {name} must be >= 0, got {getattr(self, name)}")
        if self.min_area_um2 >= self.max_area_um2:
            raise ParameterError(
                f"--min-area-um2 ({self.min_area_um2:g}) must be below --max-area-um2 ({self.max_area_um2:g})"
            )
        if not 0 < self.white_floor <= 1:
            raise ParameterError(
                f"segmentation parameter white_floor must be in (0, 1], got {self.white_floor}"
            )
        if self.threshold is not None and self.threshold <= 0:
            raise ParameterError(f"--threshold must be > 0 (OD), got {self.threshold}")


@dataclass(frozen=True)
class SlideStains:
    """Slide-level statistics, estimated once from sample windows (picklable; JSON via ``asdict``).

    Attributes
    ----------
    white_rgb
        The glass white of the slide (0-255 per channel).
    red_cell_direction
        Unit OD vector (R, G, B) of red cells on this slide.
    red_cell_level
        75th percentile of the stain feature on stained (red-cell) pixels (OD): their spread.
    threshold_od
        The stain-feature threshold used for this slide (OD).
    stained_fraction
        Fraction of the sampled pixels that carry any stain, black or unscanned pixels left out (0 on
        blank glass).
    red_cell_od
        Median OD length of stained pixels (mostly red cells), along ``red_cell_direction``: a single red
        cell's typical OD, the unit of the quality filter's density.
    nucleus_direction
        Unit OD direction, orthogonal to ``red_cell_direction``, of the stain of nuclei on this slide;
        ``None`` (older statistics) makes the stain feature the length of the whole residual.
    """

    white_rgb: tuple[float, float, float]
    red_cell_direction: tuple[float, float, float]
    red_cell_level: float
    threshold_od: float
    stained_fraction: float
    red_cell_od: float = 0.0
    nucleus_direction: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if len(self.white_rgb) != 3 or not all(0 < v <= 255 for v in self.white_rgb):
            raise ParameterError(f"slide white must be three levels in (0, 255], got {self.white_rgb}")
        e = np.asarray(self.red_cell_direction, dtype=float)
        if e.shape != (3,) or not np.isfinite(e).all() or np.linalg.norm(e) < 1e-6:
            raise ParameterError(
                f"red-cell direction must be a non-zero OD vector, got {self.red_cell_direction}"
            )
        if self.nucleus_direction is not None:
            n = np.asarray(self.nucleus_direction, dtype=float)
            if n.shape != (3,) or not np.isfinite(n).all() or np.linalg.norm(n) < 1e-6:
                raise ParameterError(
                    f"nucleus direction must be a non-zero OD vector, got {self.nucleus_direction}"
                )
        if not (math.isfinite(self.threshold_od) and self.threshold_od > 0):
            raise ParameterError(f"stain threshold must be > 0 (OD), got {self.threshold_od}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SlideStains:
        """Rebuild from ``dataclasses.asdict`` output (e.g. read back from JSON, where tuples are lists)."""
        known = {f.name for f in fields(cls)}
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
        return cls(**args)


# ------------------------------------------------------------------------------------- geometry
def _pixels(mpp: float, um: float) -> int:
    """A length in whole pixels, rounded up (at least 1)."""
    return max(1, math.ceil(um / mpp - 1e-9))


def _disc(radius_um: float, mpp: float) -> np.ndarray:
    """Structuring element that grows objects by ``radius_um`` on average, at any pixel size.

    Dilating a shape by a convex element adds its perimeter times the element's mean half-width
    (Steiner's formula): of the digital discs (pixels with x^2 + y^2 <= R^2), the one whose mean
    half-width (hull perimeter / 2 pi) is nearest to the radius in pixels. A rounded radius would grow
    objects by 1 px = 0.8 um at 0.8 um/px for 1.5 um asked; this grows them by 1.5 um.
    """
    return _disc_px(round(radius_um / mpp, 6))


@lru_cache(maxsize=64)
def _disc_px(radius_px: float) -> np.ndarray:
    if radius_px <= 0:
        return np.ones((1, 1), np.uint8)
    k = math.ceil(radius_px) + 1
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    d2 = xx * xx + yy * yy
    best, best_error = np.ones((1, 1), np.uint8), radius_px
    for r2 in np.unique(d2[(d2 > 0) & (d2 <= (radius_px + 1) ** 2)]):
        disc = (d2 <= r2).astype(np.uint8)
        hull = cv2.convexHull(np.argwhere(disc).astype(np.float32))
        error = abs(cv2.arcLength(hull, closed=True) / (2 * math.pi) - radius_px)
        if error < best_error:
            best, best_error = disc, error
    ys, xs = np.nonzero(best)
    return np.ascontiguousarray(best[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


def required_halo_um(params: SegmentParams, mpp: float = 2.0) -> float:
    """Context (um) a tile needs on each side for its core objects to equal the whole slide's.

    A pixel's stain depends on pixels up to ``white_radius_um`` away; the merged object on
    ``2 merge_um + grow_um`` more; an object owned by the core lies within ``max_cluster_um`` of its
    centroid, and the search for touching round cells looks ``split_radius_um`` further. Rounding to
    whole pixels (window sizes, 3 x 3 smoothing, connectivity) adds at most 8 px.

    Parameters
    ----------
    params
        Segmentation parameters.
    mpp
        Overview pixel size (um/px); the default, 2, covers every overview of 2 um/px or finer.
    """
    _check_mpp(mpp)
    reach_um = 2 * params.merge_um + params.grow_um + params.max_cluster_um + params.split_radius_um
    return params.white_radius_um + reach_um + 8 * mpp


def _check_mpp(mpp: float) -> None:
    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]):
        raise ParameterError(
            f"overview pixel size {mpp!r} um/px is outside {_MPP_RANGE[0]}-{_MPP_RANGE[1]}; "
            "check the slide's mpp or pass --mpp"
        )


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ParameterError(f"segmentation needs an (h, w, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    return np.ascontiguousarray(rgb)


# ------------------------------------------------------------------------------ optical density
def local_white(
    rgb: np.ndarray, mpp: float, params: SegmentParams, slide_white: Sequence[float] | None = None
) -> np.ndarray:
    """The local glass white ``(h, w, 3)`` uint8: per-channel maximum of the 3 x 3 mean over a window.

    With the slide's white it is kept between ``white_floor`` times it (thick zones, where no glass is
    near) and the slide's white itself (2 levels of noise above): the white fill beyond the slide's edge
    or over unscanned areas is not the glass, and would give the glass near it an optical density.
    Integer arithmetic throughout: the result at a pixel depends only on its neighbourhood, never on
    where a tile starts (a float running sum would).
    """
    rgb = _check_rgb(rgb)
    smooth = cv2.blur(rgb, (3, 3), borderType=cv2.BORDER_REPLICATE)
    r = _pixels(mpp, params.white_radius_um)
    if smooth.shape[0] * smooth.shape[1] >= 16:
        white = _box_max(smooth, r)
    else:  # OpenCV would read the small arrays of _box_max as scalars
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1))
        white = cv2.dilate(smooth, kernel, borderType=cv2.BORDER_REPLICATE)
    if slide_white is not None:
        slide = np.asarray(slide_white, np.float64)
        floor = np.clip(np.round(params.white_floor * slide), 1, 255)
        ceiling = np.clip(np.ceil(slide) + 2, 1, 255)
        if white.size > 4:
            cv2.max(white, (*(float(v) for v in floor), 0.0), dst=white)
            cv2.min(white, (*(float(v) for v in ceiling), 255.0), dst=white)
        else:  # OpenCV reads a one-pixel image as a scalar
            np.clip(white, floor.astype(np.uint8), ceiling.astype(np.uint8), out=white)
    return white


def _box_max(image: np.ndarray, r: int) -> np.ndarray:
    """Maximum over the (2r+1)^2 square around each pixel, the image's edge replicated outwards.

    ``cv2.dilate`` with a square, in maxima of shifted views whose window doubles each time (6 + 6
    passes for r = 25 instead of 51 + 51 comparisons a pixel), 256 rows of output at a time so that the
    passes stay in the processor's cache: 2.3 instead of 3.2 ms on a 1228-px tile, 9 instead of 11 on a
    2252-px one, the same values (a maximum is exact).
    """
    padded = cv2.copyMakeBorder(image, r, r, r, r, cv2.BORDER_REPLICATE)
    out = np.empty_like(image)
    for a in range(0, image.shape[0], 256):
        b = min(image.shape[0], a + 256)
        out[a:b] = _run_max(_run_max(padded[a : b + 2 * r], 2 * r + 1, axis=1), 2 * r + 1, axis=0)
    return out


def _run_max(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Maxima of ``n`` consecutive elements along ``axis`` (the windows that fit: n - 1 fewer)."""

    def shifted_max(cur: np.ndarray, d: int) -> np.ndarray:
        if axis == 1:
            return cv2.max(cur[:, :-d], cur[:, d:])
        return cv2.max(cur[:-d], cur[d:])

    span = 1
    while 2 * span <= n:  # windows of span, 2 span, 4 span, ...
        a = shifted_max(a, span)
        span *= 2
    return shifted_max(a, n - span) if n > span else a  # two overlapping windows cover n


def optical_density(
    rgb: np.ndarray, mpp: float, params: SegmentParams, stains: SlideStains | None = None
) -> np.ndarray:
    """Optical density ``(h, w, 3)`` float32 of an RGB overview against the local glass white.

    Parameters
    ----------
    rgb
        RGB uint8 image ``(h, w, 3)``.
    mpp
        Its pixel size, um/px.
    params
        Segmentation parameters (white window and floor).
    stains
        Slide statistics; with them the local white never drops below ``white_floor`` x the slide white.

    Returns
    -------
    numpy.ndarray
        ``-log10(I / I0)`` per channel, >= 0 (pixels brighter than their white count as glass).
    """
    _check_mpp(mpp)
    rgb = _check_rgb(rgb)
    return od_against(rgb, local_white(rgb, mpp, params, None if stains is None else stains.white_rgb))


def _unit(direction: Sequence[float]) -> np.ndarray:
    e = np.asarray(direction, dtype=np.float64)
    return e / np.linalg.norm(e)


def stain_feature(
    od: np.ndarray,
    direction: Sequence[float],
    nucleus_direction: Sequence[float] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The white-cell stain in OD: what is left of the OD vector once red cells are removed.

    Parameters
    ----------
    od
        Optical density ``(..., 3)``.
    direction
        The slide's red-cell OD direction (any length).
    nucleus_direction
        The slide's nuclear-stain direction orthogonal to it (:attr:`SlideStains.nucleus_direction`).
        With it, the feature is the OD's component along that direction (negative values read as 0):
        nuclei, granules and platelets are purple and count; residues of other hues, such as the colour
        shift where stacked red cells meet (the camera averages intensity, not OD), do not. Without it,
        the length of the whole residual.
    out
        A C-contiguous float32 array of the result's shape to write it into (a part of a larger
        image); only with ``nucleus_direction`` and an ``(h, w, 3)`` OD.

    Returns
    -------
    numpy.ndarray
        float32 ``(...)``: 0 for red cells however many are stacked, large for purple (and blue) stain.
    """
    od = np.asarray(od, dtype=np.float32)
    interleaved = od.ndim == 3 and od.shape[2] == 3
    if nucleus_direction is not None:
        w = _unit(nucleus_direction).astype(np.float32)
        if interleaved:
            if out is None:
                feature = cv2.transform(od, w[None]).reshape(od.shape[:2])
            else:
                feature = written_into(cv2.transform(od, w[None], dst=out), out)
            return clip_negative(feature)
        return np.maximum(od.reshape(-1, 3) @ w, 0.0).astype(np.float32).reshape(od.shape[:-1])
    if out is not None:
        raise ParameterError("stain_feature writes into out only along a nuclear direction")
    u, v = _residual_basis(tuple(float(c) for c in direction))
    if interleaved:
        a = cv2.transform(od, u[None])
        b = cv2.transform(od, v[None])
        return cv2.magnitude(a, b, a)
    flat = od.reshape(-1, 3)
    a = (flat @ u).astype(np.float32)
    b = (flat @ v).astype(np.float32)
    return np.hypot(a, b).reshape(od.shape[:-1])


def written_into(result: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out``, checked to be where OpenCV wrote ``result`` (it allocates anew when ``dst`` does not fit)."""
    if result is not out and not np.shares_memory(result, out):
        raise ParameterError("out must be a C-contiguous float32 array of the result's shape")
    return out


def clip_negative(values: np.ndarray) -> np.ndarray:
    """``values`` with negatives set to 0, in place (float32)."""
    if values.size > 4:
        return cv2.max(values, 0.0, dst=values)
    # OpenCV reads a scalar as four values on images of four pixels or fewer
    return np.maximum(values, 0.0, out=values)


@lru_cache(maxsize=64)
def _residual_basis(direction: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors orthogonal to ``direction`` and to each other (float32): the residual's plane.

    Cached: relocation asks for the slide's same direction once per cell, and ``np.cross`` costs as
    much as the pixel work on a cell's window.
    """
    e = _unit(direction)
    helper = np.eye(3)[int(np.argmin(np.abs(e)))]
    u = np.cross(e, helper)
    u /= np.linalg.norm(u)
    v = np.cross(e, u)
    u32, v32 = u.astype(np.float32), v.astype(np.float32)
    u32.flags.writeable = v32.flags.writeable = False  # shared between callers
    return u32, v32


def _orthogonal(vector: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """``vector`` without its component along ``direction``, unit length."""
    e = _unit(direction)
    v = np.asarray(vector, dtype=np.float64)
    return _unit(v - np.dot(v, e) * e)


# ----------------------------------------------------------------------------- slide statistics
def _glass_white(samples: Sequence[np.ndarray]) -> np.ndarray:
    pixels = np.concatenate([s.reshape(-1, 3) for s in samples])
    # Saturated pixels are padding outside the scanned area or clipped highlights, not glass.
    unsaturated = pixels[(pixels < 254).any(axis=1)]
    if len(unsaturated) > 100:
        pixels = unsaturated
    brightness = pixels.sum(axis=1, dtype=np.int32)
    bright = pixels[brightness >= np.percentile(brightness, 95)]
    return np.median(bright.astype(np.float32), axis=0)


def sample_optical_density(
    samples: Sequence[np.ndarray], mpp: float, params: SegmentParams
) -> tuple[tuple[float, float, float], list[np.ndarray]]:
    """The glass white of sample windows and each window's :func:`optical_density` against it.

    Parameters
    ----------
    samples
        RGB uint8 overview windows (see :func:`estimate_slide_stains`).
    mpp
        Their pixel size, um/px.
    params
        Segmentation parameters.

    Returns
    -------
    white_rgb, ods
        The slide's glass white, and ``(h, w, 3)`` float32 OD per window (the local white floored at
        ``white_floor`` times the slide's, as detection computes it).
    """
    _check_mpp(mpp)
    samples = [_check_rgb(s) for s in samples if np.asarray(s).size]
    if not samples:
        raise ParameterError("estimate_slide_stains needs at least one non-empty sample window")
    white = _glass_white([s[::STATS_STRIDE, ::STATS_STRIDE] for s in samples])
    white_rgb = (float(white[0]), float(white[1]), float(white[2]))
    floor_only = SlideStains(white_rgb, DEFAULT_RED_CELL_DIRECTION, 0.0, 1.0, 0.0)
    return white_rgb, [optical_density(s, mpp, params, floor_only) for s in samples]


def estimate_slide_stains(
    samples: Sequence[np.ndarray],
    mpp: float,
    params: SegmentParams,
    sample_od: tuple[tuple[float, float, float], list[np.ndarray]] | None = None,
) -> SlideStains:
    """Estimate the slide's white, red-cell colour and stain threshold from sample windows.

    Parameters
    ----------
    samples
        RGB uint8 overview windows from across the slide (fixed positions, independent of the tiling);
        a few mm^2 in all. Red cells must dominate the stained pixels, as they do in any smear.
    mpp
        Their pixel size, um/px (that of the tiles to segment).
    params
        Segmentation parameters.
    sample_od
        :func:`sample_optical_density` of the samples, when the caller has it already.

    Returns
    -------
    SlideStains
        On blank glass (nothing stained) the default red-cell direction and ``min_threshold``.
    """
    white_rgb, ods = sample_od if sample_od is not None else sample_optical_density(samples, mpp, params)
    # OD on whole windows (the local white needs their context), statistics on every other pixel
    # of every other row: neighbouring pixels are strongly correlated, and percentiles of a quarter
    # of them are the same to a few parts per thousand, at a quarter of the time.
    od = np.concatenate([o[::STATS_STRIDE, ::STATS_STRIDE].reshape(-1, 3) for o in ods])
    od = od[od.min(axis=1) < NON_TISSUE_MIN_OD]
    if len(od) == 0:  # nothing but black: measured like blank glass
        od = np.zeros((1, 3), np.float32)
    total = od.sum(axis=1)
    stained = total > 0.1
    fraction = float(stained.mean())
    if stained.sum() > 200:
        # Red cells cover far more of a smear than white cells, so the middle half of stained pixels by
        # density is red cells: their mean is the direction (a per-channel median would be quantised to
        # 8-bit levels).
        od_stained, total_stained = od[stained], total[stained]
        lo, hi = np.percentile(total_stained, [25, 75])
        direction = _unit(od_stained[(total_stained >= lo) & (total_stained <= hi)].mean(axis=0))
        level = float(np.percentile(stain_feature(od_stained, direction), 75))
        red_cell_od = float(np.median(od_stained @ direction))
    else:  # blank glass: nothing to measure
        direction = _unit(DEFAULT_RED_CELL_DIRECTION)
        level, red_cell_od = 0.0, 0.0
    if params.threshold is not None:
        threshold = params.threshold
    else:
        threshold = max(
            params.threshold_factor * level, params.min_threshold_factor * red_cell_od, params.min_threshold
        )
        threshold = threshold if threshold > 0 else 0.02  # min_threshold 0 on blank glass
    nucleus = _nucleus_direction(od, direction, threshold, mpp * STATS_STRIDE)
    return SlideStains(
        white_rgb,
        _triple(direction),
        level,
        float(threshold),
        fraction,
        red_cell_od,
        _triple(nucleus),
    )


def stain_warnings(stains: SlideStains) -> list[str]:
    """What is unusual about a slide's estimate (empty when it lies in the usual ranges), one line each."""
    if stains.stained_fraction == 0:
        return ["no stain in the sample windows: the slide looks like blank glass"]
    out = []
    lo, hi = USUAL_THRESHOLD_OD
    if not lo <= stains.threshold_od <= hi:
        out.append(
            f"stain threshold {stains.threshold_od:.3f} OD is outside the usual {lo}-{hi}: white cells may "
            "be missed or red cells taken for them; check the overview picture"
        )
    lo, hi = USUAL_RED_CELL_OD
    if stains.red_cell_od > 0 and not lo <= stains.red_cell_od <= hi:
        out.append(f"red cells measure {stains.red_cell_od:.3f} OD, outside the usual {lo}-{hi}")
    angle = _angle_deg(stains.red_cell_direction, DEFAULT_RED_CELL_DIRECTION)
    if angle > USUAL_RED_CELL_ANGLE_DEG:
        rgb = ", ".join(f"{v:.2f}" for v in stains.red_cell_direction)
        out.append(
            f"the red-cell colour (OD direction {rgb}) is {angle:.0f} degrees from that of the usual "
            "Romanowsky stains: another stain, or the samples caught something other than red cells"
        )
    return out


def _angle_deg(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.degrees(np.arccos(np.clip(_unit(a) @ _unit(b), -1.0, 1.0))))


def _triple(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _nucleus_direction(od: np.ndarray, red: np.ndarray, threshold: float, mpp: float) -> np.ndarray:
    """Mean direction of the strong non-red residuals (nuclei, platelets), near the default one."""
    prior = _orthogonal(DEFAULT_NUCLEUS_DIRECTION, red)
    red32 = red.astype(np.float32)
    residual = od - (od @ red32)[:, None] * red32
    length = np.sqrt(np.einsum("ij,ij->i", residual, residual))
    strong = residual[length > threshold]
    # at least ~50 um^2 of stain, pointing one way (not noise in all directions)
    if len(strong) * mpp * mpp < 50.0:
        return prior
    total = strong.sum(axis=0)
    if np.linalg.norm(total) < 0.5 * length[length > threshold].sum():
        return prior
    measured = _orthogonal(total, red)
    if _angle_deg(measured, prior) > _MAX_NUCLEUS_ANGLE_DEG:
        return prior
    return measured


# ---------------------------------------------------------------------------------- segmentation
@dataclass
class _Clusters:
    """Connected clusters of the merged stain and the stained cores inside them (one tile)."""

    labels: np.ndarray  # int32 (h, w), 0 background; grows new labels when clusters are split
    n: int  # number of labels incl. the background
    boxes: np.ndarray  # (n_clusters, 4) x, y, width, height of the original clusters
    area_px: np.ndarray  # per original cluster
    valid: np.ndarray  # per original cluster: can hold a kept object
    core_labels: np.ndarray  # int32 (h, w): connected cores
    core_area_px: np.ndarray  # per core
    core_owner: np.ndarray  # per core: the cluster holding it


def segment(
    rgb: np.ndarray,
    mpp: float,
    stains: SlideStains,
    params: SegmentParams,
    od: np.ndarray | None = None,
    *,
    feature: np.ndarray | None = None,
    white: np.ndarray | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Segment white cells in an overview tile.

    Parameters
    ----------
    rgb
        RGB uint8 overview tile ``(h, w, 3)``, with its halo.
    mpp
        Pixel size, um/px.
    stains
        The slide's statistics (:func:`estimate_slide_stains`).
    params
        Segmentation parameters.
    od
        The tile's :func:`optical_density`, when the caller has it already.
    feature, white
        The tile's :func:`stain_feature` and :func:`local_white`, when the caller has them already
        (together, instead of ``od``): the OD is then computed only at the pixels of the objects.

    Returns
    -------
    labels : numpy.ndarray
        int32 ``(h, w)``: 0 background, k > 0 the kept objects (numbered 1..n in table order).
    objects : pandas.DataFrame
        One row per kept object, ordered by centroid (y, then x): ``x_px, y_px`` (centroid in continuous
        tile coordinates: pixel i spans [i, i+1)); ``area_um2`` (merged, grown object); ``extent_um``
        (longest bounding-box side); ``y0, x0, y1, x1`` (bounding box, tile px, half-open);
        ``core_area_um2`` (stain above threshold) and ``nucleus_fraction`` (its share of the object);
        ``n_lobes`` (separate cores merged into the object: lobes, fragments); ``stain_mean``,
        ``stain_max`` (stain feature, OD); ``od_mean``, ``od_max`` (OD averaged over R, G, B);
        ``eccentricity`` (0 for a disc, -> 1 for a line).
    """
    _check_mpp(mpp)
    rgb = _check_rgb(rgb)
    if feature is not None:
        if white is None or feature.shape != rgb.shape[:2] or white.shape != rgb.shape:
            raise ParameterError("segment needs a feature and a white of the image's shape together")
        pixels_od = _PixelOD(rgb, white)
    else:
        if od is None:
            od = optical_density(rgb, mpp, params, stains)
        elif od.shape != rgb.shape:
            raise ParameterError(f"od of shape {od.shape} does not match the image {rgb.shape}")
        feature = stain_feature(od, stains.red_cell_direction, stains.nucleus_direction)
        pixels_od = _PixelOD(od=od)
    core = np.greater(feature, np.float32(stains.threshold_od)).view(np.uint8)
    merged = _merge_lobes(core, mpp, params)
    clusters = _clusters(core, merged, mpp, params)
    split = _split_touching(clusters, mpp, params)
    _split_by_shape(clusters, clusters.valid & ~split, merged, mpp, params)
    return _measure(clusters, merged, core, feature, pixels_od, mpp, params)


class _PixelOD:
    """The OD at chosen pixels: taken from the tile's OD, or computed from the image and its white."""

    def __init__(
        self, rgb: np.ndarray | None = None, white: np.ndarray | None = None, od: np.ndarray | None = None
    ) -> None:
        self.rgb, self.white, self.od = rgb, white, od

    def take(self, idx: np.ndarray) -> np.ndarray:
        """``(len(idx), 3)`` float32 OD at the flat pixel indices ``idx``."""
        if self.od is not None:
            return np.take(self.od.reshape(-1, 3), idx, axis=0)
        assert self.rgb is not None and self.white is not None
        level = np.take(self.rgb.reshape(-1, 3), idx, axis=0)
        white = np.take(self.white.reshape(-1, 3), idx, axis=0)
        return optical_density_of(level, white)  # the values of the whole tile's OD there


def _merge_lobes(core: np.ndarray, mpp: float, params: SegmentParams) -> np.ndarray:
    """Close the core by ``merge_um`` (joins lobes) and grow it by ``grow_um`` (into the cytoplasm)."""
    merged = core
    merge = _disc(params.merge_um, mpp)
    if merge.size > 1:
        merged = cv2.morphologyEx(core, cv2.MORPH_CLOSE, merge, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    grow = _disc(params.grow_um, mpp)
    if grow.size > 1:
        merged = cv2.dilate(merged, grow, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return merged


def _clusters(core: np.ndarray, merged: np.ndarray, mpp: float, params: SegmentParams) -> _Clusters:
    """Label clusters and cores; mark the clusters that can hold no kept object.

    A cluster touching the tile border may be cut; with the halo of :func:`required_halo_um` a cut
    cluster owned by the core would be longer than ``max_cluster_um``, and that one is dropped on the
    whole slide too. Splitting only shrinks objects, so a cluster below ``min_area_um2`` stays below.
    """
    # Areas and boxes from the stained pixels (about 1 % of a tile) rather than OpenCV's statistics,
    # a second pass over the whole tile. A bool view: numpy finds the non-zero elements of a bool array
    # ~10x faster than those of a uint8 one.
    n, labels = cv2.connectedComponentsWithAlgorithm(merged, 8, cv2.CV_32S, cv2.CCL_BBDT)
    h, w = merged.shape
    stained = np.flatnonzero(merged.view(bool))
    owner = labels.ravel()[stained]
    area = np.bincount(owner, minlength=n).astype(np.int64)
    area[0] = merged.size - len(stained)
    ys, xs = np.divmod(stained, w)
    lo_y, hi_y, lo_x, hi_x = (np.full(n, v, np.int64) for v in (h, -1, w, -1))
    np.minimum.at(lo_y, owner, ys)
    np.maximum.at(hi_y, owner, ys)
    np.minimum.at(lo_x, owner, xs)
    np.maximum.at(hi_x, owner, xs)
    lo_y[0], hi_y[0], lo_x[0], hi_x[0] = 0, h - 1, 0, w - 1  # the background: the whole tile
    x0, y0, bw, bh = lo_x, lo_y, hi_x - lo_x + 1, hi_y - lo_y + 1
    boxes = np.stack([x0, y0, bw, bh], axis=1)
    touches = (x0 == 0) | (y0 == 0) | (x0 + bw == w) | (y0 + bh == h)
    valid = (
        ~touches
        & (np.maximum(bw, bh) * mpp <= params.max_cluster_um)
        & (area * mpp * mpp >= params.min_area_um2)
    )
    valid[0] = False
    # Cores need only their area: counted from their pixels, which are gathered anyway.
    n_core, core_labels = cv2.connectedComponentsWithAlgorithm(core, 8, cv2.CV_32S, cv2.CCL_BBDT)
    core_idx = np.flatnonzero(core.view(bool))
    parts = core_labels.ravel()[core_idx]
    core_area = np.bincount(parts, minlength=n_core).astype(np.int64)
    core_area[0] = core.size - len(core_idx)
    core_owner = np.zeros(n_core, dtype=np.int64)
    core_owner[parts] = labels.ravel()[core_idx]
    return _Clusters(labels, n, boxes, area, valid, core_labels, core_area, core_owner)


def _slices(box: np.ndarray) -> tuple[slice, slice]:
    x, y, w, h = (int(v) for v in box)
    return slice(y, y + h), slice(x, x + w)


def _split_touching(c: _Clusters, mpp: float, params: SegmentParams) -> np.ndarray:
    """Split clusters holding large cores far apart, each pixel to its nearest group of cores (in place).

    Large cores closer than ``split_gap_um`` form one group (lobes of one cell). Returns, per original
    cluster, whether it was split.
    """
    split = np.zeros(len(c.valid), dtype=bool)
    big = np.flatnonzero(c.core_area_px * mpp * mpp >= params.split_nucleus_um2)
    big = big[(big > 0) & c.valid[c.core_owner[big]]]
    objects, counts = np.unique(c.core_owner[big], return_counts=True)
    for obj in objects[counts >= 2]:
        box = _slices(c.boxes[obj])
        parts = big[c.core_owner[big] == obj]
        cores = c.core_labels[box]
        distances = np.stack(
            [
                cv2.distanceTransform((cores != p).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
                for p in parts
            ]
        )
        group = _group_by_gap(distances, cores, parts, params.split_gap_um / mpp)
        if group.max() == 0:
            continue
        # distance of every pixel to the nearest core of each group
        nearest = np.argmin(
            np.stack([distances[group == g].min(axis=0) for g in range(int(group.max()) + 1)]), axis=0
        )
        region = c.labels[box] == obj
        sub = c.labels[box]
        for g in range(1, int(group.max()) + 1):
            sub[region & (nearest == g)] = c.n
            c.n += 1
        split[obj] = True
    return split


def _group_by_gap(distances: np.ndarray, cores: np.ndarray, parts: np.ndarray, gap_px: float) -> np.ndarray:
    """Group index (0..k-1) of each part: parts whose edge-to-edge gap is below ``gap_px`` share one.

    ``distances[i]`` is the distance of every pixel to part ``i``; the gap between parts i and j is that
    distance at j's nearest pixel, less the one pixel that separates touching pixels.
    """
    n = len(parts)
    close = (
        (i, j)
        for i in range(n)
        for j in range(i + 1, n)
        if distances[i][cores == parts[j]].min() - 1.0 < gap_px
    )
    return _groups(n, close)


def _groups(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Group index (0..k-1) of each of ``n`` items, items joined by ``pairs`` sharing one (union-find,
    unions in the order given; groups numbered by their root)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(j)] = find(i)
    roots = sorted({find(i) for i in range(n)})
    return np.array([roots.index(find(i)) for i in range(n)], dtype=np.int64)


def _split_by_shape(
    c: _Clusters, candidates: np.ndarray, merged: np.ndarray, mpp: float, params: SegmentParams
) -> None:
    """Split clusters of round cells joined by a narrow neck (power diagram of the edge-distance maxima).

    Only clusters with maxima of the distance to their edge (at least ``split_radius_um``) more than
    the peak spacing apart are examined one by one; distance and maxima are computed once per tile.
    """
    min_radius = params.split_radius_um / mpp
    spacing = max(1, round(min_radius))
    # two cells of the smallest splittable size: anything smaller is one cell
    big = candidates & (c.area_px * mpp * mpp >= 2 * math.pi * params.split_radius_um**2)
    if not big.any():
        return
    big = np.r_[big, np.zeros(c.n - len(big), dtype=bool)]  # parts of split clusters are never examined
    # The edge distance of a whole (unsplit) cluster is its distance to the nearest unstained pixel.
    dist = cv2.distanceTransform(merged, cv2.DIST_L2, 5)
    # Maxima on the distance quantised to 1/4 px: a monotone map, so they include the exact ones.
    quarter = cv2.convertScaleAbs(dist, alpha=4.0)
    peak = (quarter >= math.floor(4 * min_radius)) & (quarter >= cv2.dilate(quarter, _square(spacing)))
    where = np.flatnonzero(peak)
    lab = c.labels.ravel()[where]
    on_big = big[lab]
    where, lab = where[on_big], lab[on_big]
    if len(where) < 2:
        return
    ys, xs = np.divmod(where, merged.shape[1])
    lo_y, hi_y, lo_x, hi_x = (np.full(len(big), v, np.int64) for v in (1 << 40, -1, 1 << 40, -1))
    np.minimum.at(lo_y, lab, ys)
    np.maximum.at(hi_y, lab, ys)
    np.minimum.at(lo_x, lab, xs)
    np.maximum.at(hi_x, lab, xs)
    # two maxima are kept only if they are more than ``spacing`` apart (Chebyshev)
    examine = np.flatnonzero(big & (np.maximum(hi_y - lo_y, hi_x - lo_x) > spacing))
    if len(examine) == 0:
        return
    for obj in examine:
        box = _slices(c.boxes[obj])
        padded = _pad1((c.labels[box] == obj).view(np.uint8)).view(bool)
        d = _pad1(dist[box]) * padded
        peaks = _spaced_maxima(d, spacing, min_radius)
        if len(peaks) < 2:
            continue
        parts = _power_cells(padded, d, peaks)
        parts = _merge_wide_necks(parts, d, peaks, params.split_neck)
        sub = c.labels[box]
        inner = parts[1:-1, 1:-1]
        for k in range(2, int(parts.max()) + 1):
            sub[inner == k] = c.n
            c.n += 1


def _power_cells(mask: np.ndarray, d: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Each pixel of ``mask`` to the peak of least power distance |p - c|^2 - r^2 (r: the peak's edge
    distance), labels 1..k, 0 outside. For two overlapping discs the border is the chord through
    their intersections, where a watershed of the edge distance also puts it."""
    ys, xs = np.nonzero(mask)
    cy, cx = peaks[:, 0].astype(np.float64), peaks[:, 1].astype(np.float64)
    r2 = d[peaks[:, 0], peaks[:, 1]].astype(np.float64) ** 2
    power = (ys[:, None] - cy) ** 2 + (xs[:, None] - cx) ** 2 - r2
    parts = np.zeros(mask.shape, np.int32)
    parts[ys, xs] = np.argmin(power, axis=1) + 1
    return parts


def _pad1(a: np.ndarray) -> np.ndarray:
    """``a`` with a one-pixel frame of zeros."""
    out = np.zeros((a.shape[0] + 2, a.shape[1] + 2), a.dtype)
    out[1:-1, 1:-1] = a
    return out


def _spaced_maxima(d: np.ndarray, spacing: int, min_value: float) -> np.ndarray:
    """Local maxima of ``d`` (over a square of half-side ``spacing``) of at least ``min_value``, highest
    first, each more than ``spacing`` px (Chebyshev) from every higher one kept: ``(k, 2)`` as y, x.

    The rule of ``skimage.feature.peak_local_max(d, min_distance=spacing, threshold_abs=min_value)``
    for the small windows used here, without its overhead.
    """
    is_max = (d >= cv2.dilate(d, _square(spacing))) & (d >= min_value)
    ys, xs = np.nonzero(is_max)
    order = np.lexsort((xs, ys, -d[ys, xs]))
    kept: list[tuple[int, int]] = []
    for y, x in zip(ys[order].tolist(), xs[order].tolist(), strict=True):
        if all(max(abs(y - ky), abs(x - kx)) > spacing for ky, kx in kept):
            kept.append((y, x))
    return np.array(kept, dtype=np.int64).reshape(-1, 2)


def _square(radius_px: int) -> np.ndarray:
    return np.ones((2 * radius_px + 1, 2 * radius_px + 1), np.uint8)


def _merge_wide_necks(
    parts: np.ndarray, dist: np.ndarray, peaks: np.ndarray, neck_ratio: float
) -> np.ndarray:
    """Merge regions whose shared border is not narrower than ``neck_ratio`` x the smaller
    region's diameter (twice its peak distance); relabel 1..k."""
    radius = {k + 1: float(dist[y, x]) for k, (y, x) in enumerate(peaks)}
    # Border pixels between regions a and b: 4-neighbours with different non-zero labels.
    pairs = []
    for a, b in ((parts[:, :-1], parts[:, 1:]), (parts[:-1, :], parts[1:, :])):
        diff = (a != b) & (a > 0) & (b > 0)
        u, v = a[diff].astype(np.int64), b[diff].astype(np.int64)
        pairs.append(np.minimum(u, v) << 32 | np.maximum(u, v))
    # Border length per pair of regions, pairs in increasing order (the order unions are made in).
    keys, lengths = np.unique(np.concatenate(pairs), return_counts=True)
    necks = zip((keys >> 32).tolist(), (keys & 0xFFFFFFFF).tolist(), lengths.tolist(), strict=True)
    wide = ((a - 1, b - 1) for a, b, length in necks if length >= neck_ratio * 2 * min(radius[a], radius[b]))
    group = _groups(len(radius), wide)
    relabel = np.zeros(int(parts.max()) + 1, np.int32)
    relabel[1 : len(radius) + 1] = group + 1
    return relabel[parts]


# ------------------------------------------------------------------------------------ measuring
def _measure(
    c: _Clusters,
    merged: np.ndarray,
    core: np.ndarray,
    feature: np.ndarray,
    od: _PixelOD,
    mpp: float,
    params: SegmentParams,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Features of every candidate object from one pass over its pixels; filter; number the kept ones."""
    h, w = merged.shape
    valid = np.r_[c.valid, np.ones(c.n - len(c.valid), dtype=bool)]  # split parts are new labels
    idx = np.flatnonzero(merged.view(bool))
    lab = c.labels.ravel()[idx]
    on_valid = valid[lab]
    idx, lab = idx[on_valid], lab[on_valid]
    out = np.zeros(h * w, dtype=np.int32)
    if len(idx) == 0:
        return out.reshape(h, w), _empty_table()
    # Compact numbering of the candidate objects, without sorting the pixels.
    ids = np.flatnonzero(np.bincount(lab, minlength=c.n))
    compact = np.zeros(c.n, dtype=np.int64)
    compact[ids] = np.arange(len(ids))
    k = compact[lab]
    m = len(ids)

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(k, weights=values, minlength=m)

    def extreme(ufunc: np.ufunc, values: np.ndarray, start: float) -> np.ndarray:
        result = np.full(m, start, dtype=values.dtype)
        ufunc.at(result, k, values)
        return result

    npx = np.bincount(k, minlength=m).astype(np.float64)
    ys, xs = np.divmod(idx, w)
    y0, y1 = extreme(np.minimum, ys, h), extreme(np.maximum, ys, -1) + 1
    x0, x1 = extreme(np.minimum, xs, w), extreme(np.maximum, xs, -1) + 1
    # Moments of pixel offsets from the object's own corner: small integers, so the sums are exact and
    # the same whatever tile the object lies in.
    dx, dy = (xs - x0[k]).astype(np.float64), (ys - y0[k]).astype(np.float64)
    mx, my = total(dx) / npx, total(dy) / npx
    # Second moments about the centroid (px^2; + 1/12 for the pixel's own extent): equivalent ellipse.
    mxx = np.maximum(total(dx * dx) / npx - mx * mx, 0.0) + 1.0 / 12.0
    myy = np.maximum(total(dy * dy) / npx - my * my, 0.0) + 1.0 / 12.0
    mxy = total(dx * dy) / npx - mx * my
    root = np.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
    major, minor = (mxx + myy) / 2 + root, np.maximum((mxx + myy) / 2 - root, 0.0)
    eccentricity = np.sqrt(np.clip(1.0 - minor / np.maximum(major, 1e-12), 0.0, 1.0))
    core_px = total(core.ravel()[idx].astype(np.float64))
    stain = np.take(feature.ravel(), idx)
    grey = od.take(idx) @ np.full(3, 1.0 / 3.0, dtype=np.float32)
    area_um2 = npx * mpp * mpp
    extent_um = np.maximum(x1 - x0, y1 - y0) * mpp
    core_um2 = core_px * mpp * mpp
    keep = (
        (core_um2 >= params.min_core_um2)
        & (area_um2 >= params.min_area_um2)
        & (area_um2 <= params.max_area_um2)
        & (extent_um <= params.max_extent_um)
    )
    columns = {
        "x_px": x0 + mx + 0.5,
        "y_px": y0 + my + 0.5,
        "area_um2": area_um2,
        "extent_um": extent_um.astype(np.float64),
        "y0": y0.astype(np.int64),
        "x0": x0.astype(np.int64),
        "y1": y1.astype(np.int64),
        "x1": x1.astype(np.int64),
        "core_area_um2": core_um2,
        "nucleus_fraction": core_px / npx,
        "n_lobes": _lobes(k, c.core_labels.ravel()[idx], m),
        "stain_mean": total(stain.astype(np.float64)) / npx,
        "stain_max": extreme(np.maximum, stain, 0.0).astype(np.float64),
        "od_mean": total(grey.astype(np.float64)) / npx,
        "od_max": extreme(np.maximum, grey, 0.0).astype(np.float64),
        "eccentricity": eccentricity,
    }
    # Table order by centroid, so that it does not depend on the labelling order of the tile. Rows are
    # chosen on the arrays and the table built once: pandas' boolean and positional indexing of a
    # frame cost more than all of this arithmetic.
    kept = np.flatnonzero(keep)
    rows = kept[np.lexsort((columns["x_px"][kept], columns["y_px"][kept]))]
    table = pd.DataFrame({name: columns[name][rows] for name in COLUMNS}, columns=list(COLUMNS))
    number = np.zeros(m, dtype=np.int32)
    number[rows] = np.arange(1, len(rows) + 1, dtype=np.int32)
    out[idx] = number[k]
    return out.reshape(h, w), table


def _lobes(k: np.ndarray, parts: np.ndarray, m: int) -> np.ndarray:
    """Number of distinct cores (``parts`` > 0) per object ``k`` (0..m-1)."""
    inside = parts > 0
    pairs = np.unique(k[inside].astype(np.int64) << 32 | parts[inside].astype(np.int64))
    return np.bincount(pairs >> 32, minlength=m).astype(np.int64)


def _empty_table() -> pd.DataFrame:
    dtypes = {c: np.int64 if c in ("y0", "x0", "y1", "x1", "n_lobes") else np.float64 for c in COLUMNS}
    return pd.DataFrame({c: np.zeros(0, dtype=t) for c, t in dtypes.items()})
