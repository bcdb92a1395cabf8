"""Render one region of a simulated slide: sprites -> optical density -> light -> blur -> camera.

``render_region`` is a pure function of the scene and the region: a region rendered alone equals the
same pixels of any larger region (before JPEG), because objects, blur, illumination and noise are all
keyed by absolute position and the blur gets its halo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import cv2
import numpy as np

from ._hash import block_rng
from .artefacts import add_edge_and_label, artefact_sprites, unscanned_fields
from .cells import MAX_DIAMETER_UM, MLL23_CLASSES, CellSprite, render_cell
from .optics import (
    Optics,
    add_sensor_noise,
    blur_core,
    blur_halo_px,
    draw_optics,
    noise_bank,
    psf_pad_px,
    psf_sprite,
    smooth_fields,
    workspace,
)
from .scene import (
    N_PLATELET_VARIANTS,
    N_RBC_VARIANTS,
    NucleatedCells,
    Scene,
    SceneSpec,
    SimpleObjects,
    select_cells,
)
from .stain import slide_stain_matrix

_LN10 = math.log(10.0)
_B_BANK, _B_STAIN = 301, 302


@dataclass
class SlideModel:
    """A scene plus its stain and optics: everything needed to render any region."""

    spec: SceneSpec
    scene: Scene = field(init=False)
    optics: Optics = field(init=False)
    stain_matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.scene = Scene(self.spec)
        spec = self.spec
        self.optics = draw_optics(
            spec.seed,
            spec.mpp,
            spec.width_px,
            spec.height_px,
            focus="focus" in spec.artefacts,
            seams="seams" in spec.artefacts,
        )
        self.stain_matrix = slide_stain_matrix(block_rng(self.spec.seed, _B_STAIN))

    def od_bank(self, kind: str, n: int, spread: float) -> OdBank:
        """Red-cell or platelet variants as optical density sprites in this slide's stain."""
        return _od_bank(self.spec.seed, self.spec.mpp, kind, n, spread, self.stain_matrix.tobytes())

    @cached_property
    def bank_reach_px(self) -> int:
        """How far (px) from its centre pixel any red-cell or platelet sprite of this slide reaches."""
        banks = [self.od_bank("red_cell", N_RBC_VARIANTS, s) for s in _RBC_BANK_SPREADS]
        banks.append(self.od_bank("platelet", N_PLATELET_VARIANTS, 1.0))
        return max(
            int(
                max(
                    (-bank.y0).max(),
                    (-bank.x0).max(),
                    (bank.y0 + bank.height).max(),
                    (bank.x0 + bank.width).max(),
                )
            )
            for bank in banks
        )


@dataclass(frozen=True)
class OdBank:
    """Pre-rendered variants as optical density sprites: variant ``v`` is ``sprites[v]``, its top-left
    pixel ``(y0[v], x0[v])`` relative to the pixel holding the object's centre."""

    sprites: tuple[np.ndarray, ...]
    y0: np.ndarray
    x0: np.ndarray
    height: np.ndarray
    width: np.ndarray


@lru_cache(maxsize=8)
def _od_bank(seed: int, mpp: float, kind: str, n: int, spread: float, stain_matrix: bytes) -> OdBank:
    # Module level, not on the model: a worker receives a fresh copy of the model with every task.
    matrix = np.frombuffer(stain_matrix, dtype=np.float32).reshape(3, 3)
    placed = [
        _cropped(*psf_sprite(s.y0, s.x0, _to_od(s.conc, matrix), mpp))
        for s in _sprite_bank(seed, mpp, kind, n, spread)
    ]
    sprites = tuple(od for _, _, od in placed)
    return OdBank(
        sprites=sprites,
        y0=np.array([y0 for y0, _, _ in placed], dtype=np.int64),
        x0=np.array([x0 for _, x0, _ in placed], dtype=np.int64),
        height=np.array([od.shape[0] for od in sprites], dtype=np.int64),
        width=np.array([od.shape[1] for od in sprites], dtype=np.int64),
    )


