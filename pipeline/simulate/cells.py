"""Morphology of every simulated blood cell: sprites of stain concentrations on the absolute pixel grid.

Each class is a recipe (size, nucleus/cell ratio, nucleus shape, chromatin density and texture,
cytoplasm colour, granules, nucleoli, vacuoles, Auer rods, projections) with random but plausible
variation drawn from the cell's own seed. Geometry is evaluated at absolute level-0 pixel centres, so a
sprite is the same array whichever tile pastes it. Sizes follow DESIGN-NOTES.md section 2.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

from ..errors import ParameterError
from .stain import BLUE, CHROMATIN, EOSIN

MLL23_CLASSES: tuple[str, ...] = (
    "typical_lymphocyte",
    "plasma_cell",
    "large_granular_lymphocyte",
    "reactive_lymphocyte",
    "hairy_cell",
    "neoplastic_lymphocyte",
    "smudge_cell",
    "band_neutrophil",
    "segmented_neutrophil",
    "eosinophil",
    "basophil",
    "monocyte",
    "myeloblast",
    "metamyelocyte",
    "promyelocyte",
    "myelocyte",
    "atypical_promyelocyte",
    "normoblast",
)
OTHER_CLASSES: tuple[str, ...] = ("red_cell", "platelet")
ALL_CLASSES: tuple[str, ...] = MLL23_CLASSES + OTHER_CLASSES
NUCLEATED_CLASSES: frozenset[str] = frozenset(MLL23_CLASSES)
#: Upper bound on a sprite's extent (um): the largest cell (25 um) flattened (x1.45) with projections.
MAX_DIAMETER_UM = 40.0


@dataclass(frozen=True)
class CellSprite:
    """A rendered cell: stain concentrations on the absolute level-0 pixel grid.

    Attributes
    ----------
    y0, x0
        Absolute level-0 pixel of ``conc[0, 0]``.
    conc
        float32 (h, w, 3) concentrations of EOSIN, BLUE, CHROMATIN; 0 outside the cell.
    diameter_um
        Equivalent diameter of the whole cell as drawn.
    nucleus_area_um2
        Area of the nucleus as drawn (0 for red cells and platelets).
    """

    y0: int
    x0: int
    conc: np.ndarray
    diameter_um: float
    nucleus_area_um2: float


@dataclass(frozen=True)
class _Recipe:
    diameter: tuple[float, float]
    nucleus_fraction: tuple[float, float]  # nucleus diameter / cell diameter (for round-ish nuclei)
    shape: str  # round, eccentric, kidney, cleft, band, lobes, bilobed, smear, none
    chromatin: float
    texture_um: float  # correlation length of chromatin texture
    cytoplasm: tuple[float, float, float]  # EOSIN, BLUE, CHROMATIN
    lobes: tuple[int, int] = (1, 1)
    granules: str = ""  # fine, azurophil, eosinophil, basophil
    granule_count: tuple[int, int] = (0, 0)
    nucleoli: tuple[int, int] = (0, 0)
    vacuoles: tuple[int, int] = (0, 0)
    auer_rods: tuple[int, int] = (0, 0)
    hairy: bool = False
    hof: bool = False
    rim_blue: float = 0.0
    clumping: float = 0.3  # contrast of chromatin clumps: coarse in mature lymphocytes, fine in blasts


_RECIPES: dict[str, _Recipe] = {
    "typical_lymphocyte": _Recipe((7.0, 10.0), (0.78, 0.86), "round", 1.15, 0.7, (0.6, 0.5, 0.0)),
    "plasma_cell": _Recipe((9.0, 14.0), (0.5, 0.6), "eccentric", 1.1, 0.9, (0.3, 1.5, 0.0), hof=True),
    "large_granular_lymphocyte": _Recipe(
        (12.0, 16.0),
        (0.5, 0.6),
        "round",
        1.05,
        0.7,
        (0.5, 0.35, 0.0),
        granules="azurophil",
        granule_count=(5, 16),
    ),
    "reactive_lymphocyte": _Recipe(
        (12.0, 18.0), (0.45, 0.55), "round", 0.95, 0.6, (0.4, 0.9, 0.0), rim_blue=0.9
    ),
    "hairy_cell": _Recipe((10.0, 14.0), (0.5, 0.6), "kidney", 0.8, 0.45, (0.35, 0.35, 0.0), hairy=True),
    "neoplastic_lymphocyte": _Recipe((8.0, 12.0), (0.76, 0.84), "cleft", 1.1, 0.6, (0.5, 0.6, 0.0)),
    "smudge_cell": _Recipe((10.0, 18.0), (0.9, 1.0), "smear", 0.6, 0.5, (0.0, 0.0, 0.0)),
    "band_neutrophil": _Recipe(
        (10.0, 14.0), (0.0, 0.0), "band", 1.0, 0.6, (1.0, 0.1, 0.0), granules="fine", granule_count=(30, 60)
    ),
    "segmented_neutrophil": _Recipe(
        (10.0, 15.0),
        (0.0, 0.0),
        "lobes",
        1.05,
        0.6,
        (1.0, 0.1, 0.0),
        lobes=(2, 5),
        granules="fine",
        granule_count=(30, 60),
    ),
    "eosinophil": _Recipe(
        (11.0, 15.0),
        (0.0, 0.0),
        "lobes",
        0.95,
        0.6,
        (0.6, 0.05, 0.0),
        lobes=(2, 2),
        granules="eosinophil",
        granule_count=(350, 500),
    ),
    "basophil": _Recipe(
        (10.0, 13.0),
        (0.0, 0.0),
        "lobes",
        0.75,
        0.6,
        (0.5, 0.3, 0.0),
        lobes=(2, 3),
        granules="basophil",
        granule_count=(70, 120),
    ),
    "monocyte": _Recipe(
        (13.0, 20.0),
        (0.55, 0.65),
        "kidney",
        0.75,
        0.4,
        (0.5, 0.4, 0.0),
        vacuoles=(0, 6),
        granules="dust",
        granule_count=(10, 30),
    ),
    "myeloblast": _Recipe((14.0, 20.0), (0.78, 0.86), "round", 0.85, 0.3, (0.3, 0.9, 0.0), nucleoli=(1, 3)),
    "metamyelocyte": _Recipe(
        (10.0, 18.0),
        (0.55, 0.62),
        "kidney",
        1.0,
        0.6,
        (1.0, 0.15, 0.0),
        granules="fine",
        granule_count=(20, 50),
    ),
    "promyelocyte": _Recipe(
        (15.0, 21.0),
        (0.6, 0.7),
        "eccentric",
        0.85,
        0.35,
        (0.4, 0.8, 0.0),
        nucleoli=(1, 2),
        granules="azurophil",
        granule_count=(30, 70),
    ),
    "myelocyte": _Recipe(
        (12.0, 18.0),
        (0.58, 0.66),
        "indented",
        0.95,
        0.5,
        (0.9, 0.3, 0.0),
        granules="fine",
        granule_count=(30, 60),
    ),
    "atypical_promyelocyte": _Recipe(
        (15.0, 25.0),
        (0.0, 0.0),
        "bilobed",
        0.85,
        0.35,
        (0.5, 0.6, 0.0),
        granules="azurophil",
        granule_count=(60, 120),
        auer_rods=(1, 4),
    ),
    "normoblast": _Recipe((8.0, 12.0), (0.5, 0.6), "round", 1.6, 1.0, (1.0, 0.25, 0.0)),
}
# Chromatin: clumped (coarse, contrasted) in mature cells, fine and even in blasts (DESIGN-NOTES 2).
_CLUMPING = {
    "typical_lymphocyte": 0.28,
    "plasma_cell": 0.28,
    "large_granular_lymphocyte": 0.26,
    "neoplastic_lymphocyte": 0.26,
    "normoblast": 0.18,
    "segmented_neutrophil": 0.26,
    "band_neutrophil": 0.26,
    "eosinophil": 0.23,
    "basophil": 0.2,
    "metamyelocyte": 0.23,
    "myelocyte": 0.2,
    "reactive_lymphocyte": 0.2,
    "hairy_cell": 0.15,
    "monocyte": 0.18,
    "smudge_cell": 0.15,
    "promyelocyte": 0.1,
    "atypical_promyelocyte": 0.1,
    "myeloblast": 0.08,
}
_RECIPES = {name: replace(recipe, clumping=_CLUMPING[name]) for name, recipe in _RECIPES.items()}
#: Granule kinds drawn as packed fields: granule size (um) and share of the region covered.
_PACKED = {"fine": (0.3, 0.3)}
_DIAMETERS: dict[str, tuple[float, float]] = {
    **{name: recipe.diameter for name, recipe in _RECIPES.items()},
    "red_cell": (7.0, 8.0),
    "platelet": (2.0, 3.0),
}


def class_diameter_range_um(cell_class: str) -> tuple[float, float]:
    """Diameter range (um) of a class in the monolayer (spread 1)."""
    _check_class(cell_class)
    return _DIAMETERS[cell_class]


def _check_class(cell_class: str) -> None:
    if cell_class not in _DIAMETERS:
        raise ParameterError(f"unknown cell class {cell_class!r}; valid classes: {', '.join(ALL_CLASSES)}")


class _Grid:
    """The sprite's pixel grid: absolute pixel centres, and um offsets from the cell centre."""

    def __init__(self, cx_px: float, cy_px: float, mpp: float, radius_um: float):
        half = math.ceil(radius_um / mpp) + 2
        self.x0 = math.floor(cx_px) - half
        self.y0 = math.floor(cy_px) - half
        n = 2 * half + 1
        self.mpp = mpp
        ys = (np.arange(self.y0, self.y0 + n, dtype=np.float32) + 0.5 - np.float32(cy_px)) * np.float32(mpp)
        xs = (np.arange(self.x0, self.x0 + n, dtype=np.float32) + 0.5 - np.float32(cx_px)) * np.float32(mpp)
        self.v, self.u = np.meshgrid(ys, xs, indexing="ij")
        self.shape = (n, n)

    def rotated(self, angle: float) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(angle), math.sin(angle)
        return self.u * c + self.v * s, -self.u * s + self.v * c

    def soft(self, signed_distance_um: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage from a signed distance (negative inside), one pixel wide."""
        return np.clip(0.5 - signed_distance_um / self.mpp, 0.0, 1.0).astype(np.float32)


def _disc(grid: _Grid, x: float, y: float, r: float) -> np.ndarray:
    return grid.soft(np.hypot(grid.u - x, grid.v - y) - r)


def _ellipse(grid: _Grid, x: float, y: float, a: float, b: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    du, dv = grid.u - x, grid.v - y
    p, q = du * c + dv * s, -du * s + dv * c
    rho = np.sqrt((p / a) ** 2 + (q / b) ** 2)
    return grid.soft((rho - 1.0) * min(a, b))


def _texture(rng: np.random.Generator, grid: _Grid, length_um: float, amplitude: float) -> np.ndarray:
    noise = rng.standard_normal(grid.shape).astype(np.float32)
    sigma = max(0.5, length_um / grid.mpp)
    field = cv2.GaussianBlur(noise, (0, 0), sigma)
    field /= max(float(field.std()), 1e-6)
    return np.maximum(1.0 + amplitude * field, 0.0)


def _clumps(rng: np.random.Generator, grid: _Grid, length_um: float, contrast: float) -> np.ndarray:
    """Chromatin density around 1: clumps of about ``length_um`` with steep sides, +- ``contrast``."""
    field = _texture(rng, grid, min(length_um, 0.5), 1.0) - 1.0
    return (1.0 + contrast * np.tanh(1.5 * field)).astype(np.float32)


def _granule_field(
    rng: np.random.Generator, grid: _Grid, region: np.ndarray, size_um: float, cover: float
) -> np.ndarray:
    """Granules packed in a region: blobs of about ``size_um`` covering ``cover`` of it (0-1 values)."""
    field = _texture(rng, grid, size_um / 2, 1.0) - 1.0
    cut = float(np.quantile(field, 1.0 - cover))
    return (np.clip((field - cut) * 3.0, 0.0, 1.0) * region).astype(np.float32)


def _body(rng: np.random.Generator, grid: _Grid, radius: float, hairy: bool) -> np.ndarray:
    phi = np.arctan2(grid.v, grid.u)
    r = np.full(grid.shape, radius, dtype=np.float32)
    for k in (2, 3, 4):
        r += radius * rng.uniform(0.0, 0.04) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    if hairy:
        for k in rng.integers(14, 26, 3):
            r += (
                radius
                * rng.uniform(0.05, 0.1)
                * np.maximum(0.0, np.cos(k * phi + rng.uniform(0, 2 * np.pi))) ** 6
            )
    return grid.soft(np.hypot(grid.u, grid.v) - r)


def _nucleus(rng: np.random.Generator, grid: _Grid, recipe: _Recipe, radius: float) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    frac = rng.uniform(*recipe.nucleus_fraction) if recipe.nucleus_fraction[1] > 0 else 0.6
    rn = radius * frac
    shape = recipe.shape
    if shape == "round":
        off = rng.uniform(0, 0.1) * radius
        return _ellipse(
            grid, off * math.cos(angle), off * math.sin(angle), rn, rn * rng.uniform(0.88, 1.0), angle
        )
    if shape == "eccentric":
        off = radius - rn * rng.uniform(0.9, 1.05)
        return _ellipse(
            grid, off * math.cos(angle), off * math.sin(angle), rn, rn * rng.uniform(0.85, 1.0), angle
        )
    if shape in ("kidney", "indented", "cleft"):
        base = _ellipse(grid, 0.0, 0.0, rn * 1.1, rn * 0.85, angle)
        depth = {"kidney": rng.uniform(0.35, 0.5), "indented": rng.uniform(0.15, 0.25), "cleft": 0.3}[shape]
        notch_r = rn * (0.45 if shape == "cleft" else 0.8)
        nx = (rn * 0.85 + notch_r * (1 - 2 * depth)) * -math.sin(angle)
        ny = (rn * 0.85 + notch_r * (1 - 2 * depth)) * math.cos(angle)
        return np.clip(base - _disc(grid, nx, ny, notch_r), 0.0, 1.0)
    if shape == "band":
        arc_r = radius * rng.uniform(0.42, 0.52)
        thick = rng.uniform(2.0, 2.6)
        span = rng.uniform(0.9, 1.4) * np.pi
        return _arc(grid, arc_r, thick, angle, span)
    if shape in ("lobes", "bilobed"):
        n = int(rng.integers(recipe.lobes[0], recipe.lobes[1] + 1)) if shape == "lobes" else 2
        return _lobes(rng, grid, radius, n, shape == "bilobed")
    if shape == "smear":
        u, v = grid.rotated(angle)
        streak = _texture(rng, grid, 0.4, 0.6)
        blob = grid.soft(np.hypot(u / 1.6, v / 0.8) - radius * 0.55) * streak
        return np.clip(blob, 0.0, 1.2)
    raise AssertionError(shape)


def _arc(grid: _Grid, arc_r: float, thick: float, angle: float, span: float) -> np.ndarray:
    u, v = grid.rotated(angle)
    phi = np.arctan2(v, u)
    rho = np.hypot(u, v)
    inside_span = np.abs(phi) <= span / 2
    radial = np.abs(rho - arc_r) - thick / 2
    # beyond the span, distance to the rounded end caps
    ends = []
    for sign in (-1.0, 1.0):
        ex, ey = arc_r * math.cos(sign * span / 2), arc_r * math.sin(sign * span / 2)
        ends.append(np.hypot(u - ex, v - ey) - thick / 2)
    dist = np.where(inside_span, radial, np.minimum(ends[0], ends[1]))
    return grid.soft(dist)


def _lobes(rng: np.random.Generator, grid: _Grid, radius: float, n: int, folded: bool) -> np.ndarray:
    # Lobes of a segmented neutrophil together make ~1/3 of the cell's area (DESIGN-NOTES section 2).
    lobe_r = radius * (
        rng.uniform(0.32, 0.4) if folded else rng.uniform(0.33, 0.39) * (3.0 / max(n, 3)) ** 0.5
    )
    centres = []
    start = rng.uniform(0, 2 * np.pi)
    ring = radius * (0.28 if folded else 0.5)
    for k in range(n):
        a = start + (k - (n - 1) / 2) * (2 * np.pi / max(n, 3)) * rng.uniform(0.8, 1.1)
        centres.append((ring * math.cos(a), ring * math.sin(a)))
    mask = np.zeros(grid.shape, np.float32)
    for x, y in centres:
        # lobes are elongated along the chain, not round beads
        a = lobe_r * rng.uniform(1.05, 1.3)
        along = math.atan2(y, x) + np.pi / 2 + rng.uniform(-0.4, 0.4)
        mask = np.maximum(mask, _ellipse(grid, x, y, a, lobe_r * rng.uniform(0.72, 0.92), along))
    strand = 0.3 if not folded else lobe_r * 0.8
    for (x1, y1), (x2, y2) in itertools.pairwise(centres):
        mask = np.maximum(mask, _segment(grid, x1, y1, x2, y2, strand))
    return mask


def _segment(grid: _Grid, x1: float, y1: float, x2: float, y2: float, half_width: float) -> np.ndarray:
    dx, dy = x2 - x1, y2 - y1
    length2 = max(dx * dx + dy * dy, 1e-9)
    t = np.clip(((grid.u - x1) * dx + (grid.v - y1) * dy) / length2, 0.0, 1.0)
    d = np.hypot(grid.u - (x1 + t * dx), grid.v - (y1 + t * dy))
    return grid.soft(d - half_width)


def _dots(
    rng: np.random.Generator, grid: _Grid, region: np.ndarray, count: int, radius: tuple[float, float]
) -> np.ndarray:
    """Granules: small soft dots at random points of a region."""
    out = np.zeros(grid.shape, np.float32)
    ys, xs = np.nonzero(region > 0.5)
    if len(ys) == 0 or count == 0:
        return out
    pick = rng.integers(0, len(ys), count)
    for y, x in zip(ys[pick], xs[pick], strict=True):
        r = rng.uniform(*radius)
        half = math.ceil(r / grid.mpp) + 1
        ya, yb = max(0, y - half), min(grid.shape[0], y + half + 1)
        xa, xb = max(0, x - half), min(grid.shape[1], x + half + 1)
        du = grid.u[ya:yb, xa:xb] - grid.u[y, x]
        dv = grid.v[ya:yb, xa:xb] - grid.v[y, x]
        out[ya:yb, xa:xb] = np.maximum(out[ya:yb, xa:xb], grid.soft(np.hypot(du, dv) - r))
    return out


def _red_cell(rng: np.random.Generator, cx: float, cy: float, mpp: float, spread: float) -> CellSprite:
    # Sizes and shapes vary (anisocytosis within normal limits, slightly oval or irregular outlines);
    # a biconcave disc is thick at the rim and thin in the centre, so it shows a dark rim and a pale
    # centre whose size and paleness vary from cell to cell (some hardly any).
    d = float(np.clip(rng.normal(7.9, 0.5), 6.6, 9.0)) * spread
    r = d / 2
    grid = _Grid(cx, cy, mpp, r * 1.2)
    angle = rng.uniform(0, np.pi)
    ecc = rng.uniform(0.86, 1.0)
    u, v = grid.rotated(angle)
    phi = np.arctan2(v, u)
    wobble = 1.0 + sum(rng.uniform(0.0, 0.03) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
    rho = np.hypot(u, v / ecc) / wobble
    body = grid.soft(rho - r)
    t = np.clip(rho / r, 0.0, 1.0)
    strength = rng.uniform(0.85, 1.15) / spread**2
    if spread > 1.1:  # flattened at the feathered edge: no pale centre
        profile = np.full(grid.shape, 0.8, np.float32)
    else:
        centre = rng.uniform(0.4, 1.0)
        inner = rng.uniform(0.1, 0.4)
        outer = inner + rng.uniform(0.25, 0.4)
        ramp = np.clip((t - inner) / (outer - inner), 0.0, 1.0)
        profile = centre + (1.12 - centre) * ramp * ramp * (3 - 2 * ramp)
        # the rim rounds off towards the very edge of the cell
        profile *= 1.0 - 0.3 * np.clip((t - 0.85) / 0.15, 0.0, 1.0) ** 2
    conc = np.zeros((*grid.shape, 3), np.float32)
    conc[..., EOSIN] = body * (strength * profile).astype(np.float32) * _texture(rng, grid, 1.0, 0.04)
    area = float(body.sum()) * mpp * mpp
    return CellSprite(grid.y0, grid.x0, conc, 2 * math.sqrt(area / math.pi), 0.0)


def _platelet(rng: np.random.Generator, cx: float, cy: float, mpp: float, spread: float) -> CellSprite:
    d = rng.uniform(2.0, 3.0) * spread
    grid = _Grid(cx, cy, mpp, d)
    body = _body(rng, grid, d / 2, False)
    # A pale lilac hyalomere with a darker granular centre (granulomere).
    granular = _texture(rng, grid, 0.3, 0.5)
    centre = np.clip(1.0 - np.hypot(grid.u, grid.v) / (d / 2), 0.0, 1.0)
    conc = np.zeros((*grid.shape, 3), np.float32)
    conc[..., CHROMATIN] = body * (0.08 + 0.22 * centre) * granular * rng.uniform(0.7, 1.3)
    conc[..., BLUE] = body * 0.15
    area = float(body.sum()) * mpp * mpp
    return CellSprite(grid.y0, grid.x0, conc, 2 * math.sqrt(area / math.pi), 0.0)


def render_cell(
    cell_class: str, seed: int, cx_px: float, cy_px: float, mpp: float, spread: float = 1.0
) -> CellSprite:
    """Render one cell as a sprite of stain concentrations.

    Parameters
    ----------
    cell_class
        One of :data:`ALL_CLASSES`.
    seed
        The cell's own seed; the sprite is a pure function of the arguments.
    cx_px, cy_px
        Centre in absolute level-0 pixels (continuous: pixel i spans [i, i+1)).
    mpp
        Pixel size, um/px.
    spread
        Flattening in the smear: 1 in the monolayer, > 1 at the feathered edge (larger, paler cells).

    Returns
    -------
    CellSprite
    """
    _check_class(cell_class)
    if not (0.02 <= mpp <= 4.0):
        raise ParameterError(f"mpp must be between 0.02 and 4 um/px, got {mpp}")
    rng = np.random.default_rng(int(seed) & 0xFFFFFFFFFFFFFFFF)
    if cell_class == "red_cell":
        return _red_cell(rng, cx_px, cy_px, mpp, spread)
    if cell_class == "platelet":
        return _platelet(rng, cx_px, cy_px, mpp, spread)
    recipe = _RECIPES[cell_class]
    diameter = rng.uniform(*recipe.diameter) * spread
    radius = diameter / 2
    grid = _Grid(cx_px, cy_px, mpp, radius * (1.3 if recipe.hairy else 1.12))
    paleness = 1.0 / spread**2
    nucleus = _nucleus(rng, grid, recipe, radius)
    body = (
        _body(rng, grid, radius, recipe.hairy)
        if recipe.shape != "smear"
        else np.zeros(grid.shape, np.float32)
    )
    body = np.maximum(body, np.minimum(nucleus, 1.0))
    conc = np.zeros((*grid.shape, 3), np.float32)
    cyto = np.asarray(recipe.cytoplasm, np.float32) * rng.uniform(0.85, 1.15)
    conc += body[..., None] * cyto * _texture(rng, grid, 0.8, 0.08)[..., None]
    if recipe.rim_blue:
        rim = np.clip(np.hypot(grid.u, grid.v) / radius, 0, 1) ** 3
        conc[..., BLUE] += body * rim * recipe.rim_blue
    cytoplasm = np.clip(body - nucleus, 0.0, 1.0)
    if recipe.hof:
        # the pale Golgi zone beside the eccentric nucleus, towards the cell centre
        conc *= (1.0 - 0.45 * _disc(grid, 0.0, 0.0, radius * 0.3) * cytoplasm)[..., None]
    n_vac = int(rng.integers(recipe.vacuoles[0], recipe.vacuoles[1] + 1))
    if n_vac:
        vacuoles = _dots(rng, grid, cytoplasm, n_vac, (0.5, 1.0))
        conc *= (1.0 - 0.8 * vacuoles)[..., None]
    chromatin = (
        recipe.chromatin * rng.uniform(0.9, 1.1) * _clumps(rng, grid, recipe.texture_um, recipe.clumping)
    )
    # Chromatin condenses under the nuclear membrane: a darker, sharp outline.
    solid = (nucleus > 0.5).astype(np.uint8)
    inner = cv2.erode(solid, np.ones((3, 3), np.uint8), iterations=max(1, round(0.4 / grid.mpp)))
    chromatin *= 1.0 + 0.15 * (solid - inner)
    nuc_conc = np.zeros_like(conc)
    nuc_conc[..., CHROMATIN] = chromatin
    nuc_conc[..., BLUE] = 0.15
    n_nucleoli = int(rng.integers(recipe.nucleoli[0], recipe.nucleoli[1] + 1))
    if n_nucleoli:
        inner = np.clip(nucleus * 1.0, 0, 1) * (np.hypot(grid.u, grid.v) < radius * 0.45)
        pale = _dots(rng, grid, inner, n_nucleoli, (0.6, 1.0))
        nuc_conc[..., CHROMATIN] *= 1.0 - 0.45 * pale
        nuc_conc[..., BLUE] += 0.25 * pale
    nucleus = np.clip(nucleus, 0.0, 1.2)
    conc = conc * (1.0 - np.minimum(nucleus, 1.0))[..., None] + nuc_conc * nucleus[..., None]
    count = int(rng.integers(recipe.granule_count[0], recipe.granule_count[1] + 1))
    if recipe.granules and count:
        region = body if recipe.granules in ("basophil", "azurophil") else cytoplasm
        colour, size = {
            "fine": ((0.35, 0.05, 0.12), (0.15, 0.25)),
            "dust": ((0.1, 0.05, 0.2), (0.12, 0.2)),
            "azurophil": ((0.3, 0.0, 0.9), (0.2, 0.35)),
            "eosinophil": ((1.6, 0.0, 0.12), (0.26, 0.38)),
            "basophil": ((0.1, 0.3, 1.3), (0.3, 0.5)),
        }[recipe.granules]
        if recipe.granules in _PACKED:
            # Fine neutrophil granules: a field of small blobs, too many to draw one by one.
            size_um, cover = _PACKED[recipe.granules]
            granules = _granule_field(rng, grid, region, size_um, cover)
        else:
            granules = _dots(rng, grid, region, count, size)
        conc += granules[..., None] * np.asarray(colour, np.float32)
    n_rods = int(rng.integers(recipe.auer_rods[0], recipe.auer_rods[1] + 1))
    for _ in range(n_rods):
        a = rng.uniform(0, np.pi)
        ln = rng.uniform(2.5, 5.0)
        ox, oy = rng.uniform(-0.5, 0.5, 2) * radius
        rod = _segment(
            grid,
            ox - ln / 2 * math.cos(a),
            oy - ln / 2 * math.sin(a),
            ox + ln / 2 * math.cos(a),
            oy + ln / 2 * math.sin(a),
            0.22,
        )
        conc[..., CHROMATIN] += rod * 1.2 * cytoplasm.clip(0.3, 1)
        conc[..., EOSIN] += rod * 0.6
    conc *= paleness
    conc = np.clip(conc, 0.0, None).astype(np.float32)
    area = float(body.sum()) * mpp * mpp
    nucleus_area = float(np.minimum(nucleus, 1.0).sum()) * mpp * mpp
    return CellSprite(grid.y0, grid.x0, conc, 2 * math.sqrt(area / math.pi), nucleus_area)
