"""Segmentation of the overview: optical density, an adaptive threshold, merged lobes, 40-800 um^2.

The Metafer recipe: a logarithmic colour transform (optical density, OD = -log10(I / I0)) against the
local white I0 of the glass, a threshold, and stained objects of 40-800 um^2. Here:

1. **White level.** I0 is the local bright level of each channel: a maximum over a square window of
   ``white_radius_um`` (after a 3x3 mean against pixel noise), so vignetting, tint and uneven
   illumination across camera fields cancel. Where no glass is near (thick zones), the window's maximum
   is a red cell; I0 is then kept at least ``white_floor`` times the slide's white.
2. **Stain other than red cells.** Red cells, one or stacked (thick zone, rouleaux), all have the
   colour of haemoglobin and eosin: their OD vectors point one way, only longer when stacked. White-cell
   nuclei (purple) and basophilic cytoplasm (blue) point elsewhere. The feature is the length of the OD
   vector once its component along the slide's red-cell direction is removed (a colour deconvolution
   with one measured stain). The direction and the feature's spread on red cells are measured once per
   slide from sample windows (:func:`estimate_slide_stains`); the threshold is ``threshold_factor``
   times that spread (at least ``min_threshold``), so it follows the slide's stain and illumination. On
   the real BCCD photographs red cells give 0.011 (median; max 0.055) and nuclei 0.26 (min 0.13). A fixed
   threshold (``threshold``) can override the adaptive one.
3. **Objects.** The thresholded stain is closed with a disc of ``merge_um`` (the lobes of a segmented
   neutrophil become one object) and grown by ``grow_um`` (a rim of cytoplasm: the object's area
   approximates the cell's stained area). An object with two or more large stained parts (touching
   cells, each with a nucleus) is split between them, every pixel going to the nearest part. Objects
   of ``min_area_um2`` to ``max_area_um2`` whose longest side is at most ``max_extent_um`` are kept.

Every operation has bounded support, so segmenting a tile with a halo of :func:`required_halo_um` gives,
for objects whose centroid lies in the tile's core, exactly the objects of the whole slide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

from .errors import ParameterError

_LOG10_SCALE = np.float32(1.0 / math.log(10.0))


@dataclass(frozen=True)
class SegmentParams:
    """Parameters of the overview segmentation (physical units).

    Attributes
    ----------
    min_area_um2, max_area_um2
        Objects kept, by area (um^2). Metafer: 40-800.
    max_extent_um
        Longest side of an object's bounding box (um); longer stained chains are not cells.
    white_radius_um
        Half-side of the window in which the local glass white is measured (um).
    white_floor
        The local white is kept at least this fraction of the slide's white (for thick zones).
    threshold_factor
        Threshold = this factor x the feature's 75th percentile on stained (red-cell) pixels.
    min_threshold
        Lower bound of the adaptive threshold (OD), against noise on very pale slides.
    threshold
        A fixed feature threshold (OD) overriding the adaptive one; ``None`` for adaptive.
    merge_um
        Radius of the closing that joins lobes and fragments of one cell (um).
    grow_um
        Radius by which the merged nuclear stain is grown into the cytoplasm (um).
    min_core_um2
        Objects with less stain above threshold than this (um^2) are dropped: platelet clumps, debris.
        (A small lymphocyte's nucleus is ~25-40 um^2.)
    split_nucleus_um2
        An object holding two or more stained parts at least this large (um^2) is split between them:
        touching cells, each with its own nucleus. Lobes of one neutrophil are smaller and stay together.
    split_radius_um, split_neck
        Shape split of touching cells whose stain is one part (e.g. plasma cells' blue cytoplasm): centres
        are maxima of the distance to the object's edge of at least ``split_radius_um``; two are kept apart
        when the neck between them is narrower than ``split_neck`` x the smaller one's diameter.
    """

    min_area_um2: float = 40.0
    max_area_um2: float = 800.0
    max_extent_um: float = 40.0
    white_radius_um: float = 25.0
    white_floor: float = 0.85
    threshold_factor: float = 4.0
    min_threshold: float = 0.07
    threshold: float | None = None
    merge_um: float = 2.0
    grow_um: float = 1.5
    split_nucleus_um2: float = 20.0
    split_radius_um: float = 3.5
    split_neck: float = 0.75
    min_core_um2: float = 12.0

    def __post_init__(self) -> None:
        positive = ("min_area_um2", "max_area_um2", "max_extent_um", "white_radius_um", "threshold_factor")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ParameterError(f"segmentation parameter {name} must be > 0, got {value}")
        if self.min_area_um2 >= self.max_area_um2:
            raise ParameterError(
                f"--min-area-um2 ({self.min_area_um2:g}) must be below --max-area-um2 ({self.max_area_um2:g})"
            )
        if not 0 < self.white_floor <= 1:
            raise ParameterError(f"white_floor must be in (0, 1], got {self.white_floor}")
        for name in ("merge_um", "grow_um", "min_threshold"):
            if getattr(self, name) < 0:
                raise ParameterError(f"segmentation parameter {name} must be >= 0, got {getattr(self, name)}")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ParameterError(f"--threshold must be > 0, got {self.threshold}")


@dataclass(frozen=True)
class SlideStains:
    """Slide-level statistics, estimated once from sample windows.

    Attributes
    ----------
    white_rgb
        The glass white of the slide (0-255 per channel).
    red_cell_direction
        Unit OD vector (R, G, B) of red cells on this slide.
    red_cell_level
        75th percentile of the feature on stained pixels (red cells): its spread there.
    threshold_od
        The feature threshold used for this slide.
    stained_fraction
        Fraction of sampled pixels that carry any stain (0 on blank glass).
    """

    white_rgb: tuple[float, float, float]
    red_cell_direction: tuple[float, float, float]
    red_cell_level: float
    threshold_od: float
    stained_fraction: float


def _pixels(mpp: float, um: float) -> int:
    return max(1, math.ceil(um / mpp))


def required_halo_um(params: SegmentParams) -> float:
    """Context (um) a tile needs on each side for its core objects to equal the whole slide's."""
    return params.white_radius_um + params.merge_um * 2 + params.grow_um + params.max_extent_um + 4.0


def _local_white(
    rgb: np.ndarray, mpp: float, params: SegmentParams, slide_white: np.ndarray | None
) -> np.ndarray:
    smooth = cv2.blur(rgb.astype(np.float32), (3, 3), borderType=cv2.BORDER_REPLICATE)
    r = _pixels(mpp, params.white_radius_um)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1))
    white = cv2.dilate(smooth, kernel, borderType=cv2.BORDER_REPLICATE)
    if slide_white is not None:
        np.maximum(white, np.float32(params.white_floor) * np.asarray(slide_white, np.float32), out=white)
    np.maximum(white, 1.0, out=white)
    return white


