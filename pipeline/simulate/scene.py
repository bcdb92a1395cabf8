"""The smear: where every cell lies, in physical units, keyed so any tile can regenerate its part.

A wedge smear thins from a thick head (overlapping red cells, rouleaux) through the monolayer (red cells
just touching: the reading area) to a feathered edge (sparse, flattened cells, large white cells
gathering). Position along the smear is the coordinate ``s``: 0 at the drop of blood, 1 at the feathered
tip. A simulated slide is a window of the smear (``placement``) or the whole smear.

Every random choice is keyed by absolute position (lattice sites for red cells, 500-um blocks for
sparse objects), so the scene is a pure function of the seed and the same cell is drawn the same on
every tile that touches it.

Densities: cells per mm^2 of monolayer = cells per uL x ``FILM_DEPTH_UM`` x 1e-3 (a film equivalent to
2.2 um of blood), which gives about 11,000 red cells and 8-28 white cells per mm^2 for normal blood
(DESIGN-NOTES.md section 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from ..errors import ParameterError
from ._hash import block_rng, hash_uniform
from .cells import MLL23_CLASSES, class_diameter_range_um
from .presets import ARTEFACTS, PLACEMENTS, BloodPreset

_T = TypeVar("_T")

ZONES = ("thick", "monolayer", "feathered", "glass")

FILM_DEPTH_UM = 2.2
SMEAR_LENGTH_UM = 45_000.0
BLOCK_UM = 500.0
#: Zone limits along the smear coordinate s.
THICK_END_S = 0.2
FEATHER_START_S = 0.8
#: Red cells are pushed aside by white cells where the film is this thin or thinner.
PUSH_ASIDE_MAX_THICKNESS = 1.3
RBC_DIAMETER_UM = 7.6
#: Large cells that gather in the feathered edge, and how much more often they appear there.
EDGE_SEEKING_CLASSES = frozenset(
    {
        "monocyte",
        "segmented_neutrophil",
        "band_neutrophil",
        "eosinophil",
        "myelocyte",
        "metamyelocyte",
        "promyelocyte",
        "atypical_promyelocyte",
        "myeloblast",
    }
)
EDGE_ENRICHMENT = 2.5
N_RBC_VARIANTS = 64
N_PLATELET_VARIANTS = 32

# Hash streams: one per independent random choice.
_S_OCC, _S_JX, _S_JY, _S_VAR, _S_ROUL, _S_ROUL_N, _S_ROUL_ANG, _S_LAYER = range(1, 9)
_B_NUCLEATED, _B_PLATELET, _B_PHASES = 101, 102, 103


@dataclass(frozen=True)
class NucleatedCells:
    """Nucleated cells of a region (parallel arrays)."""

    x_um: np.ndarray
    y_um: np.ndarray
    class_index: np.ndarray  # index into MLL23_CLASSES
    seed: np.ndarray  # uint64 sprite seeds
    spread: np.ndarray
    block_x: np.ndarray
    block_y: np.ndarray
    index_in_block: np.ndarray

    def __len__(self) -> int:
        return len(self.x_um)


@dataclass(frozen=True)
class SimpleObjects:
    """Red cells or platelets of a region: centres in um, a sprite-bank variant each."""

    x_um: np.ndarray
    y_um: np.ndarray
    variant: np.ndarray

    def __len__(self) -> int:
        return len(self.x_um)


@dataclass(frozen=True)
class SceneSpec:
    """Everything that defines a simulated slide (the scene is a pure function of it).

    Attributes
    ----------
    width_px, height_px
        Level-0 size in pixels.
    mpp
        Level-0 pixel size in um/px.
    seed
        Random seed; the same spec gives the same slide bit for bit.
    preset
        Blood counts and differential.
    placement
        Which part of the smear the window shows: one of :data:`PLACEMENTS`.
    artefacts
        Which artefacts of :data:`~pipeline.simulate.presets.ARTEFACTS` the slide has.
    """

    width_px: int
    height_px: int
    mpp: float
    seed: int
    preset: BloodPreset
    placement: str = "monolayer"
    artefacts: frozenset[str] = frozenset(ARTEFACTS)

    @property
    def width_um(self) -> float:
        return self.width_px * self.mpp

    @property
    def height_um(self) -> float:
        return self.height_px * self.mpp


@dataclass
class Scene:
    """A smear window: density profile, placement of all objects, keyed by absolute position."""

    spec: SceneSpec
    _class_cdf: np.ndarray = field(init=False, repr=False)
    _edge_class_cdf: np.ndarray = field(init=False, repr=False)
    _phases: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        spec = self.spec
        if spec.placement not in PLACEMENTS:
            raise ParameterError(
                f"unknown placement {spec.placement!r}; choose one of: {', '.join(PLACEMENTS)}"
            )
        diff = spec.preset.normalised_differential()
        unknown = sorted(set(diff) - set(MLL23_CLASSES))
        if unknown:
            raise ParameterError(f"preset {spec.preset.name!r} names unknown classes: {unknown}")
        weights = np.array([diff.get(name, 0.0) for name in MLL23_CLASSES])
        self._class_cdf = np.cumsum(weights) / weights.sum()
        edge = weights * np.array(
            [EDGE_ENRICHMENT if n in EDGE_SEEKING_CLASSES else 1.0 for n in MLL23_CLASSES]
        )
        self._edge_class_cdf = np.cumsum(edge) / edge.sum()
        rng = block_rng(spec.seed, _B_PHASES)
        # Low-frequency density modulation: a few plane waves of 0.3-3 mm wavelength.
        n_waves = 6
        wavelength = rng.uniform(300.0, 3000.0, n_waves)
        angle = rng.uniform(0, 2 * np.pi, n_waves)
        self._phases = np.stack(
            [
                2 * np.pi / wavelength * np.cos(angle),
                2 * np.pi / wavelength * np.sin(angle),
                rng.uniform(0, 2 * np.pi, n_waves),
            ],
            axis=1,
        )
        self._tip_wave = rng.uniform(0, 2 * np.pi, 2)

    # ----------------------------------------------------------------------------------- geometry
    def smear_coordinate(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Position along the smear (0: drop of blood, 1: feathered tip) of points in um."""
        spec = self.spec
        x = np.asarray(x_um, dtype=np.float64)
        y = np.asarray(y_um, dtype=np.float64)
        if spec.placement == "whole":
            s = (x - 0.15 * spec.width_um) / (0.70 * spec.width_um)
        elif spec.placement == "across":
            s = -0.02 + 1.07 * x / spec.width_um
        else:
            centre = {"monolayer": 0.5, "thick": 0.08, "feathered": 0.9}[spec.placement]
            s = centre + (x - spec.width_um / 2) / SMEAR_LENGTH_UM
        return s + 0 * y

    def _tip_s(self, y_um: np.ndarray) -> np.ndarray:
        """Where the feathered edge ends, along the smear; it undulates and is tongue-shaped."""
        spec = self.spec
        y = np.asarray(y_um, dtype=np.float64)
        tip = 1.0 + 0.015 * np.sin(2 * np.pi * y / 2500.0 + self._tip_wave[0])
        tip = tip + 0.008 * np.sin(2 * np.pi * y / 700.0 + self._tip_wave[1])
        if spec.placement == "whole":
            rel = (y - spec.height_um / 2) / (0.44 * spec.height_um)
            tip = tip - 0.15 * rel**2
        return tip

    def thickness(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Relative film thickness (1 = monolayer, 3 = thick head, -> 0 at the feathered tip)."""
        x = np.asarray(x_um, dtype=np.float64)
        y = np.asarray(y_um, dtype=np.float64)
        s = self.smear_coordinate(x, y)
        f = np.interp(s, [0.0, 0.12, THICK_END_S, FEATHER_START_S], [3.0, 3.0, 1.0, 0.75])
        feather = 0.75 * np.exp(-(s - FEATHER_START_S) / 0.06)
        f = np.where(s > FEATHER_START_S, feather, f)
        f = np.where((s < 0.0) | (s > self._tip_s(y)), 0.0, f)
        if self.spec.placement == "whole":
            rel = np.abs(y - self.spec.height_um / 2) / (0.44 * self.spec.height_um)
            f = np.where(rel > 1.0, 0.0, f)
        return f * self._modulation(x, y)

    def _modulation(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        kx, ky, phase = self._phases[:, 0], self._phases[:, 1], self._phases[:, 2]
        waves = np.sin(x[..., None] * kx + y[..., None] * ky + phase).sum(axis=-1)
        return 1.0 + 0.10 * waves / np.sqrt(len(phase))

    def zone(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Zone name of points: thick, monolayer, feathered or glass."""
        x = np.asarray(x_um, dtype=np.float64)
        y = np.asarray(y_um, dtype=np.float64)
        s = self.smear_coordinate(x, y)
        f = self.thickness(x, y)
        # The thick zone is where red cells lie on top of each other (white cells cannot push them aside).
        thick = (s < THICK_END_S) & (f > PUSH_ASIDE_MAX_THICKNESS)
        out = np.where(thick, "thick", np.where(s < FEATHER_START_S, "monolayer", "feathered"))
        return np.where(f <= 0.0, "glass", out)

    def spread(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """How flattened cells are: 0.9 in the thick head, 1 in the monolayer, up to 1.4 at the tip."""
        s = self.smear_coordinate(np.asarray(x_um, dtype=np.float64), np.asarray(y_um, dtype=np.float64))
        return np.interp(s, [0.1, THICK_END_S, FEATHER_START_S, 1.0], [0.9, 1.0, 1.0, 1.4])

    # ------------------------------------------------------------------------------ red cells
    @property
    def rbc_spacing_um(self) -> float:
        """Hexagonal lattice pitch giving the preset's red-cell density at thickness 1."""
        per_um2 = self.spec.preset.rbc_per_ul * FILM_DEPTH_UM * 1e-3 / 1e6
        site_density = per_um2 / 0.92  # at thickness 1, 92 % of sites hold a cell
        return math.sqrt(2.0 / (math.sqrt(3.0) * site_density))

    def red_cells(
        self, x0_um: float, y0_um: float, x1_um: float, y1_um: float, nucleated: NucleatedCells
    ) -> SimpleObjects:
        """Red cells whose centre lies in [x0, x1) x [y0, y1), all layers, rouleaux included.

        ``nucleated`` are the white cells near the region; red cells are pushed away from them where the
        film is thin enough for cells to move (monolayer, feathered edge).
        """
        a = self.rbc_spacing_um
        row_h = a * math.sqrt(3.0) / 2.0
        margin = a  # jitter and rouleau extent can move a centre by up to ~a
        j0 = math.floor((y0_um - margin) / row_h)
        j1 = math.ceil((y1_um + margin) / row_h)
        i0 = math.floor((x0_um - margin) / a) - 1
        i1 = math.ceil((x1_um + margin) / a) + 1
        jj, ii = np.meshgrid(np.arange(j0, j1 + 1), np.arange(i0, i1 + 1), indexing="ij")
        jj = jj.ravel()
        ii = ii.ravel()
        xs_all, ys_all, var_all = [], [], []
        seed = self.spec.seed
        for layer in range(3):
            # Each layer is the same lattice shifted by a per-layer offset.
            off = hash_uniform(seed, _S_LAYER, layer, np.arange(2))
            bx = (ii + 0.5 * (jj & 1) + off[0]) * a
            by = (jj + off[1]) * row_h
            jx = (hash_uniform(seed, _S_JX, layer, ii, jj) - 0.5) * 0.5 * a
            jy = (hash_uniform(seed, _S_JY, layer, ii, jj) - 0.5) * 0.5 * a
            x = bx + jx
            y = by + jy
            f = self.thickness(x, y)
            occupancy = np.clip(f - layer, 0.0, 1.0) * 0.92
            # Hashes are drawn only for sites that may hold a cell (the same values: a site's hash
            # depends on its indices alone): the upper layers of a monolayer are all but empty.
            keep = occupancy > 0.0
            keep[keep] = hash_uniform(seed, _S_OCC, layer, ii[keep], jj[keep]) < occupancy[keep]
            x, y, f = x[keep], y[keep], f[keep]
            ki, kj = ii[keep], jj[keep]
            variant = (hash_uniform(seed, _S_VAR, layer, ki, kj) * N_RBC_VARIANTS).astype(np.int64)
            # Rouleaux: stacks of red cells where the film is thick.
            roul = (f > 1.8) & (hash_uniform(seed, _S_ROUL, layer, ki, kj) < 0.25)
            if roul.any():
                n = 3 + (hash_uniform(seed, _S_ROUL_N, layer, ki[roul], kj[roul]) * 5).astype(np.int64)
                ang = hash_uniform(seed, _S_ROUL_ANG, layer, ki[roul], kj[roul]) * np.pi
                step = 0.3 * RBC_DIAMETER_UM
                rx, ry, rv = [], [], []
                for cx, cy, cn, ca, cv in zip(x[roul], y[roul], n, ang, variant[roul], strict=True):
                    t = (np.arange(cn) - (cn - 1) / 2) * step
                    rx.append(cx + t * np.cos(ca))
                    ry.append(cy + t * np.sin(ca))
                    rv.append((cv + np.arange(cn) * 7) % N_RBC_VARIANTS)
                x = np.concatenate([x[~roul], *rx])
                y = np.concatenate([y[~roul], *ry])
                variant = np.concatenate([variant[~roul], *rv])
            xs_all.append(x)
            ys_all.append(y)
            var_all.append(variant)
        x = np.concatenate(xs_all)
        y = np.concatenate(ys_all)
        variant = np.concatenate(var_all)
        inside = (x >= x0_um) & (x < x1_um) & (y >= y0_um) & (y < y1_um)
        x, y, variant = x[inside], y[inside], variant[inside]
        if len(nucleated) and len(x):
            x, y, variant = self._push_aside(x, y, variant, nucleated)
        return SimpleObjects(x, y, variant)

    def _push_aside(
        self, x: np.ndarray, y: np.ndarray, variant: np.ndarray, nucleated: NucleatedCells
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Brute force over the few white cells near a region (tens) rather than a k-d tree: as fast,
        # and a render worker need not import scipy (0.3-0.6 s of every worker's start).
        thin = self.thickness(x, y) <= PUSH_ASIDE_MAX_THICKNESS
        radius = self.nucleated_radius_um(nucleated) + 0.45 * RBC_DIAMETER_UM
        drop = np.zeros(len(x), dtype=bool)
        candidates = np.flatnonzero(thin)
        step = max(1, 1_000_000 // max(1, len(nucleated)))  # bounded memory: a million distances at a time
        for start in range(0, len(candidates), step):
            k = candidates[start : start + step]
            d = np.hypot(nucleated.x_um[None, :] - x[k, None], nucleated.y_um[None, :] - y[k, None])
            drop[k] = (d < radius[None, :]).any(axis=1)
        return x[~drop], y[~drop], variant[~drop]

    @staticmethod
    def nucleated_radius_um(cells: NucleatedCells) -> np.ndarray:
        """Upper radius of each nucleated cell's class, times its spread (for spacing decisions)."""
        upper = np.array([class_diameter_range_um(name)[1] for name in MLL23_CLASSES])
        return 0.5 * upper[cells.class_index] * cells.spread

    # ------------------------------------------------------------------------ sparse objects
    def _block_densities(self, bx: int, by: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Candidate points of a block and the film thickness there (for Poisson thinning)."""
        gx = (bx + (np.arange(9) + 0.5) / 9) * BLOCK_UM
        gy = (by + (np.arange(9) + 0.5) / 9) * BLOCK_UM
        xx, yy = np.meshgrid(gx, gy)
        f = self.thickness(xx, yy)
        s = self.smear_coordinate(xx, yy)
        return xx, yy, float(f.max()), float(s.max())

    def _wbc_density_factor(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """White cells per unit blood thickness; they decay more slowly than red cells at the edge."""
        f = self.thickness(x, y)
        s = self.smear_coordinate(x, y)
        edge = 0.9 * np.exp(-(s - FEATHER_START_S) / 0.15) * self._modulation(x, y)
        edge = np.where(f > 0, edge, 0.0)
        return np.where(s > FEATHER_START_S, np.maximum(f, edge), f)

    def nucleated_in_block(self, bx: int, by: int) -> NucleatedCells:
        """Nucleated cells of one 500-um block, after hard-core thinning.

        In the monolayer and the feathered edge cells lie side by side, not on top of each other: a cell
        is removed when it would overlap a neighbour with a smaller random mark (Matern type II). The
        rule only looks at the 3 x 3 blocks around, so every tile sees the same cells.
        """
        cells, marks = self._raw_nucleated(bx, by)
        if not len(cells):
            return cells
        near = [self._raw_nucleated(bx + i, by + j) for j in (-1, 0, 1) for i in (-1, 0, 1)]
        others = _concat_nucleated([c for c, _ in near])
        other_marks = np.concatenate([m for _, m in near])
        radius = self.nucleated_radius_um(cells)
        other_radius = self.nucleated_radius_um(others)
        thin = self.thickness(cells.x_um, cells.y_um) <= PUSH_ASIDE_MAX_THICKNESS
        drop = np.zeros(len(cells), dtype=bool)
        for k in np.flatnonzero(thin):
            d = np.hypot(others.x_um - cells.x_um[k], others.y_um - cells.y_um[k])
            # the rims may touch (0.9): cells in a smear press against each other
            conflict = (d < 0.9 * (radius[k] + other_radius)) & (other_marks < marks[k])
            drop[k] = bool(conflict.any())
        return select_cells(cells, ~drop)

    def _raw_nucleated(self, bx: int, by: int) -> tuple[NucleatedCells, np.ndarray]:
        """Nucleated cells of a block before hard-core thinning, with their thinning marks (cached)."""
        return self._per_block("_raw_cache", bx, by, self._draw_nucleated)

    def _draw_nucleated(self, bx: int, by: int) -> tuple[NucleatedCells, np.ndarray]:
        """An inhomogeneous Poisson process of nucleated cells in one block, by thinning."""
        spec = self.spec
        rng = block_rng(spec.seed, _B_NUCLEATED, bx, by)
        per_um2 = spec.preset.wbc_per_ul * FILM_DEPTH_UM * 1e-3 / 1e6
        peak = 3.3 * 1.15  # the largest thickness factor, with modulation
        n = rng.poisson(per_um2 * peak * BLOCK_UM**2)
        x = (bx + rng.random(n)) * BLOCK_UM
        y = (by + rng.random(n)) * BLOCK_UM
        u_keep = rng.random(n)
        u_class = rng.random(n)
        seeds = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64).astype(np.uint64)
        u_spread = rng.normal(0.0, 0.04, n)
        marks = rng.random(n)
        inside = (x >= 0) & (y >= 0) & (x < spec.width_um) & (y < spec.height_um)
        keep = (u_keep < self._wbc_density_factor(x, y) / peak) & inside
        s = self.smear_coordinate(x, y)
        cdf = np.where((s > FEATHER_START_S)[:, None], self._edge_class_cdf, self._class_cdf)
        class_index = np.minimum((u_class[:, None] > cdf).sum(axis=1), len(MLL23_CLASSES) - 1)
        spread = self.spread(x, y) * np.exp(u_spread)
        idx = np.flatnonzero(keep)
        cells = NucleatedCells(
            x_um=x[idx],
            y_um=y[idx],
            class_index=class_index[idx],
            seed=seeds[idx],
            spread=spread[idx],
            block_x=np.full(len(idx), bx),
            block_y=np.full(len(idx), by),
            index_in_block=idx,
        )
        return cells, marks[idx]

    def platelets_in_block(self, bx: int, by: int) -> SimpleObjects:
        """Platelets of one 500-um block (cached: every render chunk in it draws them again)."""
        return self._per_block("_platelet_cache", bx, by, self._draw_platelets)

    def _per_block(self, name: str, bx: int, by: int, draw: Callable[[int, int], _T]) -> _T:
        """``draw(bx, by)``, kept in this scene's cache ``name`` of the last few hundred blocks.

        The value drawn or found is returned, never looked up again: threads of one worker share the
        scene, and another thread may clear the cache in between.
        """
        cache = self.__dict__.setdefault(name, {})
        value = cache.get((bx, by))
        if value is None:
            value = draw(bx, by)
            if len(cache) > 256:
                cache.clear()
            cache[bx, by] = value
        return value

    def _draw_platelets(self, bx: int, by: int) -> SimpleObjects:
        spec = self.spec
        rng = block_rng(spec.seed, _B_PLATELET, bx, by)
        per_um2 = spec.preset.platelets_per_ul * FILM_DEPTH_UM * 1e-3 / 1e6
        peak = 3.3 * 1.15
        n = rng.poisson(per_um2 * peak * BLOCK_UM**2)
        x = (bx + rng.random(n)) * BLOCK_UM
        y = (by + rng.random(n)) * BLOCK_UM
        keep = rng.random(n) < self.thickness(x, y) / peak
        variant = rng.integers(0, N_PLATELET_VARIANTS, n)
        return SimpleObjects(x[keep], y[keep], variant[keep])

    def blocks_overlapping(
        self, x0_um: float, y0_um: float, x1_um: float, y1_um: float
    ) -> list[tuple[int, int]]:
        """Indices of the blocks of the slide that intersect a rectangle."""
        nbx = math.ceil(self.spec.width_um / BLOCK_UM)
        nby = math.ceil(self.spec.height_um / BLOCK_UM)
        bx0 = max(0, math.floor(x0_um / BLOCK_UM))
        by0 = max(0, math.floor(y0_um / BLOCK_UM))
        bx1 = min(nbx - 1, math.floor(x1_um / BLOCK_UM))
        by1 = min(nby - 1, math.floor(y1_um / BLOCK_UM))
        return [(bx, by) for by in range(by0, by1 + 1) for bx in range(bx0, bx1 + 1)]

    def nucleated_in_rect(self, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> NucleatedCells:
        """Nucleated cells whose centre lies in [x0, x1) x [y0, y1)."""
        parts = [
            self.nucleated_in_block(bx, by) for bx, by in self.blocks_overlapping(x0_um, y0_um, x1_um, y1_um)
        ]
        cells = _concat_nucleated(parts)
        inside = (cells.x_um >= x0_um) & (cells.x_um < x1_um) & (cells.y_um >= y0_um) & (cells.y_um < y1_um)
        return select_cells(cells, inside)

    def platelets_in_rect(self, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> SimpleObjects:
        """Platelets whose centre lies in [x0, x1) x [y0, y1)."""
        parts = [
            self.platelets_in_block(bx, by) for bx, by in self.blocks_overlapping(x0_um, y0_um, x1_um, y1_um)
        ]
        x = np.concatenate([p.x_um for p in parts]) if parts else np.zeros(0)
        y = np.concatenate([p.y_um for p in parts]) if parts else np.zeros(0)
        v = np.concatenate([p.variant for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        inside = (x >= x0_um) & (x < x1_um) & (y >= y0_um) & (y < y1_um)
        return SimpleObjects(x[inside], y[inside], v[inside])


def _concat_nucleated(parts: list[NucleatedCells]) -> NucleatedCells:
    names = NucleatedCells.__dataclass_fields__
    if not parts:
        empty = {name: np.zeros(0) for name in names}
        empty["class_index"] = np.zeros(0, dtype=np.int64)
        empty["seed"] = np.zeros(0, dtype=np.uint64)
        return NucleatedCells(**empty)
    return NucleatedCells(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in names})


def select_cells(cells: NucleatedCells, mask: np.ndarray) -> NucleatedCells:
    """The cells where ``mask`` is true."""
    return NucleatedCells(
        **{name: getattr(cells, name)[mask] for name in NucleatedCells.__dataclass_fields__}
    )
