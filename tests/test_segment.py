"""Overview segmentation on synthetic scenes (known truth) and on a few real photographs (BCCD).

The scenes are drawn in optical density on a fine 0.25 um grid (Beer-Lambert: overlapping absorbers
add), lit by a white that varies across the field, resampled to the overview pixel size with area
averaging and quantised with noise, so the same physical scene can be rendered at any pixel size.
Colours are the CellaVision / MGG medians of DESIGN-NOTES section 3.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import asdict, dataclass, field, replace
from functools import cache

import cv2
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import ParameterError
from pipeline.segment import (
    COLUMNS,
    DEFAULT_RED_CELL_DIRECTION,
    SegmentParams,
    SlideStains,
    estimate_slide_stains,
    local_white,
    optical_density,
    required_halo_um,
    segment,
    stain_feature,
)

from .conftest import shared_path

FINE_MPP = 0.25
GLASS_RGB = np.array([250.0, 232.0, 212.0])
# OD per channel (R, G, B) against the glass
RED_CELL_OD = np.array([0.10, 0.14, 0.09])  # (202, 164, 165) on (255, 228, 203)
NUCLEUS_OD = np.array([0.56, 0.96, 0.18])  # (70, 25, 133)
PLATELET_OD = np.array([0.24, 0.42, 0.085])  # (147, 87, 167)
NEUTROPHIL_CYTOPLASM_OD = np.array([0.10, 0.15, 0.07])
LYMPHOCYTE_CYTOPLASM_OD = np.array([0.14, 0.17, 0.07])


@dataclass(frozen=True)
class Scene:
    """A field in physical units: what is where, and the truth (white-cell centres, um)."""

    width_um: float
    height_um: float
    discs: tuple[tuple[float, float, float, tuple[float, float, float]], ...]  # x, y, radius, OD
    white_cells: tuple[tuple[float, float, str], ...] = ()  # x, y, kind
    red_cell_centres: tuple[tuple[float, float], ...] = ()
    platelet_centres: tuple[tuple[float, float], ...] = ()
    stain_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class _Builder:
    width_um: float
    height_um: float
    rng: np.random.Generator
    discs: list = field(default_factory=list)
    white_cells: list = field(default_factory=list)
    red_cells: list = field(default_factory=list)
    platelets: list = field(default_factory=list)

    def disc(self, x: float, y: float, r: float, od: np.ndarray) -> None:
        self.discs.append((x, y, r, tuple(float(v) for v in od)))

    def red_cell(self, x: float, y: float) -> None:
        # biconcave: paler centre
        self.disc(x, y, 3.75, RED_CELL_OD)
        self.disc(x, y, 1.6, -0.45 * RED_CELL_OD)
        self.red_cells.append((x, y))

    def platelet(self, x: float, y: float) -> None:
        self.disc(x, y, 1.2, PLATELET_OD)
        self.platelets.append((x, y))

    def lymphocyte(self, x: float, y: float) -> None:
        # small lymphocyte: 9 um cell, nucleus 6.4 um across (32 um^2, alone below 40 um^2)
        self.disc(x, y, 4.5, LYMPHOCYTE_CYTOPLASM_OD)
        self.disc(x + 0.4, y, 3.2, NUCLEUS_OD - LYMPHOCYTE_CYTOPLASM_OD)
        self.white_cells.append((x, y, "lymphocyte"))

    def neutrophil(self, x: float, y: float) -> None:
        # 12 um cell, three separate lobes (9 um^2 each) with 1.2 um gaps and no strands
        self.disc(x, y, 6.0, NEUTROPHIL_CYTOPLASM_OD)
        angle = self.rng.uniform(0, 2 * math.pi)
        for k in range(3):
            a = angle + 2 * math.pi * k / 3
            self.disc(
                x + 2.65 * math.cos(a), y + 2.65 * math.sin(a), 1.7, NUCLEUS_OD - NEUTROPHIL_CYTOPLASM_OD
            )
        self.white_cells.append((x, y, "neutrophil"))

    def eosinophil(self, x: float, y: float) -> None:
        # 13 um cell, two large lobes (25 um^2 each) 1.5 um apart: one cell, not two
        self.disc(x, y, 6.5, NEUTROPHIL_CYTOPLASM_OD * 1.5)
        for side in (-1, 1):
            self.disc(x + side * 3.55, y, 2.8, NUCLEUS_OD - NEUTROPHIL_CYTOPLASM_OD * 1.5)
        self.white_cells.append((x, y, "eosinophil"))

    def monocyte(self, x: float, y: float) -> None:
        # 16 um cell, large folded nucleus drawn as two overlapping discs
        self.disc(x, y, 8.0, LYMPHOCYTE_CYTOPLASM_OD * 0.8)
        self.disc(x - 1.5, y, 3.5, (NUCLEUS_OD - LYMPHOCYTE_CYTOPLASM_OD) * 0.8)
        self.disc(x + 1.5, y + 1.0, 3.0, (NUCLEUS_OD - LYMPHOCYTE_CYTOPLASM_OD) * 0.8)
        self.white_cells.append((x, y, "monocyte"))

    def scene(self, stain_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Scene:
        return Scene(
            self.width_um,
            self.height_um,
            tuple(self.discs),
            tuple(self.white_cells),
            tuple(self.red_cells),
            tuple(self.platelets),
            stain_scale,
        )


def smear(
    width_um: float, height_um: float, seed: int, n_white: int, thick_patch: bool = False, platelets: int = 30
) -> Scene:
    """A monolayer: white cells on a jittered grid, red cells around them, platelets, maybe a thick patch."""
    rng = np.random.default_rng(seed)
    b = _Builder(width_um, height_um, rng)
    kinds = (b.lymphocyte, b.neutrophil, b.monocyte)
    cols = max(1, math.ceil(math.sqrt(n_white * width_um / height_um)))
    rows = max(1, math.ceil(n_white / cols))
    step_x, step_y = width_um / cols, height_um / rows
    centres = []
    for k in range(n_white):
        r, c = divmod(k, cols)
        x = (c + 0.5) * step_x + rng.uniform(-0.15, 0.15) * step_x
        y = (r + 0.5) * step_y + rng.uniform(-0.15, 0.15) * step_y
        centres.append((x, y))
        kinds[k % len(kinds)](x, y)
    # red cells at monolayer density (about 40 % of the area), not on top of white cells
    n_red = int(0.4 * width_um * height_um / (math.pi * 3.75**2))
    for _ in range(n_red):
        x, y = rng.uniform(0, width_um), rng.uniform(0, height_um)
        if all((x - cx) ** 2 + (y - cy) ** 2 > 12.0**2 for cx, cy in centres):
            b.red_cell(x, y)
    _scatter_platelets(b, rng, platelets, keep_off=centres)
    if thick_patch:
        # thick zone: red cells stacked two to three deep over an 80 um square, no glass inside
        x0, y0 = width_um * 0.5, height_um * 0.5
        for _ in range(int(2.5 * 80 * 80 / (math.pi * 3.75**2))):
            b.red_cell(x0 + rng.uniform(-40, 40), y0 + rng.uniform(-40, 40))
    return b.scene()


def _scatter_platelets(b: _Builder, rng: np.random.Generator, n: int, keep_off: list) -> None:
    """Single platelets and some touching pairs, apart from each other (clumps would be objects)."""
    spots: list[tuple[float, float]] = []
    for _ in range(50 * n):
        if len(spots) == n:
            break
        x, y = rng.uniform(5, b.width_um - 5), rng.uniform(5, b.height_um - 5)
        if all((x - cx) ** 2 + (y - cy) ** 2 > 14.0**2 for cx, cy in keep_off) and all(
            (x - px) ** 2 + (y - py) ** 2 > 8.0**2 for px, py in spots
        ):
            b.platelet(x, y)
            if len(spots) % 3 == 0:  # a touching pair: the largest platelet object
                b.platelet(x + 2.4, y + 0.3)
            spots.append((x, y))


def with_stain(scene: Scene, scale: tuple[float, float, float]) -> Scene:
    """The same scene stained differently: every OD multiplied per channel."""
    return replace(scene, stain_scale=scale)


@cache
def _fine_od(scene: Scene) -> np.ndarray:
    h, w = round(scene.height_um / FINE_MPP), round(scene.width_um / FINE_MPP)
    od = np.zeros((h, w, 3), np.float32)
    shift = 4  # sub-pixel precision of cv2.circle
    for x, y, r, vec in scene.discs:
        # draw each disc in its own small window of the fine grid
        cx, cy, rr = x / FINE_MPP, y / FINE_MPP, r / FINE_MPP
        x0, y0 = max(0, math.floor(cx - rr) - 1), max(0, math.floor(cy - rr) - 1)
        x1, y1 = min(w, math.ceil(cx + rr) + 2), min(h, math.ceil(cy + rr) + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        centre = (round((cx - x0) * 2**shift), round((cy - y0) * 2**shift))
        cv2.circle(mask, centre, round(rr * 2**shift), 1, -1, cv2.LINE_8, shift)
        od[y0:y1, x0:x1] += mask[..., None].astype(np.float32) * np.asarray(vec, np.float32)
    return od * np.asarray(scene.stain_scale, np.float32)


@cache
def render(scene: Scene, mpp: float, seed: int = 0, field_um: float = 0.0) -> np.ndarray:
    """The scene as an RGB uint8 overview at ``mpp``: uneven illumination, area resampling, noise.

    ``field_um`` > 0 adds the vignetting of a mosaic of camera fields of that size (up to 15 % darker
    at each field's corners), a white level that changes within a few tens of um.
    """
    od = _fine_od(scene)
    h, w = od.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # illumination: a smooth gradient across the field and a slight tint change (vignetting, lamp)
    light = 1.0 - 0.18 * (xx / w) - 0.10 * ((yy / h - 0.5) ** 2)
    if field_um > 0:
        half = field_um / FINE_MPP / 2
        fx, fy = (xx % (2 * half) - half) / half, (yy % (2 * half) - half) / half
        light = light * (1.0 - 0.075 * (fx * fx + fy * fy))
    white = GLASS_RGB[None, None, :].astype(np.float32) * light[..., None]
    white[..., 2] *= 1.0 - 0.05 * (yy / h)
    fine = white * np.power(10.0, -od, dtype=np.float32)
    size = (round(scene.width_um / mpp), round(scene.height_um / mpp))
    coarse = cv2.resize(fine, size, interpolation=cv2.INTER_AREA)
    noise = np.random.default_rng(seed).normal(0.0, 1.2, coarse.shape)
    return np.clip(np.round(coarse + noise), 0, 255).astype(np.uint8)


def _found(
    objects: pd.DataFrame, mpp: float, points: list[tuple[float, float]], radius_um: float
) -> np.ndarray:
    """Per object: index of the nearest point within ``radius_um`` (-1 if none)."""
    x = objects["x_px"].to_numpy() * mpp
    y = objects["y_px"].to_numpy() * mpp
    if not points:
        return np.full(len(x), -1)
    p = np.asarray(points)
    d = np.hypot(x[:, None] - p[None, :, 0], y[:, None] - p[None, :, 1])
    nearest = d.argmin(axis=1)
    return np.where(d[np.arange(len(x)), nearest] <= radius_um, nearest, -1)


def _segment_scene(scene: Scene, mpp: float, params: SegmentParams | None = None):
    params = params or SegmentParams()
    rgb = render(scene, mpp)
    stains = estimate_slide_stains([rgb], mpp, params)
    labels, objects = segment(rgb, mpp, stains, params)
    return rgb, stains, labels, objects


def _white_cell_points(scene: Scene) -> list[tuple[float, float]]:
    return [(x, y) for x, y, _ in scene.white_cells]


# ----------------------------------------------------------------------------- optical density
def test_optical_density_is_zero_on_glass_and_beer_lambert_on_stain():
    params = SegmentParams()
    # glass with a strong illumination gradient and a square of known transmission 10^-0.3
    yy, xx = np.mgrid[0:200, 0:300]
    light = (170 + 0.1 * xx + 0.05 * yy).astype(np.float64)  # 170-210: strong vignetting
    rgb = np.repeat(light[..., None], 3, axis=2)
    rgb[90:110, 140:160] *= 10**-0.3
    od = optical_density(np.round(rgb).astype(np.uint8), 1.0, params)
    assert od.dtype == np.float32 and od.shape == (200, 300, 3)
    glass = np.ones((200, 300), bool)
    glass[80:120, 130:170] = False
    # the brightest level within the window is a little above the local one under a gradient
    assert np.abs(od[glass]).max() < 0.015
    assert od[95:105, 145:155].mean() == pytest.approx(0.3, abs=0.015)


def test_white_floor_keeps_od_where_no_glass_is_near():
    params = SegmentParams()
    # a 200 um field covered by red cells (no glass within the white window) inside glass
    rgb = np.full((400, 400, 3), 220, np.uint8)
    rgb[100:300, 100:300] = (180, 160, 170)
    stains = SlideStains((220.0, 220.0, 220.0), (0.4, 0.6, 0.5), 0.01, 0.1, 0.5)
    without = optical_density(rgb, 1.0, params)
    with_floor = optical_density(rgb, 1.0, params, stains)
    # without the slide white the middle of the patch is its own white: OD 0
    assert without[200, 200].max() < 0.01
    expected = -np.log10(np.array([180, 160, 170]) / round(0.85 * 220))
    assert np.allclose(with_floor[200, 200], np.maximum(expected, 0), atol=0.005)


def test_stain_feature_ignores_red_cells_however_stacked():
    e = np.array([0.5, 0.7, 0.45])
    od = np.stack([0.2 * e, 3.0 * e, 0.3 * e + np.array([0.1, 0.0, 0.0])]).astype(np.float32)
    f = stain_feature(od.reshape(1, 3, 3), e)
    assert f.shape == (1, 3)
    assert f[0, 0] < 1e-6 and f[0, 1] < 1e-5
    unit = e / np.linalg.norm(e)
    residual = np.array([0.1, 0.0, 0.0]) - (0.1 * unit[0]) * unit
    assert f[0, 2] == pytest.approx(np.linalg.norm(residual), rel=1e-4)
    # other shapes too
    assert stain_feature(od, e).shape == (3,)


# ---------------------------------------------------------------------------- slide statistics
def test_slide_stains_measure_the_red_cell_colour_and_survive_json_and_pickle():
    scene = smear(300, 300, seed=1, n_white=4)
    rgb = render(scene, 1.0)
    stains = estimate_slide_stains([rgb[:150], rgb[150:]], 1.0, SegmentParams())
    unit = RED_CELL_OD / np.linalg.norm(RED_CELL_OD)
    assert np.dot(stains.red_cell_direction, unit) > 0.995
    assert stains.white_rgb[0] == pytest.approx(GLASS_RGB[0], abs=25)
    assert 0.05 < stains.threshold_od < 0.3
    assert 0.2 < stains.stained_fraction < 0.8
    back = SlideStains.from_dict(json.loads(json.dumps(asdict(stains))))
    assert back == stains
    assert pickle.loads(pickle.dumps(stains)) == stains


def test_blank_glass_gives_no_objects_and_a_usable_estimate():
    params = SegmentParams()
    rgb = np.full((300, 300, 3), 235, np.uint8)
    rgb += np.random.default_rng(0).integers(0, 3, rgb.shape, dtype=np.uint8)
    stains = estimate_slide_stains([rgb], 1.0, params)
    assert stains.stained_fraction == 0.0 and stains.threshold_od > 0
    labels, objects = segment(rgb, 1.0, stains, params)
    assert objects.empty and list(objects.columns) == list(COLUMNS)
    assert labels.dtype == np.int32 and labels.shape == (300, 300) and not labels.any()


def test_threshold_follows_the_stain():
    scene = smear(300, 300, seed=2, n_white=6)
    thresholds = {}
    for name, scale in {"pale": (0.5, 0.5, 0.5), "base": (1.0, 1.0, 1.0), "dark": (1.6, 1.6, 1.6)}.items():
        rgb = render(with_stain(scene, scale), 1.0)
        thresholds[name] = estimate_slide_stains([rgb], 1.0, SegmentParams()).threshold_od
    assert thresholds["pale"] < 0.7 * thresholds["base"] < 0.7 * thresholds["dark"]
    fixed = estimate_slide_stains([render(scene, 1.0)], 1.0, SegmentParams(threshold=0.2))
    assert fixed.threshold_od == 0.2


# --------------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("mpp", [0.5, 1.0, 2.0])
def test_finds_every_white_cell_and_nothing_else(mpp):
    scene = smear(400, 300, seed=3, n_white=12)
    _, _, labels, objects = _segment_scene(scene, mpp)
    cells = _white_cell_points(scene)
    match = _found(objects, mpp, cells, radius_um=4.0)
    assert (match >= 0).all(), "an object that is not a white cell (red cell, platelet)"
    assert sorted(match.tolist()) == list(range(len(cells))), "every white cell exactly once"
    # table and labels agree
    assert labels.max() == len(objects)
    counts = np.bincount(labels.ravel(), minlength=len(objects) + 1)[1:]
    assert np.allclose(counts * mpp * mpp, objects["area_um2"])
    ys, xs = np.nonzero(labels == 1)
    assert objects.loc[0, "x_px"] == pytest.approx(xs.mean() + 0.5)
    assert objects.loc[0, "y_px"] == pytest.approx(ys.mean() + 0.5)


def test_lobes_of_a_neutrophil_are_one_object():
    b = _Builder(80, 80, np.random.default_rng(0))
    b.neutrophil(40, 40)
    for x, y in ((15, 15), (65, 20), (20, 62), (62, 64)):
        b.red_cell(x, y)
    scene = b.scene()
    for mpp in (0.5, 1.0):
        rgb = render(scene, mpp)
        params = SegmentParams()
        stains = estimate_slide_stains([render(smear(300, 300, seed=1, n_white=4), mpp)], mpp, params)
        _, objects = segment(rgb, mpp, stains, params)
        assert len(objects) == 1
        row = objects.iloc[0]
        assert math.hypot(row.x_px * mpp - 40, row.y_px * mpp - 40) < 1.5
        assert row.n_lobes >= 2 if mpp == 0.5 else row.n_lobes >= 1
        assert 60 < row.area_um2 < 200


def test_touching_cells_are_split_but_the_large_lobes_of_one_cell_are_not():
    b = _Builder(120, 60, np.random.default_rng(0))
    for x in (20.0, 30.2):  # two large lymphocytes, cytoplasm overlapping, nuclei 3 um apart
        b.disc(x, 30, 5.6, LYMPHOCYTE_CYTOPLASM_OD)
        b.disc(x, 30, 3.6, NUCLEUS_OD - LYMPHOCYTE_CYTOPLASM_OD)
        b.white_cells.append((x, 30, "lymphocyte"))
    b.eosinophil(90, 30)
    rgb = render(b.scene(), 1.0)
    stains = estimate_slide_stains([render(smear(300, 300, seed=1, n_white=4), 1.0)], 1.0, SegmentParams())
    cells = _white_cell_points(b.scene())
    _, objects = segment(rgb, 1.0, stains, SegmentParams())
    match = _found(objects, 1.0, cells, radius_um=4.0)
    assert sorted(match.tolist()) == [0, 1, 2]
    assert objects.loc[match == 2, "n_lobes"].item() == 2
    # without splitting, the two lymphocytes are one object between them
    _, unsplit = segment(rgb, 1.0, stains, SegmentParams(split_gap_um=1e6, split_neck=0.0))
    assert sorted(_found(unsplit, 1.0, cells, radius_um=4.0).tolist()) == [-1, 2]


def test_small_lymphocyte_is_kept_although_its_nucleus_is_below_40_um2():
    b = _Builder(60, 60, np.random.default_rng(0))
    b.lymphocyte(30, 30)
    b.red_cell(10, 10)
    b.red_cell(50, 50)
    rgb = render(b.scene(), 1.0)
    stains = estimate_slide_stains([render(smear(300, 300, seed=1, n_white=4), 1.0)], 1.0, SegmentParams())
    _, objects = segment(rgb, 1.0, stains, SegmentParams())
    assert len(objects) == 1
    nucleus_um2 = math.pi * 3.2**2  # 32 um^2
    # the object is the nucleus grown into the cytoplasm: well above the nucleus, and kept
    assert objects.loc[0, "area_um2"] >= max(40.0, 1.4 * nucleus_um2)
    assert objects.loc[0, "area_um2"] <= math.pi * 4.5**2 * 1.3  # but not much beyond the cell


def test_red_cells_and_platelets_alone_give_no_object():
    b = _Builder(300, 300, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    for _ in range(800):  # monolayer to thick: overlaps stack two and three cells
        b.red_cell(rng.uniform(0, 300), rng.uniform(0, 300))
    _scatter_platelets(b, rng, 60, keep_off=[])
    rgb = render(b.scene(), 1.0)
    # the slide's statistics come from a normal field with white cells
    stains = estimate_slide_stains([render(smear(300, 300, seed=1, n_white=4), 1.0)], 1.0, SegmentParams())
    _, objects = segment(rgb, 1.0, stains, SegmentParams())
    assert objects.empty


def test_white_cell_in_a_thick_zone_is_found_and_stacked_red_cells_are_not():
    scene = smear(300, 300, seed=6, n_white=9, thick_patch=True)
    _, _, _, objects = _segment_scene(scene, 1.0)
    cells = _white_cell_points(scene)
    match = _found(objects, 1.0, cells, radius_um=4.0)
    assert (match >= 0).all()
    assert sorted(match.tolist()) == list(range(len(cells)))


def test_area_in_um2_does_not_depend_on_the_pixel_size():
    scene = smear(300, 300, seed=4, n_white=9)
    cells = _white_cell_points(scene)
    areas = {}
    for mpp in (0.5, 1.0, 2.0):
        objects = _segment_scene(scene, mpp)[3]
        match = _found(objects, mpp, cells, radius_um=4.0)
        assert set(match[match >= 0].tolist()) == set(range(len(cells)))
        matched = objects[match >= 0]
        areas[mpp] = matched["area_um2"].to_numpy()[np.argsort(match[match >= 0])]
    assert np.allclose(areas[0.5], areas[1.0], rtol=0.12)
    # little systematic growth or shrinkage between 0.5 and 1 um/px (whole-pixel growth: 1.3 px at 1 um/px)
    assert abs(np.median(areas[0.5] / areas[1.0]) - 1) < 0.1
    # at 2 um/px, the coarsest overview, every pixel the nucleus' edge touches is counted: larger
    ratio = areas[2.0] / areas[1.0]
    assert (ratio > 1.0).all() and (ratio < 1.5).all()


@pytest.mark.parametrize(
    "scale",
    [
        (1.6, 1.6, 1.6),
        (2.0, 2.0, 2.0),
        (0.55, 0.55, 0.55),
        (1.4, 1.0, 0.6),
        (0.8, 1.0, 1.4),
        (0.6, 0.45, 0.6),
    ],
    ids=["darker", "much-darker", "paler", "bluer", "redder", "pale-and-blue"],
)
def test_adaptive_threshold_finds_all_nuclei_in_other_stains(scale):
    scene = with_stain(smear(300, 300, seed=7, n_white=9, thick_patch=True), scale)
    _, _, _, objects = _segment_scene(scene, 1.0)
    cells = _white_cell_points(scene)
    match = _found(objects, 1.0, cells, radius_um=4.0)
    assert (match >= 0).all(), "a false object"
    assert sorted(match.tolist()) == list(range(len(cells)))


def test_objects_touching_the_tile_border_are_dropped():
    b = _Builder(60, 60, np.random.default_rng(0))
    b.lymphocyte(0.5, 30)  # cut by the border
    b.lymphocyte(30, 30)
    rgb = render(b.scene(), 1.0)
    stains = estimate_slide_stains([render(smear(300, 300, seed=1, n_white=4), 1.0)], 1.0, SegmentParams())
    _, objects = segment(rgb, 1.0, stains, SegmentParams())
    assert len(objects) == 1 and objects.loc[0, "x_px"] == pytest.approx(30.4, abs=1.0)


# ------------------------------------------------------------------------------ tile invariance
def _with_debris(scene: Scene, seed: int) -> Scene:
    """Add purple streaks 20-90 um long (clusters near and beyond ``max_cluster_um``) and touching pairs
    of white cells (split or not, the same in every tiling)."""
    rng = np.random.default_rng(seed)
    b = _Builder(scene.width_um, scene.height_um, rng, list(scene.discs), list(scene.white_cells))
    for _ in range(12):
        x, y = rng.uniform(0, scene.width_um), rng.uniform(0, scene.height_um)
        length, angle = rng.uniform(20, 90), rng.uniform(0, math.pi)
        for t in np.arange(0, length, 1.5):
            b.disc(x + t * math.cos(angle), y + t * math.sin(angle), 1.3, PLATELET_OD * 1.5)
    for _ in range(4):
        x, y = rng.uniform(20, scene.width_um - 20), rng.uniform(20, scene.height_um - 20)
        b.lymphocyte(x, y)
        b.monocyte(x + 11.5, y + 2.0)
    return b.scene()


@cache
def _invariance_case() -> tuple[np.ndarray, SlideStains, SegmentParams, pd.DataFrame]:
    scene = _with_debris(smear(600, 600, seed=11, n_white=40, thick_patch=True, platelets=80), seed=11)
    rgb = render(scene, 1.0, field_um=120.0)
    params = SegmentParams()
    stains = estimate_slide_stains([rgb[:300, :300], rgb[300:, 300:]], 1.0, params)
    _, whole = segment(rgb, 1.0, stains, params)
    return rgb, stains, params, whole


def _tiled(rgb, stains, params, tile, shift, mpp=1.0) -> pd.DataFrame:
    """Segment in tiles (clipped at the image border), keep objects whose centroid is in the core."""
    halo = math.ceil(required_halo_um(params, mpp) / mpp)
    h, w = rgb.shape[:2]
    parts = []
    for y0 in range(-shift, h, tile):
        for x0 in range(-shift, w, tile):
            cy0, cx0, cy1, cx1 = max(0, y0), max(0, x0), min(h, y0 + tile), min(w, x0 + tile)
            if cy0 >= cy1 or cx0 >= cx1:
                continue
            ry0, rx0 = max(0, cy0 - halo), max(0, cx0 - halo)
            ry1, rx1 = min(h, cy1 + halo), min(w, cx1 + halo)
            _, objects = segment(rgb[ry0:ry1, rx0:rx1], mpp, stains, params)
            x, y = objects["x_px"] + rx0, objects["y_px"] + ry0
            core = (x >= cx0) & (x < cx1) & (y >= cy0) & (y < cy1)
            objects = objects[core].copy()
            objects["x_px"] += rx0
            objects["y_px"] += ry0
            for col, off in (("x0", rx0), ("x1", rx0), ("y0", ry0), ("y1", ry0)):
                objects[col] += off
            parts.append(objects)
    table = pd.concat(parts, ignore_index=True)
    order = np.lexsort((table["x_px"].to_numpy(), table["y_px"].to_numpy()))
    return table.iloc[order].reset_index(drop=True)


def test_tiled_segmentation_equals_the_whole_image_at_fixed_tilings():
    rgb, stains, params, whole = _invariance_case()
    assert len(whole) >= 40
    for tile, shift in ((128, 0), (200, 77)):
        pd.testing.assert_frame_equal(
            _tiled(rgb, stains, params, tile, shift), whole, check_exact=False, rtol=1e-9
        )


@pytest.mark.parametrize("mpp", [0.5, 2.0])
def test_tiled_segmentation_equals_the_whole_image_at_other_pixel_sizes(mpp):
    scene = _with_debris(smear(400, 400, seed=12, n_white=20, thick_patch=True, platelets=40), seed=12)
    rgb = render(scene, mpp, field_um=120.0)
    params = SegmentParams()
    stains = estimate_slide_stains([rgb], mpp, params)
    _, whole = segment(rgb, mpp, stains, params)
    assert len(whole) >= 20
    tile = round(90 / mpp)  # tiles smaller than the halo: the hardest case
    tiled = _tiled(rgb, stains, params, tile, tile // 3, mpp=mpp)
    pd.testing.assert_frame_equal(tiled, whole, check_exact=False, rtol=1e-9)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tile=st.integers(64, 700), shift=st.integers(0, 699))
def test_tiled_segmentation_equals_the_whole_image_for_any_tiling(tile, shift):
    rgb, stains, params, whole = _invariance_case()
    tiled = _tiled(rgb, stains, params, tile, shift % tile)
    pd.testing.assert_frame_equal(tiled, whole, check_exact=False, rtol=1e-9)


# ------------------------------------------------------------- the maps detection computes in strips
@pytest.fixture
def one_opencv_thread():
    """OpenCV on one thread, as in a worker: with several, cv2.magnitude's rounding of a pixel depends
    on where the threads' stripes end, and the reference itself changes in the last bit."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    yield
    cv2.setNumThreads(before)


@pytest.mark.parametrize("nucleus", [True, False])
def test_tile_maps_and_segmenting_from_them_equal_the_whole_tile_functions_bit_for_bit(
    nucleus, one_opencv_thread
):
    from pipeline._tile_maps import STRIP_ROWS, tile_maps
    from pipeline.quality import red_cell_layers

    rgb, stains, params, _ = _invariance_case()
    if not nucleus:  # older statistics: the feature is the length of the whole residual
        stains = replace(stains, nucleus_direction=None)
    rgb = rgb.copy()
    rgb[:30, :50] = 3  # black: not tissue
    assert rgb.shape[0] > 2 * STRIP_ROWS  # several strips, the last one partial
    maps = tile_maps(rgb, 1.0, params, stains, 0.2)
    od = optical_density(rgb, 1.0, params, stains)
    np.testing.assert_array_equal(maps.white, local_white(rgb, 1.0, params, stains.white_rgb))
    feature = stain_feature(od, stains.red_cell_direction, stains.nucleus_direction)
    if nucleus:
        np.testing.assert_array_equal(maps.feature, feature)
    else:  # cv2.magnitude rounds the last bit by the memory alignment of its input, in either version
        np.testing.assert_allclose(maps.feature, feature, rtol=1e-6, atol=0)
        return
    np.testing.assert_array_equal(maps.layers, red_cell_layers(od, stains.red_cell_direction, 0.2))
    assert np.isnan(maps.layers).any()
    labels, objects = segment(rgb, 1.0, stains, params, od=od)
    labels2, objects2 = segment(rgb, 1.0, stains, params, feature=maps.feature, white=maps.white)
    assert len(objects) >= 30
    np.testing.assert_array_equal(labels2, labels)
    pd.testing.assert_frame_equal(objects2, objects, check_exact=True)


@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (130, 2), (129, 4), (3, 700)])
def test_tile_maps_of_thin_images(shape, one_opencv_thread):
    from pipeline._tile_maps import tile_maps
    from pipeline.quality import red_cell_layers

    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    params = SegmentParams()
    stains = SlideStains((230.0, 220.0, 225.0), DEFAULT_RED_CELL_DIRECTION, 0.01, 0.05, 0.3, 0.2, None)
    maps = tile_maps(rgb, 1.0, params, stains, 0.2)
    od = optical_density(rgb, 1.0, params, stains)
    assert maps.feature.shape == maps.layers.shape == shape
    np.testing.assert_allclose(maps.feature, stain_feature(od, stains.red_cell_direction), rtol=1e-6)
    np.testing.assert_array_equal(maps.layers, red_cell_layers(od, stains.red_cell_direction, 0.2))