def optical_density(
    rgb: np.ndarray, mpp: float, params: SegmentParams, stains: SlideStains | None = None
) -> np.ndarray:
    """Optical density ``(h, w, 3)`` float32 of an RGB image against the local glass white.

    Parameters
    ----------
    rgb
        RGB uint8 image.
    mpp
        Its pixel size, um/px.
    params
        Segmentation parameters (white window).
    stains
        Slide statistics; with them the local white never drops below ``white_floor`` x the slide white.
    """
    white = _local_white(rgb, mpp, params, None if stains is None else np.asarray(stains.white_rgb))
    ratio = np.maximum(rgb.astype(np.float32), 1.0) / white
    od = -np.log(np.minimum(ratio, 1.0)) * _LOG10_SCALE
    return od.astype(np.float32, copy=False)


#: Red-cell OD direction used before a slide's own is measured (the base eosin of the simulator, which
#: matches CellaVision MGG images; BCCD measures (0.36, 0.71, 0.60)).
DEFAULT_RED_CELL_DIRECTION = (0.50, 0.70, 0.45)


def stain_feature(od: np.ndarray, direction: Sequence[float]) -> np.ndarray:
    """Length of the OD vector after removing its component along the red-cell direction."""
    e = np.asarray(direction, dtype=np.float32)
    e = e / np.float32(np.linalg.norm(e))
    along = od @ e
    residual = od - along[..., None] * e
    return np.sqrt(np.einsum("...c,...c->...", residual, residual)).astype(np.float32, copy=False)


