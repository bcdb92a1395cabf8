"""Relocation, the 40x pass: re-centre each cell at full resolution, measure its focus, cut its crop.

For every candidate that passed the overview quality filter, read the finest level around it, find
the cell's nucleus (all lobes together) near the overview position, move the centre to it, and estimate
the edge blur of the nucleus in um (a Gaussian sigma). Crops are then resampled to the gallery geometry
(default 25 x 25 um at 288 x 288 px, 11.52 px/um, as in MLL23) and padded with white where the window
leaves the slide, which is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pandas as pd

from .errors import ParameterError
from .od import od_lut as white_lut
from .segment import SlideStains, stain_feature

_SQRT_2PI = math.sqrt(2.0 * math.pi)
#: Pre-smoothing of the optical density before thresholding, px (removes pixel noise).
_PRE_SMOOTH_PX = 1.0
#: The two smoothing scales (px) of the blur estimate, and the largest blur it reports (um).
_BLUR_SCALES_PX = (1.0, 2.0)
_MAX_BLUR_UM = 5.0
#: Context around a nucleus for the blur estimate, px: two 7 x 7 dilations (6 px), the larger Gaussian's
#: kernel radius (8 px at sigma 2) and the Sobel (1 px).
_BLUR_MARGIN_PX = 16


@dataclass(frozen=True)
class CropParams:
    """Geometry of the gallery crops and of the re-centring search.

    Attributes
    ----------
    crop_um
        Side of the square crop in um (MLL23: 25).
    crop_px
        Side of the crop in pixels (MLL23: 288, i.e. 11.52 px/um).
    search_um
        How far the full-resolution centre may move from the overview centre.
    merge_um
        Nucleus lobes closer than this are one nucleus when re-centring.
    """

    crop_um: float = 25.0
    crop_px: int = 288
    search_um: float = 6.0
    merge_um: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.crop_um) and 2.0 <= self.crop_um <= 500.0):
            raise ParameterError(f"--crop-um must be between 2 and 500 um, got {self.crop_um}")
        if not 8 <= int(self.crop_px) <= 4096:
            raise ParameterError(f"--crop-px must be between 8 and 4096, got {self.crop_px}")
        if self.search_um < 0 or self.merge_um < 0:
            raise ParameterError("search_um and merge_um must be >= 0")

    @property
    def crop_mpp(self) -> float:
        """Pixel size of the crops, um/px."""
        return self.crop_um / self.crop_px

    def as_dict(self) -> dict[str, float]:
        """The parameters as a JSON-safe dict."""
        return asdict(self)


@dataclass(frozen=True)
class Refined:
    """Result of re-centring one cell: offset of the new centre (um) and the nucleus's edge blur."""

    dx_um: float
    dy_um: float
    blur_um: float
    found: bool


def refine_centre(
    window_rgb: np.ndarray,
    mpp: float,
    centre_xy: tuple[float, float],
    stains: SlideStains,
    params: CropParams,
    od_lut: np.ndarray | None = None,
) -> Refined:
    """Re-centre a cell on its nucleus in a full-resolution window and estimate its blur.

    Parameters
    ----------
    window_rgb
        RGB uint8 window around the cell at the finest level.
    mpp
        Pixel size of the window, um/px.
    centre_xy
        The overview centre in window pixels (continuous coordinates).
    stains
        The slide's statistics (:class:`pipeline.segment.SlideStains`): its glass white, red-cell
        direction and stain threshold. Pixels whose OD, red-cell component removed, exceeds the
        threshold are white-cell stain.
    params
        Search radius and lobe merge distance.
    od_lut
        :func:`pipeline.od.od_lut` of the slide's white, when the caller has it (the same for every cell).

    Returns
    -------
    Refined
        ``found`` is false (and the offset zero) when no nucleus lies within the search radius.
    """
    window_rgb = np.ascontiguousarray(window_rgb, dtype=np.uint8)
    refined = _refine(window_rgb, mpp, centre_xy, stains, params, od_lut, 0, window_rgb.shape[:2], False)
    assert refined is not None  # only a part of the search window can leave the answer open
    return refined