def warm_banks(seed: int, mpp: float) -> None:
    """Build (and cache) the red-cell, platelet and noise banks of slide ``seed`` at ``mpp``, as the
    first region a process renders would."""
    stain = slide_stain_matrix(block_rng(seed, _B_STAIN)).tobytes()
    for spread in _RBC_BANK_SPREADS:
        _od_bank(seed, mpp, "red_cell", N_RBC_VARIANTS, spread, stain)
    _od_bank(seed, mpp, "platelet", N_PLATELET_VARIANTS, 1.0, stain)
    noise_bank(seed)


def _cropped(y0: int, x0: int, od: np.ndarray) -> tuple[int, int, np.ndarray]:
    """A sprite cut to the bounding box of its non-zero pixels (a red cell's square grid is half empty:
    pasting its zeros, a thousand times per megapixel, cost a third of the pasting)."""
    ys, xs = np.nonzero(od.any(axis=2))
    if not len(ys):
        return y0, x0, od[:0, :0]
    ya, yb, xa, xb = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return y0 + int(ya), x0 + int(xa), np.ascontiguousarray(od[ya:yb, xa:xb])


def _to_od(conc: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Stain concentrations ``(h, w, 3)`` to RGB optical density (Beer-Lambert: a linear map)."""
    return cv2.transform(np.ascontiguousarray(conc, dtype=np.float32), stain_matrix.T.astype(np.float32))


@dataclass(frozen=True)
class RenderedRegion:
    """Pixels of a region and what was drawn in it.

    ``cells`` lists nucleated cells whose centre lies in the region (not the halo) with their drawn
    size; ``red_cells`` and ``platelets`` count the centres in the region.
    """

    rgb: np.ndarray
    cells: NucleatedCells
    diameter_um: np.ndarray
    nucleus_area_um2: np.ndarray
    red_cells: int
    platelets: int
    red_cell_zones: dict[str, int]


@lru_cache(maxsize=4)
def _sprite_bank(seed: int, mpp: float, kind: str, n: int, spread: float) -> tuple[CellSprite, ...]:
    """Pre-rendered red-cell or platelet variants, centred on pixel (0, 0)'s centre."""
    # A stable key: Python's own hash() of a string differs between worker processes.
    kind_key = {"red_cell": 1, "platelet": 2}[kind]
    seeds = block_rng(seed, _B_BANK, kind_key, round(spread * 1000)).integers(0, 2**62, n)
    return tuple(render_cell(kind, int(s), 0.5, 0.5, mpp, spread) for s in seeds)


@lru_cache(maxsize=64)
def _cell_od(
    class_index: int, seed: int, cx_px: float, cy_px: float, mpp: float, spread: float, stain_matrix: bytes
) -> tuple[int, int, np.ndarray, float, float]:
    """A white cell's optical density sprite with the PSF: ``(y0, x0, od, diameter_um, nucleus_area_um2)``.

    Cached: a cell on a chunk border is drawn by each chunk it reaches, and a task renders neighbouring
    chunks one after another.
    """
    sprite = render_cell(MLL23_CLASSES[class_index], seed, cx_px, cy_px, mpp, spread)
    matrix = np.frombuffer(stain_matrix, dtype=np.float32).reshape(3, 3)
    y0, x0, od = psf_sprite(sprite.y0, sprite.x0, _to_od(sprite.conc, matrix), mpp)
    return y0, x0, od, sprite.diameter_um, sprite.nucleus_area_um2


def simple_object_diameters_um(
    model: SlideModel, red: SimpleObjects, platelets: SimpleObjects
) -> tuple[np.ndarray, np.ndarray]:
    """Drawn diameters (um) of red cells and platelets, as :func:`render_region` draws them."""
    spreads = _red_cell_spreads(model.scene.spread(red.x_um, red.y_um))
    red_d = np.zeros(len(red))
    for spread in np.unique(spreads):
        bank = _sprite_bank(model.spec.seed, model.spec.mpp, "red_cell", N_RBC_VARIANTS, float(spread))
        sizes = np.array([s.diameter_um for s in bank])
        mask = spreads == spread
        red_d[mask] = sizes[red.variant[mask]]
    bank = _sprite_bank(model.spec.seed, model.spec.mpp, "platelet", N_PLATELET_VARIANTS, 1.0)
    plt_d = np.array([s.diameter_um for s in bank])[platelets.variant] if len(platelets) else np.zeros(0)
    return red_d, plt_d


#: The spreads of the red-cell sprite banks: normal, flattened (feathered edge), contracted (thick zone).
_RBC_BANK_SPREADS = (1.0, 1.25, 0.92)


def _red_cell_spreads(spreads: np.ndarray) -> np.ndarray:
    """The sprite bank (by its spread) each red cell is drawn from: flattened, contracted or normal."""
    return np.where(spreads > 1.1, 1.25, np.where(spreads < 0.95, 0.92, 1.0))


def _paste(canvas: np.ndarray, cy0: int, cx0: int, sprite: np.ndarray, sy0: int, sx0: int) -> None:
    """Add a sprite whose top-left is absolute (sy0, sx0) into a canvas whose top-left is (cy0, cx0)."""
    h, w = canvas.shape[:2]
    y0, x0 = sy0 - cy0, sx0 - cx0
    ya, xa = max(0, y0), max(0, x0)
    yb, xb = min(h, y0 + sprite.shape[0]), min(w, x0 + sprite.shape[1])
    if ya >= yb or xa >= xb:
        return
    view = canvas[ya:yb, xa:xb]
    cv2.add(view, sprite[ya - y0 : yb - y0, xa - x0 : xb - x0], dst=view)


def _paste_bank(canvas: np.ndarray, cy0: int, cx0: int, bank: OdBank, x_um, y_um, variant, mpp) -> None:
    cx = np.floor(np.asarray(x_um) / mpp).astype(np.int64)
    cy = np.floor(np.asarray(y_um) / mpp).astype(np.int64)
    h, w = canvas.shape[:2]
    # Hot loop (a thousand sprites per megapixel): where each lands is worked out for all at once, and
    # sprites wholly inside the canvas take a fast path.
    ya, xa = bank.y0[variant] + cy - cy0, bank.x0[variant] + cx - cx0
    yb, xb = ya + bank.height[variant], xa + bank.width[variant]
    inside = (ya >= 0) & (xa >= 0) & (yb <= h) & (xb <= w)
    sprites = bank.sprites
    for y, x, y1, x1, v, fits in zip(
        ya.tolist(), xa.tolist(), yb.tolist(), xb.tolist(), variant.tolist(), inside.tolist(), strict=True
    ):
        if fits:
            # cv2 rather than numpy: the same sums, a third less time on these small strided views
            view = canvas[y:y1, x:x1]
            cv2.add(view, sprites[v], view)
        else:
            _paste(canvas, cy0, cx0, sprites[v], y + cy0, x + cx0)


def render_region(model: SlideModel, x0: int, y0: int, width: int, height: int) -> RenderedRegion:
    """Render level-0 pixels [x0, x0+width) x [y0, y0+height) of the slide, before JPEG.

    Parameters
    ----------
    model
        The slide.
    x0, y0, width, height
        The region in level-0 pixels; it may extend past the slide (rendered as if the smear went on).

    Returns
    -------
    RenderedRegion
        uint8 RGB pixels and the objects whose centres fall in the region.
    """
    spec, scene = model.spec, model.scene
    mpp = spec.mpp
    # The blur levels a region needs set its halo: in focus, 8 px instead of the 35 px of the blurriest
    # level, 10 % fewer canvas pixels to draw in a 1024-px chunk.
    level_index, glass = smooth_fields(model.optics, y0, x0, height, width)
    halo = blur_halo_px(mpp, level_index)
    cy0, cx0 = y0 - halo, x0 - halo
    ch, cw = height + 2 * halo, width + 2 * halo
    canvas = workspace("canvas", (ch, cw, 3))
    canvas.fill(0.0)

    ax0, ay0 = cx0 * mpp - MAX_DIAMETER_UM / 2, cy0 * mpp - MAX_DIAMETER_UM / 2
    ax1, ay1 = (cx0 + cw) * mpp + MAX_DIAMETER_UM / 2, (cy0 + ch) * mpp + MAX_DIAMETER_UM / 2
    # Red cells near the canvas are pushed aside by white cells up to MAX_DIAMETER_UM away.
    nucleated = scene.nucleated_in_rect(
        ax0 - MAX_DIAMETER_UM, ay0 - MAX_DIAMETER_UM, ax1 + MAX_DIAMETER_UM, ay1 + MAX_DIAMETER_UM
    )
    # Red cells and platelets are fetched only as far out as their largest sprite reaches, not a white
    # cell's reach: a margin of MAX_DIAMETER_UM / 2 fetched 15 % more red cells than reach a 1024-px
    # canvas (884 instead of 749), each generated, pushed aside and tried.
    reach = model.bank_reach_px * mpp
    bx0, by0 = cx0 * mpp - reach, cy0 * mpp - reach
    bx1, by1 = (cx0 + cw) * mpp + reach, (cy0 + ch) * mpp + reach
    red = scene.red_cells(bx0, by0, bx1, by1, nucleated)
    platelets = scene.platelets_in_rect(bx0, by0, bx1, by1)

    spreads = _red_cell_spreads(scene.spread(red.x_um, red.y_um))
    for spread in _RBC_BANK_SPREADS:
        mask = spreads == spread
        if mask.any():
            bank = model.od_bank("red_cell", N_RBC_VARIANTS, spread)
            _paste_bank(canvas, cy0, cx0, bank, red.x_um[mask], red.y_um[mask], red.variant[mask], mpp)
    bank = model.od_bank("platelet", N_PLATELET_VARIANTS, 1.0)
    _paste_bank(canvas, cy0, cx0, bank, platelets.x_um, platelets.y_um, platelets.variant, mpp)

    in_core = (
        (nucleated.x_um >= x0 * mpp)
        & (nucleated.x_um < (x0 + width) * mpp)
        & (nucleated.y_um >= y0 * mpp)
        & (nucleated.y_um < (y0 + height) * mpp)
    )
    diameters = np.zeros(len(nucleated))
    nucleus_areas = np.zeros(len(nucleated))
    # A cell reaches the canvas only if its centre is within MAX_DIAMETER_UM / 2 of it.
    pad = psf_pad_px(mpp) * mpp  # the PSF's reach beyond a sprite
    touches_canvas = (
        (nucleated.x_um >= ax0 - pad)
        & (nucleated.x_um < ax1 + pad)
        & (nucleated.y_um >= ay0 - pad)
        & (nucleated.y_um < ay1 + pad)
    )
    for k in np.flatnonzero(touches_canvas):
        sy0, sx0, od, diameters[k], nucleus_areas[k] = _cell_od(
            int(nucleated.class_index[k]),
            int(nucleated.seed[k]),
            float(nucleated.x_um[k] / mpp),
            float(nucleated.y_um[k] / mpp),
            mpp,
            float(nucleated.spread[k]),
            model.stain_matrix.tobytes(),
        )
        _paste(canvas, cy0, cx0, od, sy0, sx0)

    for sprite_y0, sprite_x0, sprite_od in artefact_sprites(spec, ax0, ay0, ax1, ay1):
        sy0, sx0, od = psf_sprite(sprite_y0, sprite_x0, sprite_od, mpp)
        _paste(canvas, cy0, cx0, od, sy0, sx0)
    add_edge_and_label(canvas, spec, cy0, cx0)

    # The canvas holds optical density; light through it is 10^-OD.
    canvas *= np.float32(-_LN10)
    transmittance = cv2.exp(canvas, canvas)
    core = blur_core(transmittance, halo, level_index, mpp)
    rgb = add_sensor_noise(core, glass, model.optics, y0, x0)
    unscanned_fields(rgb, spec, model.optics.field_px, y0, x0, lambda x, y: scene.thickness(x, y) <= 0.0)

    core_red = (
        (red.x_um >= x0 * mpp)
        & (red.x_um < (x0 + width) * mpp)
        & (red.y_um >= y0 * mpp)
        & (red.y_um < (y0 + height) * mpp)
    )
    core_plt = (
        (platelets.x_um >= x0 * mpp)
        & (platelets.x_um < (x0 + width) * mpp)
        & (platelets.y_um >= y0 * mpp)
        & (platelets.y_um < (y0 + height) * mpp)
    )
    zones, counts = np.unique(scene.zone(red.x_um[core_red], red.y_um[core_red]), return_counts=True)

    return RenderedRegion(
        rgb=rgb,
        cells=select_cells(nucleated, in_core),
        diameter_um=diameters[in_core],
        nucleus_area_um2=nucleus_areas[in_core],
        red_cells=int(core_red.sum()),
        platelets=int(core_plt.sum()),
        red_cell_zones={str(z): int(c) for z, c in zip(zones, counts, strict=True)},
    )