@pytest.mark.parametrize(
    "shape",
    [(1, 20), (2, 9), (5, 4), (40, 3), (57, 131), (300, 260), (257, 1), (513, 2), (16, 1), (3, 4), (1, 1)],
)
@pytest.mark.parametrize("mpp", [1.0, 3.0])
@pytest.mark.parametrize("slide_white", [None, (200.0, 150.5, 231.2)])
def test_local_white_equals_a_dilation_with_the_replicated_edge(shape, mpp, slide_white):
    rgb = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    params = SegmentParams()
    r = math.ceil(params.white_radius_um / mpp - 1e-9)
    smooth = cv2.blur(rgb, (3, 3), borderType=cv2.BORDER_REPLICATE)
    square = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1))
    want = cv2.dilate(smooth, square, borderType=cv2.BORDER_REPLICATE)
    if slide_white is not None:  # kept between white_floor x the slide's white and 2 levels above it
        floor = np.round(params.white_floor * np.array(slide_white))
        want = np.clip(want, floor, np.ceil(slide_white) + 2).astype(np.uint8)
    np.testing.assert_array_equal(local_white(rgb, mpp, params, slide_white), want)


def test_memory_retention_is_set_once_and_harmless():
    from pipeline._memory import retain_freed_memory

    assert retain_freed_memory() == retain_freed_memory()
    assert np.ones(8 << 20, np.uint8).sum() == 8 << 20


