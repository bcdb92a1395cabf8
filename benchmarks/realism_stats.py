"""Statistics of a bright-field blood-smear field, measured the same way on real photographs and on
simulated regions (``python -m benchmarks.realism`` prints them side by side).

Every field is first brought to :data:`MPP` um/px. Optical density follows DESIGN-NOTES.md section 9:
glass ``I0`` is the median of the brightest 3 % of pixels, ``OD = -log10(I / I0)`` per channel, and a
pixel is stained where the OD summed over R, G, B exceeds :data:`STAINED_OD`. Objects come from the
annotations (real sets) or from the simulator's scene (simulated fields): centres and diameters only;
everything else is measured on the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from benchmarks.bench_detect import glass_white

MPP = 0.25
STAINED_OD = 0.15
#: Red-cell diameter assumed where no box gives it (the sets' pixel sizes assume 7.5 um as well).
RBC_DIAMETER_UM = 7.5
#: Centres closer than this many red-cell diameters count as touching or overlapping.
TOUCHING_DIAMETERS = 1.0

#: Every statistic, with one line saying what it is (the report prints them in this order).
STATISTICS: dict[str, str] = {
    "glass_r": "glass intensity, red (0-255)",
    "glass_g": "glass intensity, green",
    "glass_b": "glass intensity, blue",
    "glass_unevenness": "glass: 90th-10th percentile of smoothed glass brightness / median",
    "stained_fraction": "share of the field with OD sum > 0.15",
    "rbc_per_mm2": "red-cell centres per mm^2 (fully labelled sets)",
    "rbc_nn_um": "median distance from a red cell to its nearest neighbour, um",
    "rbc_touching_share": "share of red cells with a neighbour closer than one diameter",
    "rbc_diameter_um": "red-cell diameter, um (boxes)",
    "rbc_od_sum": "red cell: mean OD sum inside 0.85 radius",
    "rbc_rim_od": "red cell: mean OD sum, ring 0.55-0.85 radius",
    "rbc_centre_od": "red cell: mean OD sum inside 0.25 radius",
    "rbc_pallor": "red cell: centre OD / rim OD (biconcave pale centre < 1)",
    "rbc_red_share": "red cell: OD red / OD sum (hue)",
    "rbc_blue_share": "red cell: OD blue / OD sum (hue)",
    "wbc_diameter_um": "white cell diameter, um (boxes)",
    "nucleus_od_sum": "nucleus: median OD sum",
    "nucleus_green_share": "nucleus: OD green / OD sum (hue)",
    "nc_ratio": "nucleus area / white-cell disc area",
    "nucleus_texture_cv": "nucleus: coefficient of variation of OD sum (chromatin texture)",
    "nucleus_edge_od_per_um": "nucleus edge: mean OD-sum gradient on the outline, per um",
    "cytoplasm_od_sum": "white-cell cytoplasm: median OD sum",
    "cytoplasm_red_share": "white-cell cytoplasm: OD red / OD sum (blue cytoplasm absorbs red)",
    "platelet_od_sum": "platelet: mean OD sum of its darker half",
}


@dataclass
class Field:
    """One field at :data:`MPP` um/px with the objects known in it.

    Attributes
    ----------
    rgb
        uint8 ``(h, w, 3)``.
    rbc, wbc, platelets
        ``(n, 3)`` arrays of ``x_px, y_px, diameter_um`` (diameter NaN where unknown).
    rbc_complete
        Whether every red cell of the field is listed (density and neighbour statistics need it).
    source
        Name of the set or of the simulation, for the report.
    """

    rgb: np.ndarray
    rbc: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    wbc: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    platelets: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    rbc_complete: bool = False
    source: str = ""


def resample(rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, float]:
    """Bring an image from ``mpp`` to :data:`MPP` um/px; returns it and the scale factor applied."""
    scale = mpp / MPP
    if abs(scale - 1.0) < 1e-6:
        return rgb, 1.0
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interp), scale


def optical_density(rgb: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """``-log10(I / I0)`` per channel, float32 ``(h, w, 3)``."""
    return -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / np.maximum(glass, 1.0)).astype(np.float32)


def _disc_masks(
    shape: tuple[int, int], x: float, y: float, radius_px: float
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Window around a disc, and its pixels' distance to the centre in radii; None if cut by the border."""
    h, w = shape
    if not radius_px >= 2.0:  # a degenerate box
        return None
    r = math.ceil(radius_px) + 1
    if x - r < 0 or y - r < 0 or x + r >= w or y + r >= h:
        return None
    ys, xs = slice(int(y) - r, int(y) + r + 1), slice(int(x) - r, int(x) + r + 1)
    yy, xx = np.mgrid[ys, xs]
    return (ys, xs), np.hypot(xx + 0.5 - x, yy + 0.5 - y) / radius_px


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def field_stats(f: Field) -> dict[str, float]:
    """Every statistic of :data:`STATISTICS` that the field's objects allow (NaN for the others)."""
    out = dict.fromkeys(STATISTICS, math.nan)
    rgb = f.rgb
    glass = glass_white(rgb)
    od = optical_density(rgb, glass)
    od_sum = od.sum(axis=2)
    stained = od_sum > STAINED_OD
    out["glass_r"], out["glass_g"], out["glass_b"] = (float(v) for v in glass)
    out["stained_fraction"] = float(stained.mean())
    out.update(_glass_unevenness(rgb, stained))
    out.update(_red_cell_stats(f, od, od_sum))
    out.update(_white_cell_stats(f, od, od_sum))
    out.update(_platelet_stats(f, od_sum))
    return out