def estimate_slide_stains(samples: Sequence[np.ndarray], mpp: float, params: SegmentParams) -> SlideStains:
    """Estimate the slide's white and red-cell stain level, and so the threshold, from sample windows.

    Parameters
    ----------
    samples
        RGB overview windows from across the slide (fixed positions, independent of the tiling).
    mpp
        Their pixel size, um/px.
    params
        Segmentation parameters.
    """
    if not samples:
        raise ParameterError("estimate_slide_stains needs at least one sample window")
    pixels = np.concatenate([s.reshape(-1, 3) for s in samples]).astype(np.float32)
    # Saturated pixels are padding outside the scanned area or clipped highlights, not glass.
    unsaturated = pixels[(pixels < 254).any(axis=1)]
    if len(unsaturated) > 100:
        pixels = unsaturated
    brightness = pixels.sum(axis=1)
    glass = pixels[brightness >= np.percentile(brightness, 95)]
    white = np.median(glass, axis=0)
    white_rgb = (float(white[0]), float(white[1]), float(white[2]))
    stains0 = SlideStains(white_rgb, DEFAULT_RED_CELL_DIRECTION, 0.0, 0.0, 0.0)
    od = np.concatenate([optical_density(s, mpp, params, stains0).reshape(-1, 3) for s in samples])
    stained = od.sum(axis=1) > 0.1
    fraction = float(stained.mean())
    if stained.sum() > 200:
        # Red cells cover far more of a smear than white cells, so the median stained pixel is a red cell.
        # Mean over the middle half of stained pixels by density: robust, and not quantised to the
        # 8-bit levels the way a per-channel median is.
        total = od[stained].sum(axis=1)
        lo, hi = np.percentile(total, [25, 75])
        direction = od[stained][(total >= lo) & (total <= hi)].mean(axis=0)
        direction = direction / max(float(np.linalg.norm(direction)), 1e-6)
        level = float(np.percentile(stain_feature(od[stained], direction), 75))
    else:  # blank glass: nothing to measure
        direction = np.asarray(DEFAULT_RED_CELL_DIRECTION) / np.linalg.norm(DEFAULT_RED_CELL_DIRECTION)
        level = params.min_threshold / params.threshold_factor
    if params.threshold is not None:
        threshold = params.threshold
    else:
        threshold = max(params.min_threshold, params.threshold_factor * level)
    e = (float(direction[0]), float(direction[1]), float(direction[2]))
    return SlideStains(white_rgb, e, level, float(threshold), fraction)


