"""Relocation, the 40x pass: re-centre each cell at full resolution, measure its focus, cut its crop.

For every candidate that passed the overview quality filter, read the finest level around it, find
the cell's nucleus (all lobes together) near the overview position, move the centre to it, and estimate
the edge blur of the nucleus in um (a Gaussian sigma). Crops are then resampled to the gallery geometry
(default 25 x 25 um at 288 x 288 px, 11.52 px/um, as in MLL23) and padded with white where the window
leaves the slide, which is flagged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pandas as pd

from .errors import ParameterError

_SQRT_2PI = math.sqrt(2.0 * math.pi)
#: Pre-smoothing of the optical density before thresholding, px (removes pixel noise).
_PRE_SMOOTH_PX = 1.0
#: The two smoothing scales (px) of the blur estimate, and the largest blur it reports (um).
_BLUR_SCALES_PX = (1.0, 2.0)
_MAX_BLUR_UM = 5.0


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


def od_sum_of(rgb: np.ndarray, white_rgb: np.ndarray) -> np.ndarray:
    """Optical density summed over R, G, B against a glass white level."""
    ratio = np.maximum(rgb.astype(np.float32), 1.0) / np.asarray(white_rgb, dtype=np.float32)
    od = -np.log10(np.minimum(ratio, 1.0))
    return od.sum(axis=-1)


def refine_centre(
    window_rgb: np.ndarray,
    mpp: float,
    centre_xy: tuple[float, float],
    white_rgb: np.ndarray,
    red_cell_direction: tuple[float, float, float],
    threshold_od: float,
    params: CropParams,
) -> Refined:
    """Re-centre a cell on its nucleus in a full-resolution window and estimate its blur.

    Parameters
    ----------
    window_rgb
        RGB window around the cell at the finest level.
    mpp
        Pixel size of the window, um/px.
    centre_xy
        The overview centre in window pixels (continuous coordinates).
    white_rgb
        Glass white level of the slide.
    red_cell_direction, threshold_od
        The slide's red-cell OD direction and stain threshold (see :mod:`pipeline.segment`): pixels
        whose OD, red-cell component removed, exceeds the threshold are white-cell stain.
    params
        Search radius and lobe merge distance.

    Returns
    -------
    Refined
        ``found`` is false (and the offset zero) when no nucleus lies within the search radius.
    """
    from .segment import stain_feature

    ratio = np.maximum(window_rgb.astype(np.float32), 1.0) / np.asarray(white_rgb, dtype=np.float32)
    od = -np.log10(np.minimum(ratio, 1.0))
    feature = stain_feature(od, red_cell_direction)
    smooth = cv2.GaussianBlur(feature, (0, 0), _PRE_SMOOTH_PX)
    mask = (smooth > threshold_od).astype(np.uint8)
    merge_px = max(1, round(params.merge_um / mpp))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * merge_px + 1, 2 * merge_px + 1))
    merged = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    n, labels = cv2.connectedComponents(merged, connectivity=8)
    cx, cy = centre_xy
    if n <= 1:
        return Refined(0.0, 0.0, math.nan, False)
    # The component closest to the overview centre (by its nearest pixel), within the search radius.
    search_px = params.search_um / mpp
    yy, xx = np.nonzero(labels)
    d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
    best = int(np.argmin(d2))
    if d2[best] > search_px**2:
        return Refined(0.0, 0.0, math.nan, False)
    label = labels[yy[best], xx[best]]
    component = (labels == label) & (mask > 0)
    if not component.any():  # closing can add pixels at the window border that hold no stain
        return Refined(0.0, 0.0, math.nan, False)
    ys, xs = np.nonzero(component)
    new_x, new_y = xs.mean() + 0.5, ys.mean() + 0.5
    if (new_x - cx) ** 2 + (new_y - cy) ** 2 > search_px**2:  # a large stained patch, not this cell's nucleus
        return Refined(0.0, 0.0, math.nan, False)
    # Blur is measured on the summed density, which shows every edge of the cell.
    blur_um = _edge_blur_um(od.sum(axis=-1), component, mpp)
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
        gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3) / 8.0
        gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3) / 8.0
        magnitudes.append(np.hypot(gx, gy)[cell])
    # The cell's sharpest edges, compared at the same pixels: an edge's centre does not move when it
    # is smoothed symmetrically.
    strongest = magnitudes[0] >= np.percentile(magnitudes[0], 95)
    peaks = [float(m[strongest].mean()) for m in magnitudes]
    if peaks[1] <= 0:
        return math.nan
    r2 = (peaks[0] / peaks[1]) ** 2
    if r2 <= 1.0:
        return _MAX_BLUR_UM
    sigma2 = (s2**2 - r2 * s1**2) / (r2 - 1.0)
    return min(math.sqrt(max(sigma2, 0.0)) * mpp, _MAX_BLUR_UM)


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