def refine_centre_at(
    read_window: Callable[[int, int, int], np.ndarray],
    x_px: float,
    y_px: float,
    mpp: float,
    stains: SlideStains,
    params: CropParams,
    od_lut: np.ndarray | None = None,
) -> Refined:
    """:func:`refine_centre` in the search window around a level-0 position, reading less where it can.

    The search window holds the largest nucleus anywhere in the search radius. Most nuclei are smaller,
    so a window of :data:`FIRST_WINDOW_HALF_UM` is tried first; its answer is kept only where it cannot
    differ from the whole window's, bit for bit: the search box and the chosen nucleus, with the margin
    every filter reaches (:func:`_exact_margins_px`), lie inside it. Otherwise the whole window is read.

    Parameters
    ----------
    read_window
        ``read_window(x0, y0, size)``: the RGB uint8 level-0 square of ``size`` px at ``(x0, y0)``.
    x_px, y_px
        The overview centre in level-0 pixels (continuous coordinates).
    mpp, stains, params, od_lut
        As for :func:`refine_centre`.

    Returns
    -------
    Refined
        What :func:`refine_centre` returns on the whole search window.
    """
    first_half, half = search_windows_half_px(mpp, params)
    wx0, wy0 = math.floor(x_px) - half, math.floor(y_px) - half
    centre = (x_px - wx0, y_px - wy0)
    if first_half < half:
        k = half - first_half  # the first window's corner in the whole window
        first = np.ascontiguousarray(read_window(wx0 + k, wy0 + k, 2 * first_half), dtype=np.uint8)
        refined = _refine(first, mpp, centre, stains, params, od_lut, k, (2 * half, 2 * half), True)
        if refined is not None:
            return refined
    window = np.ascontiguousarray(read_window(wx0, wy0, 2 * half), dtype=np.uint8)
    return refine_centre(window, mpp, centre, stains, params, od_lut)


#: Half-side of the window :func:`refine_centre_at` tries first, um: at 0.25 um/px, a nucleus up to
#: about 10 um across within 5 um of the overview centre fits with its margins (5.7 % of the cells of
#: a simulated MLL23 slide did not).
FIRST_WINDOW_HALF_UM = 16.0


def search_windows_half_px(mpp: float, params: CropParams) -> tuple[int, int]:
    """Half-sides (px) of the window :func:`refine_centre_at` reads first and of the whole search window.

    Both are centred on the overview position; the first is never larger than the whole.
    """
    half = math.ceil(search_window_half_um(params) / mpp)
    search_edge, _ = _exact_margins_px(mpp, params)
    # The search box reaches up to 3 px past the radius (pixel edges and the centre's fraction).
    first = max(math.ceil(FIRST_WINDOW_HALF_UM / mpp), math.ceil(params.search_um / mpp) + 3 + search_edge)
    return min(first, half), half


def _exact_margins_px(mpp: float, params: CropParams) -> tuple[int, int]:
    """How far inside a part of the search window its search box and its nucleus must stay, px.

    Returns ``(search, nucleus)``. The nucleus mask at a pixel depends on the pixels within the
    pre-smoothing Gaussian's radius (OpenCV's kernel for float images: 4 sigma) plus twice the
    closing's radius; the nucleus also needs its 8-connected outline and the blur estimate's margin.
    """
    merge_px = max(1, round(params.merge_um / mpp))
    search = math.ceil(4 * _PRE_SMOOTH_PX) + 2 * merge_px + 1
    return search, max(search + 1, _BLUR_MARGIN_PX + 1)