def segment(
    rgb: np.ndarray, mpp: float, stains: SlideStains, params: SegmentParams, od: np.ndarray | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Segment white cells in an overview tile.

    Parameters
    ----------
    rgb
        RGB uint8 overview tile (with its halo).
    mpp
        Pixel size, um/px.
    stains
        The slide's statistics (:func:`estimate_slide_stains`).
    params
        Segmentation parameters.
    od
        The tile's :func:`optical_density`, when the caller has it already.

    Returns
    -------
    labels : numpy.ndarray
        int32 ``(h, w)``: 0 background, k > 0 the kept objects (numbered 1..n in table order).
    objects : pandas.DataFrame
        One row per kept object: ``x_px, y_px`` (centroid, continuous tile coordinates: pixel i spans
        [i, i+1)), ``area_um2``, ``extent_um``, ``y0, x0, y1, x1`` (bounding box, tile px, half-open),
        ``stain_mean`` and ``stain_max`` (the stain feature, OD), ``nucleus_fraction`` (share of the
        object above threshold) and ``n_parts`` (separate stained parts merged into it, e.g. lobes).
    """
    if od is None:
        od = optical_density(rgb, mpp, params, stains)
    feature = stain_feature(od, stains.red_cell_direction)
    core = (feature > np.float32(stains.threshold_od)).astype(np.uint8)
    merge = _pixels(mpp, params.merge_um) if params.merge_um > 0 else 0
    merged = core
    if merge:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * merge + 1, 2 * merge + 1))
        merged = cv2.morphologyEx(core, cv2.MORPH_CLOSE, disc, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    grow = round(params.grow_um / mpp)
    if grow > 0:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
        merged = cv2.dilate(merged, disc)
    n, labels = cv2.connectedComponents(merged, connectivity=8, ltype=cv2.CV_32S)
    n_core, core_labels = cv2.connectedComponents(core, connectivity=8, ltype=cv2.CV_32S)
    owner = _owners(core_labels, labels, n_core)
    n, labels = _split_touching(labels, n, core_labels, owner, mpp, params)
    n, labels = _split_by_shape(labels, n, mpp, params)
    owner = _owners(core_labels, labels, n_core)
    h, w = labels.shape
    flat = labels.ravel()
    pixels = np.bincount(flat, minlength=n).astype(np.float64)
    ys, xs = np.indices(labels.shape, dtype=np.float64)
    cx = np.bincount(flat, weights=xs.ravel(), minlength=n) / np.maximum(pixels, 1) + 0.5
    cy = np.bincount(flat, weights=ys.ravel(), minlength=n) / np.maximum(pixels, 1) + 0.5
    y0 = np.zeros(n, np.int64)
    x0 = np.zeros(n, np.int64)
    y1 = np.zeros(n, np.int64)
    x1 = np.zeros(n, np.int64)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None:
            y0[k], y1[k], x0[k], x1[k] = box[0].start, box[0].stop, box[1].start, box[1].stop
    area_um2 = pixels * mpp * mpp
    extent_um = np.maximum(x1 - x0, y1 - y0) * mpp
    # An object touching the tile border may be cut; it then extends beyond the halo, i.e. further
    # than any cell, and is dropped here as it would be (by its extent) on the whole slide.
    touches = (x0 == 0) | (y0 == 0) | (x1 == w) | (y1 == h)
    core_px = np.bincount(flat, weights=core.ravel().astype(np.float64), minlength=n)
    keep = (
        (core_px * mpp * mpp >= params.min_core_um2)
        & (area_um2 >= params.min_area_um2)
        & (area_um2 <= params.max_area_um2)
        & (extent_um <= params.max_extent_um)
        & ~touches
    )
    keep[0] = False
    kept = np.flatnonzero(keep)
    remap = np.zeros(n, dtype=np.int32)
    remap[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    out_labels = remap[labels]
    stain_sum = np.bincount(flat, weights=feature.ravel(), minlength=n)
    stain_max = np.zeros(n, dtype=np.float64)
    if len(kept):
        stain_max[kept] = ndimage.maximum(feature, labels, index=kept)
    n_parts = np.bincount(owner[1:], minlength=n)[:n] if n_core > 1 else np.zeros(n, np.int64)
    table = pd.DataFrame(
        {
            "x_px": cx[kept],
            "y_px": cy[kept],
            "area_um2": area_um2[kept].astype(float),
            "extent_um": extent_um[kept].astype(float),
            "y0": y0[kept],
            "x0": x0[kept],
            "y1": y1[kept],
            "x1": x1[kept],
            "stain_mean": stain_sum[kept] / np.maximum(pixels[kept], 1),
            "stain_max": stain_max[kept],
            "nucleus_fraction": core_px[kept] / np.maximum(pixels[kept], 1),
            "n_parts": n_parts[kept],
        }
    )
    return out_labels, table


def _split_by_shape(labels: np.ndarray, n: int, mpp: float, params: SegmentParams) -> tuple[int, np.ndarray]:
    """Split objects made of round cells joined by a narrow neck (watershed on the distance to the edge)."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    min_radius = params.split_radius_um / mpp
    areas = np.bincount(labels.ravel(), minlength=n) * mpp * mpp
    # Two cells of the smallest splittable size: anything smaller is one cell.
    candidates = np.flatnonzero(areas >= 2 * math.pi * params.split_radius_um**2)
    candidates = candidates[candidates > 0]
    if len(candidates) == 0:
        return n, labels
    boxes = ndimage.find_objects(labels)
    out = labels
    copied = False
    for obj in candidates:
        box = boxes[obj - 1]
        padded = np.pad(labels[box] == obj, 1)
        dist = cv2.distanceTransform(padded.astype(np.uint8), cv2.DIST_L2, 5)
        peaks = peak_local_max(
            dist,
            min_distance=max(1, round(min_radius)),
            threshold_abs=min_radius,
            labels=padded.astype(np.int32),
        )
        if len(peaks) < 2:
            continue
        markers = np.zeros(padded.shape, np.int32)
        markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
        parts = watershed(-dist, markers, mask=padded)
        parts = _merge_wide_necks(parts, dist, peaks, params.split_neck)
        if parts.max() < 2:
            continue
        if not copied:
            out = labels.copy()
            copied = True
        sub = out[box]
        inner = parts[1:-1, 1:-1]
        for k in range(2, int(parts.max()) + 1):
            sub[inner == k] = n
            n += 1
    return n, out


def _merge_wide_necks(
    parts: np.ndarray, dist: np.ndarray, peaks: np.ndarray, neck_ratio: float
) -> np.ndarray:
    """Merge watershed regions whose shared border is not narrower than ``neck_ratio`` x the smaller
    region's diameter (twice its peak distance); relabel 1..k."""
    radius = {k + 1: float(dist[y, x]) for k, (y, x) in enumerate(peaks)}
    parent = {k: k for k in radius}

    def find(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    # Border pixels between regions a and b: 4-neighbours with different non-zero labels.
    necks: dict[tuple[int, int], int] = {}
    for a, b in ((parts[:, :-1], parts[:, 1:]), (parts[:-1, :], parts[1:, :])):
        diff = (a != b) & (a > 0) & (b > 0)
        for u, v in zip(a[diff], b[diff], strict=True):
            key = (int(min(u, v)), int(max(u, v)))
            necks[key] = necks.get(key, 0) + 1
    for (a, b), length in necks.items():
        if length >= neck_ratio * 2 * min(radius[a], radius[b]):
            parent[find(b)] = find(a)
    roots = sorted({find(k) for k in radius})
    relabel = np.zeros(int(parts.max()) + 1, np.int32)
    for k in radius:
        relabel[k] = roots.index(find(k)) + 1
    return relabel[parts]


def _owners(core_labels: np.ndarray, labels: np.ndarray, n_core: int) -> np.ndarray:
    """For each stained part (core component), the object that holds it (0 for the background)."""
    owner = np.zeros(n_core, dtype=np.int64)
    flat_core = core_labels.ravel()
    inside = flat_core > 0
    owner[flat_core[inside]] = labels.ravel()[inside]
    return owner


def _split_touching(
    labels: np.ndarray, n: int, core_labels: np.ndarray, owner: np.ndarray, mpp: float, params: SegmentParams
) -> tuple[int, np.ndarray]:
    """Split objects holding several large stained parts, each pixel to its nearest large part."""
    if len(owner) <= 1:
        return n, labels
    part_area = np.bincount(core_labels.ravel(), minlength=len(owner)) * mpp * mpp
    big = np.flatnonzero(part_area >= params.split_nucleus_um2)
    big = big[big > 0]
    objects, counts = np.unique(owner[big], return_counts=True)
    to_split = objects[(counts >= 2) & (objects > 0)]
    if len(to_split) == 0:
        return n, labels
    labels = labels.copy()
    boxes = ndimage.find_objects(labels)
    for obj in to_split:
        box = boxes[obj - 1]
        region = labels[box] == obj
        parts = big[owner[big] == obj]
        distances = np.stack(
            [cv2.distanceTransform((core_labels[box] != p).astype(np.uint8), cv2.DIST_L2, 3) for p in parts]
        )
        nearest = np.argmin(distances, axis=0)
        sub = labels[box]
        for k in range(1, len(parts)):
            sub[region & (nearest == k)] = n
            n += 1
    return n, labels