# -------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "changes",
    [
        {"min_area_um2": -1.0},
        {"min_area_um2": 900.0},
        {"white_floor": 0.0},
        {"white_floor": 1.5},
        {"merge_um": -0.5},
        {"threshold": 0.0},
        {"white_radius_um": float("nan")},
        {"max_cluster_um": 0.0},
    ],
)
def test_parameters_out_of_range_are_refused(changes):
    with pytest.raises(ParameterError):
        SegmentParams(**changes)


def test_bad_inputs_are_refused_with_a_parameter_error():
    params = SegmentParams()
    rgb = np.full((50, 50, 3), 200, np.uint8)
    stains = estimate_slide_stains([rgb], 1.0, params)
    with pytest.raises(ParameterError, match=r"um/px"):
        segment(rgb, 0.0, stains, params)
    with pytest.raises(ParameterError, match="uint8"):
        segment(rgb.astype(np.float32), 1.0, stains, params)
    with pytest.raises(ParameterError, match="uint8"):
        segment(rgb[..., :2], 1.0, stains, params)
    with pytest.raises(ParameterError):
        estimate_slide_stains([], 1.0, params)
    with pytest.raises(ParameterError):
        SlideStains((200.0, 200.0, 200.0), (0.0, 0.0, 0.0), 0.01, 0.1, 0.5)


def test_halo_grows_with_the_parameters_that_need_context():
    base = required_halo_um(SegmentParams())
    assert required_halo_um(SegmentParams(white_radius_um=40.0)) > base
    assert required_halo_um(SegmentParams(max_cluster_um=90.0)) > base
    assert required_halo_um(SegmentParams(merge_um=4.0)) > base
    assert required_halo_um(SegmentParams(split_radius_um=6.0)) > base
    assert required_halo_um(SegmentParams(), mpp=0.5) < base
    with pytest.raises(ParameterError):
        required_halo_um(SegmentParams(), mpp=-1.0)


# ---------------------------------------------------------------------------------- real data
def test_finds_white_cells_in_held_out_bccd_photographs():
    from benchmarks.bccd_recall import load_photos, score, segment_photo

    bccd = shared_path("data", "bccd")
    params = SegmentParams()
    photos = load_photos(bccd, 1.0, parity=1)[::4]  # a quarter of the held-out (odd) photographs
    stains = estimate_slide_stains([p.rgb for p in photos], 1.0, params)
    result = score(photos, [segment_photo(p, 1.0, stains, params) for p in photos])
    assert result["recall"] >= 0.95
    assert result["false_per_image"] <= 0.1