def _refine(
    window_rgb: np.ndarray,
    mpp: float,
    centre_xy: tuple[float, float],
    stains: SlideStains,
    params: CropParams,
    od_lut: np.ndarray | None,
    offset_px: int,
    search_shape: tuple[int, int],
    part: bool,
) -> Refined | None:
    """:func:`refine_centre` on ``window_rgb``, which starts ``offset_px`` down and right of the corner
    of the search window (``search_shape``); ``centre_xy`` and all arithmetic are in the search
    window's pixels, so the result is the same to the bit. With ``part``, ``None`` where the answer
    could differ from the whole search window's."""
    lut = white_lut(stains.white_rgb) if od_lut is None else od_lut
    od = cv2.LUT(window_rgb, lut)
    # The residual's whole length, not only its nuclear component: the nucleus's blue-violet rim counts,
    # which centres better (median centring error 0.26 um against 0.40 um on a simulated slide).
    feature = stain_feature(od, stains.red_cell_direction)
    smooth = cv2.GaussianBlur(feature, (0, 0), _PRE_SMOOTH_PX)
    mask = (smooth > stains.threshold_od).astype(np.uint8)
    merge_px = max(1, round(params.merge_um / mpp))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * merge_px + 1, 2 * merge_px + 1))
    merged = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    k = offset_px
    lh, lw = merged.shape
    search_edge, nucleus_edge = _exact_margins_px(mpp, params) if part else (0, 0)
    cx, cy = centre_xy
    # The component closest to the overview centre (by its nearest pixel), within the search radius.
    # Pixels outside the search box are farther than the radius, so only the box is searched.
    search_px = params.search_um / mpp
    h, w = search_shape
    bx0, by0 = max(0, math.floor(cx - search_px) - 1), max(0, math.floor(cy - search_px) - 1)
    bx1, by1 = min(w, math.ceil(cx + search_px) + 1), min(h, math.ceil(cy + search_px) + 1)
    if part and not (
        bx0 - k >= search_edge
        and by0 - k >= search_edge
        and bx1 - k <= lw - search_edge
        and by1 - k <= lh - search_edge
    ):
        return None
    yy, xx = np.nonzero(merged[by0 - k : by1 - k, bx0 - k : bx1 - k])
    if yy.size == 0:
        return Refined(0.0, 0.0, math.nan, False)
    yy, xx = yy + by0, xx + bx0
    d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
    best = int(np.argmin(d2))
    if d2[best] > search_px**2:
        return Refined(0.0, 0.0, math.nan, False)
    # Only the chosen component is needed: an 8-connected flood fill from its nearest pixel costs
    # its own size, where labelling every component costs the whole window.
    _, merged, _, (x0, y0, bw, bh) = cv2.floodFill(
        merged, None, (int(xx[best]) - k, int(yy[best]) - k), 2, loDiff=0, upDiff=0, flags=8
    )
    if part and not (
        x0 >= nucleus_edge
        and y0 >= nucleus_edge
        and x0 + bw <= lw - nucleus_edge
        and y0 + bh <= lh - nucleus_edge
    ):
        return None
    box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
    component = (merged[box] == 2) & (mask[box] > 0)
    x0, y0 = x0 + k, y0 + k
    if not component.any():  # closing can add pixels at the window border that hold no stain
        return Refined(0.0, 0.0, math.nan, False)
    ys, xs = np.nonzero(component)
    new_x, new_y = xs.mean() + x0 + 0.5, ys.mean() + y0 + 0.5
    if (new_x - cx) ** 2 + (new_y - cy) ** 2 > search_px**2:  # a large stained patch, not this cell's nucleus
        return Refined(0.0, 0.0, math.nan, False)
    # Blur is measured on the summed density, which shows every edge of the cell, in a margin around
    # the component wide enough for every filter below (so the result equals the whole window's).
    m = _BLUR_MARGIN_PX
    sx0, sy0 = max(0, x0 - m), max(0, y0 - m)
    sx1, sy1 = min(w, x0 + bw + m), min(h, y0 + bh + m)
    full = np.zeros((sy1 - sy0, sx1 - sx0), dtype=bool)
    full[y0 - sy0 : y0 - sy0 + bh, x0 - sx0 : x0 - sx0 + bw] = component
    od_sum = cv2.transform(od[sy0 - k : sy1 - k, sx0 - k : sx1 - k], np.ones((1, 3), np.float32))
    blur_um = _edge_blur_um(od_sum, full, mpp)
    return Refined((new_x - cx) * mpp, (new_y - cy) * mpp, blur_um, True)


