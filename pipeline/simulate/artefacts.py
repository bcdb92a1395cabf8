"""What a real slide and scan have besides cells: dust, stain precipitate, debris, the coverslip edge,
the label, fields the scanner skipped.

Sparse artefacts are drawn per 500-um block from the slide seed (like the nucleated cells), as optical
density sprites pasted into the same canvas as the cells, so blur, glass and noise treat them alike.
Dust lies on the coverslip, above the focal plane, so it is drawn already blurred. Out-of-focus patches
and stitching seams live in :mod:`.optics`; :func:`unscanned_fields` is applied to the finished pixels.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

from ._hash import block_rng, hash_uniform
from .cells import _Grid, _texture
from .scene import SceneSpec

BLOCK_UM = 500.0
#: Largest extent of an artefact sprite (um): canvases fetch artefacts this far around them (a 40-um
#: dust fibre, blurred).
MAX_ARTEFACT_UM = 60.0
#: Mean number per mm^2 of smear (debris, precipitate) or of slide (dust).
RATES_PER_MM2 = {"dust": 6.0, "precipitate": 2.0, "debris": 4.0}
#: Where the coverslip ends and the label begins on a 'whole' slide (fractions of its width).
COVERSLIP_END = 0.93
LABEL_END = 0.12
_B_ARTEFACT = 401
_S_UNSCANNED_COLOUR = 42
# Neutral grey (dust, label), the azure of precipitate (the OD direction of small stained objects in
# chula-rbc fields, sum 1), the lilac of lysed cells: OD per unit, R G B.
_GREY = np.array([1.0, 1.0, 1.0], np.float32)
_AZURE = np.array([0.28, 0.46, 0.26], np.float32)
_LILAC = np.array([0.25, 0.3, 0.12], np.float32)


def artefact_sprites(
    spec: SceneSpec, x0_um: float, y0_um: float, x1_um: float, y1_um: float
) -> list[tuple[int, int, np.ndarray]]:
    """OD sprites ``(y0_px, x0_px, od)`` of the sparse artefacts that may reach a rectangle (um)."""
    kinds = [k for k in RATES_PER_MM2 if k in spec.artefacts]
    if not kinds:
        return []
    pad = MAX_ARTEFACT_UM / 2
    out = []
    for by in range(math.floor((y0_um - pad) / BLOCK_UM), math.floor((y1_um + pad) / BLOCK_UM) + 1):
        for bx in range(math.floor((x0_um - pad) / BLOCK_UM), math.floor((x1_um + pad) / BLOCK_UM) + 1):
            for kind, x, y, seed in _block_artefacts(spec.seed, bx, by, tuple(kinds)):
                if x0_um - pad <= x < x1_um + pad and y0_um - pad <= y < y1_um + pad:
                    out.append(_draw(kind, seed, x / spec.mpp, y / spec.mpp, spec.mpp))
    return out


@lru_cache(maxsize=512)
def _block_artefacts(seed: int, bx: int, by: int, kinds: tuple[str, ...]) -> tuple[tuple, ...]:
    rng = block_rng(seed, _B_ARTEFACT, bx, by)
    rows = []
    area_mm2 = (BLOCK_UM / 1000.0) ** 2
    for kind in RATES_PER_MM2:  # always draw every kind: switching one off leaves the others in place
        n = rng.poisson(RATES_PER_MM2[kind] * area_mm2)
        xs = (bx + rng.random(n)) * BLOCK_UM
        ys = (by + rng.random(n)) * BLOCK_UM
        seeds = rng.integers(0, 2**62, n)
        if kind in kinds:
            rows += [(kind, float(x), float(y), int(s)) for x, y, s in zip(xs, ys, seeds, strict=True)]
    return tuple(rows)


@lru_cache(maxsize=256)
def _draw(kind: str, seed: int, cx: float, cy: float, mpp: float) -> tuple[int, int, np.ndarray]:
    # Cached: neighbouring render chunks reach the same artefacts.
    rng = np.random.default_rng(seed)
    if kind == "dust":
        return _dust(rng, cx, cy, mpp)
    if kind == "precipitate":
        return _precipitate(rng, cx, cy, mpp)
    return _debris(rng, cx, cy, mpp)


def _dust(rng: np.random.Generator, cx: float, cy: float, mpp: float) -> tuple[int, int, np.ndarray]:
    """Dust on the coverslip: a grey speck (< 3 um) or a thin fibre, out of focus, no stain hue.

    Sizes and darkness from real fields (chula-rbc: stained objects under 1 um^2 are neutral grey with
    a mean OD sum of about 0.18); fibres are long but thin and faint.
    """
    blur_um = rng.uniform(0.5, 2.0)
    fibre = rng.random() < 0.3
    length = rng.uniform(10.0, 40.0)
    r = rng.uniform(0.3, 1.5)
    grid = _Grid(cx, cy, mpp, (length / 2 + 1.0 if fibre else r) + 3 * blur_um)
    if fibre:  # a gently curved line
        a, bend = rng.uniform(0, np.pi), rng.uniform(-0.04, 0.04)
        u, v = grid.rotated(a)
        along = np.clip(u, -length / 2, length / 2)
        dist = np.hypot(u - along, v - bend * along**2)
        shape = grid.soft(dist - rng.uniform(0.15, 0.4))
        od = rng.uniform(0.05, 0.15)
    else:  # a speck
        shape = grid.soft(np.hypot(grid.u, grid.v * rng.uniform(0.6, 1.0)) - r)
        od = rng.uniform(0.06, 0.2)
    # Above the focal plane: blurred by 0.5-2 um.
    shape = cv2.GaussianBlur(shape, (0, 0), blur_um / mpp)
    return grid.y0, grid.x0, (shape[..., None] * (od * _GREY)).astype(np.float32)


def _precipitate(rng: np.random.Generator, cx: float, cy: float, mpp: float) -> tuple[int, int, np.ndarray]:
    """Stain precipitate: a loose cluster of 3-12 dark azure granules of 0.4-1.5 um within ~10 um.

    Real precipitate is granules and small crystals, mostly under 3 um, often clustered; in real
    fields (chula-rbc) stained objects of 1-8 um^2 that are not red cells have an azure-purple OD
    direction (R, G, B about 0.28, 0.47, 0.27). A cluster's granules cover under 20 um^2 in all, half
    the smallest white cell a scanner keeps (40 um^2).
    """
    grid = _Grid(cx, cy, mpp, 7.0)
    n = int(rng.integers(3, 13))
    spread = rng.uniform(2.0, 8.0)
    dots = np.zeros(grid.shape, np.float32)
    for x, y in rng.normal(0.0, spread / 2, (n, 2)).clip(-5.5, 5.5):
        dots = np.maximum(dots, grid.soft(np.hypot(grid.u - x, grid.v - y) - rng.uniform(0.2, 0.75)))
    return grid.y0, grid.x0, (dots[..., None] * (rng.uniform(0.6, 1.3) * _AZURE)).astype(np.float32)


def _debris(rng: np.random.Generator, cx: float, cy: float, mpp: float) -> tuple[int, int, np.ndarray]:
    """Cell debris: one to three small, irregular, pale lilac fragments, 2-20 um^2 together.

    Fragments of lysed cells are far smaller than a white cell (a smudge cell, the ruptured white cell
    itself, is one of the nucleated classes, not debris): in real fields (chula-rbc) stained objects
    that are not red cells have a median area of 0.9 um^2, 90 % are under 6.3 um^2, and their mean OD
    sum is 0.2-0.3.
    """
    grid = _Grid(cx, cy, mpp, 6.0)
    shape = np.zeros(grid.shape, np.float32)
    # 2-20 um^2 in all, shared by the fragments: even fragments that touch stay far below 40 um^2.
    areas = rng.uniform(2.0, 20.0) * rng.dirichlet(np.ones(int(rng.integers(1, 4))))
    for area in areas:
        r = math.sqrt(max(area, 0.5) / math.pi)
        fx, fy = rng.uniform(-3.0, 3.0, 2)
        du, dv = grid.u - fx, grid.v - fy
        phi = np.arctan2(dv, du)
        edge = r * (
            1.0 + sum(rng.uniform(0.1, 0.3) * np.cos(k * phi + rng.uniform(0, 6.3)) for k in (2, 3, 5))
        )
        shape = np.maximum(shape, grid.soft(np.hypot(du, dv) - edge))
    shape *= _texture(rng, grid, 0.6, 0.4)
    return grid.y0, grid.x0, (shape[..., None] * (rng.uniform(0.3, 0.6) * _LILAC)).astype(np.float32)


def add_edge_and_label(od: np.ndarray, spec: SceneSpec, cy0: int, cx0: int) -> None:
    """Add the coverslip edge and the label (OD) to a canvas whose top-left pixel is (cy0, cx0)."""
    if spec.placement != "whole":
        return
    w = od.shape[1]
    xs_um = (np.arange(cx0, cx0 + w) + 0.5) * spec.mpp
    extra = np.zeros(w, np.float32)
    if "edge" in spec.artefacts:
        edge_um = COVERSLIP_END * spec.width_um
        # a dark refractive line, and beyond it glass without mounting medium (a faint haze)
        extra += (0.5 * np.exp(-0.5 * ((xs_um - edge_um) / 2.0) ** 2)).astype(np.float32)
        extra += np.where(xs_um > edge_um, 0.04, 0.0).astype(np.float32)
    if "label" in spec.artefacts:
        extra += np.where(xs_um < LABEL_END * spec.width_um, 2.2, 0.0).astype(np.float32)
    if extra.any():
        od += extra[None, :, None]


def unscanned_fields(
    rgb: np.ndarray, spec: SceneSpec, field_px: tuple[int, int], y0: int, x0: int, is_glass
) -> None:
    """Blank, in place, the camera fields a scanner skipped: every field wholly over bare glass.

    ``is_glass(x_um, y_um)`` tells bare glass apart. Scanners scan the region they detect the smear in;
    what they skip is filled black or white (one colour per slide; scanners differ). The label area is
    bare glass too, so it is blank as well, as in a real scan's main image. Only on 'whole' slides: other
    windows lie inside the smear.
    """
    if spec.placement != "whole" or "unscanned" not in spec.artefacts:
        return
    h, w = rgb.shape[:2]
    fw, fh = field_px
    value = 0 if hash_uniform(spec.seed, _S_UNSCANNED_COLOUR)[0] < 0.5 else 255
    for fy in range(y0 // fh, (y0 + h - 1) // fh + 1):
        for fx in range(x0 // fw, (x0 + w - 1) // fw + 1):
            gy = (fy * fh + np.linspace(0, fh, 5)) * spec.mpp
            gx = (fx * fw + np.linspace(0, fw, 5)) * spec.mpp
            xx, yy = np.meshgrid(gx, gy)
            if not np.all(is_glass(xx, yy)):
                continue
            ya, yb = max(y0, fy * fh) - y0, min(y0 + h, (fy + 1) * fh) - y0
            xa, xb = max(x0, fx * fw) - x0, min(x0 + w, (fx + 1) * fw) - x0
            rgb[ya:yb, xa:xb] = value