def _glass_unevenness(rgb: np.ndarray, stained: np.ndarray) -> dict[str, float]:
    glass_mask = ~ndimage.binary_dilation(stained, iterations=round(1.0 / MPP))
    if glass_mask.mean() < 0.05:
        return {}
    grey = cv2.GaussianBlur(rgb.astype(np.float32).sum(axis=2), (0, 0), 2.0 / MPP)
    values = grey[glass_mask]
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"glass_unevenness": float((p90 - p10) / max(p50, 1.0))}


def _red_cell_stats(f: Field, od: np.ndarray, od_sum: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    h, w = od_sum.shape
    cells = f.rbc
    if len(cells) == 0:
        return out
    if f.rbc_complete:
        area_mm2 = h * w * (MPP / 1000.0) ** 2
        out["rbc_per_mm2"] = len(cells) / area_mm2
        if len(cells) >= 3:
            pts = cells[:, :2] * MPP
            d, _ = cKDTree(pts).query(pts, k=2)
            nn = d[:, 1]
            out["rbc_nn_um"] = float(np.median(nn))
            out["rbc_touching_share"] = float(np.mean(nn < TOUCHING_DIAMETERS * RBC_DIAMETER_UM))
    diam = cells[:, 2][np.isfinite(cells[:, 2])]
    if len(diam):
        out["rbc_diameter_um"] = float(np.median(diam))
    whole, rim, centre, red, blue = [], [], [], [], []
    for x, y, d in cells:
        d_um = d if np.isfinite(d) else RBC_DIAMETER_UM
        window = _disc_masks((h, w), x, y, d_um / 2 / MPP)
        if window is None:
            continue
        (ys, xs), rho = window
        s = od_sum[ys, xs]
        inside = rho < 0.85
        if s[inside].mean() < STAINED_OD:  # an unlabelled gap or a mislabelled box
            continue
        whole.append(float(s[inside].mean()))
        rim.append(float(s[(rho >= 0.55) & (rho < 0.85)].mean()))
        centre.append(float(s[rho < 0.25].mean()))
        rgb_od = od[ys, xs][inside].sum(axis=0)
        total = max(float(rgb_od.sum()), 1e-6)
        red.append(float(rgb_od[0]) / total)
        blue.append(float(rgb_od[2]) / total)
    if whole:
        out["rbc_od_sum"] = _median(whole)
        out["rbc_rim_od"] = _median(rim)
        out["rbc_centre_od"] = _median(centre)
        out["rbc_pallor"] = _median([c / max(r, 1e-6) for c, r in zip(centre, rim, strict=True)])
        out["rbc_red_share"] = _median(red)
        out["rbc_blue_share"] = _median(blue)
    return out


def _white_cell_stats(f: Field, od: np.ndarray, od_sum: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    h, w = od_sum.shape
    per_cell: dict[str, list[float]] = {k: [] for k in STATISTICS if k.startswith(("nucleus", "cyto", "nc_"))}
    diameters = []
    for x, y, d in f.wbc:
        if not np.isfinite(d):
            continue
        diameters.append(d)
        window = _disc_masks((h, w), x, y, 0.5 * d / MPP)
        if window is None:
            continue
        (ys, xs), rho = window
        disc = rho < 1.0
        green = od[ys, xs, 1]
        values = green[disc]
        if values.size < 50 or values.max() < 0.3:
            continue
        # Nucleus: the dense, green-absorbing part of the disc (Otsu on green OD within the cell).
        g8 = np.clip(values / values.max() * 255, 0, 255).astype(np.uint8)
        t, _ = cv2.threshold(g8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        nucleus = disc & (green > t / 255 * values.max())
        nucleus = ndimage.binary_opening(nucleus, iterations=1)
        if nucleus.sum() < 20:
            continue
        s = od_sum[ys, xs]
        rgb_od = od[ys, xs][nucleus].sum(axis=0)
        per_cell["nucleus_od_sum"].append(float(np.median(s[nucleus])))
        per_cell["nucleus_green_share"].append(float(rgb_od[1] / max(rgb_od.sum(), 1e-6)))
        per_cell["nc_ratio"].append(float(nucleus.sum() / disc.sum()))
        core = ndimage.binary_erosion(nucleus, iterations=round(0.75 / MPP))
        if core.sum() >= 20:
            per_cell["nucleus_texture_cv"].append(float(s[core].std() / max(s[core].mean(), 1e-6)))
        edge = nucleus & ~ndimage.binary_erosion(nucleus)
        gy, gx = np.gradient(cv2.GaussianBlur(s, (0, 0), 0.5))
        per_cell["nucleus_edge_od_per_um"].append(float(np.hypot(gx, gy)[edge].mean() / MPP))
        cyto = disc & (rho < 0.9) & ~ndimage.binary_dilation(nucleus, iterations=round(0.5 / MPP))
        cyto &= s > STAINED_OD
        if cyto.sum() >= 20:
            c_od = od[ys, xs][cyto].sum(axis=0)
            per_cell["cytoplasm_od_sum"].append(float(np.median(s[cyto])))
            per_cell["cytoplasm_red_share"].append(float(c_od[0] / max(c_od.sum(), 1e-6)))
    if diameters:
        out["wbc_diameter_um"] = _median(diameters)
    for key, values in per_cell.items():
        if values:
            out[key] = _median(values)
    return out


def _platelet_stats(f: Field, od_sum: np.ndarray) -> dict[str, float]:
    values = []
    for x, y, d in f.platelets:
        d_um = d if np.isfinite(d) else 2.5
        window = _disc_masks(od_sum.shape, x, y, max(d_um, 2.0) / 2 / MPP)
        if window is None:
            continue
        (ys, xs), rho = window
        s = od_sum[ys, xs][rho < 1.0]
        values.append(float(np.mean(s[s >= np.median(s)])))
    return {"platelet_od_sum": _median(values)} if values else {}