def _edge_blur_um(od_sum: np.ndarray, component: np.ndarray, mpp: float) -> float:
    """Gaussian sigma (um) of the cell's edges, from how edge gradients fall with extra smoothing.

    A step edge blurred by sigma and smoothed by s has a peak gradient proportional to
    1 / sqrt(sigma^2 + s^2), whatever its height. The ratio R of peak gradients at two scales s1 < s2
    gives sigma^2 = (s2^2 - R^2 s1^2) / (R^2 - 1): no assumption about the contrast, so a nucleus
    inside blue cytoplasm (two steps) is measured as well as a bare one.
    """
    if component.sum() < 9:
        return math.nan
    comp = component.astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    cell = cv2.dilate(comp, kernel, iterations=2) > 0
    s1, s2 = _BLUR_SCALES_PX
    magnitudes = []
    for scale in (s1, s2):
        smooth = cv2.GaussianBlur(od_sum, (0, 0), scale)
        gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3, scale=1.0 / 8.0)
        gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3, scale=1.0 / 8.0)
        magnitudes.append(np.hypot(gx, gy)[cell])
    # The cell's sharpest edges, compared at the same pixels: an edge's centre does not move when it
    # is smoothed symmetrically.
    strongest = magnitudes[0] >= _percentile(magnitudes[0], 95.0)
    peaks = [float(m[strongest].mean()) for m in magnitudes]
    if peaks[1] <= 0:
        return math.nan
    r2 = (peaks[0] / peaks[1]) ** 2
    if r2 <= 1.0:
        return _MAX_BLUR_UM
    sigma2 = (s2**2 - r2 * s1**2) / (r2 - 1.0)
    return min(math.sqrt(max(sigma2, 0.0)) * mpp, _MAX_BLUR_UM)


def _percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation) by partial sorting: ~8x faster on a cell."""
    n = values.size
    k = (n - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, n - 1)
    part = np.partition(values, (lo, hi))
    a, b, t = part[lo], part[hi], k - lo
    # numpy's own lerp, so the result is the same to the last bit
    return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t


def search_window_half_um(params: CropParams) -> float:
    """Half-side (um) of the full-resolution window read around a cell to re-centre it.

    Three quarters of the crop holds the largest nucleus around the overview centre, and the search
    radius allows for the overview centre being off by that much.
    """
    return params.crop_um * 0.75 + params.search_um


def crop_window(x_px: float, y_px: float, mpp0: float, params: CropParams) -> tuple[float, float]:
    """Top-left level-0 corner (continuous px) of the crop centred on (x_px, y_px)."""
    half = params.crop_um / 2.0 / mpp0
    return x_px - half, y_px - half


def is_padded(x_px: float, y_px: float, mpp0: float, params: CropParams, dimensions: tuple[int, int]) -> bool:
    """True when the crop centred on (x_px, y_px) reaches past the slide and is white-padded."""
    half = params.crop_um / 2.0 / mpp0
    width, height = dimensions
    return bool(x_px - half < 0 or y_px - half < 0 or x_px + half > width or y_px + half > height)


def relocation_table(refined: list[Refined], x_px: np.ndarray, y_px: np.ndarray, mpp0: float) -> pd.DataFrame:
    """New level-0 centres and blur of a batch of cells from their :class:`Refined` results."""
    dx = np.array([r.dx_um for r in refined]) / mpp0
    dy = np.array([r.dy_um for r in refined]) / mpp0
    return pd.DataFrame(
        {
            "x_px": np.asarray(x_px, dtype=float) + dx,
            "y_px": np.asarray(y_px, dtype=float) + dy,
            "blur_um": [r.blur_um for r in refined],
            "relocated": [r.found for r in refined],
        }
    )
