"""Re-centring at full resolution and the edge-blur estimate, on synthetic cells with known answers."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from pipeline.errors import ParameterError
from pipeline.quality import QualityParams
from pipeline.relocate import (
    CropParams,
    Refined,
    is_padded,
    refine_centre,
    refine_centre_at,
    search_window_half_um,
)
from pipeline.segment import (
    DEFAULT_NUCLEUS_DIRECTION,
    SegmentParams,
    SlideStains,
    _orthogonal,
    estimate_slide_stains,
)

from .conftest import shared_path

WHITE = np.array([240.0, 240.0, 240.0], np.float32)
RED = (0.5, 0.7, 0.45)  # red-cell OD direction of the background below
STAINS = SlideStains(
    white_rgb=(240.0, 240.0, 240.0),
    red_cell_direction=RED,
    red_cell_level=0.01,
    threshold_od=0.1,
    stained_fraction=0.5,
    nucleus_direction=tuple(_orthogonal(DEFAULT_NUCLEUS_DIRECTION, RED)),
)


def _cell_window(cx, cy, blur_um, mpp=0.25, size=200, lobes=((0.0, 0.0),), radius_um=3.0):
    """A purple nucleus (one disc per lobe offset, um) on pink red-cell background, blurred."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    od = np.zeros((size, size, 3), np.float32)
    od[...] = (0.05, 0.07, 0.045)
    for dx, dy in lobes:
        nucleus = (xx - cx - dx / mpp) ** 2 + (yy - cy - dy / mpp) ** 2 < (radius_um / mpp) ** 2
        od[nucleus] = (0.5, 0.9, 0.18)
    if blur_um > 0:
        od = cv2.GaussianBlur(od, (0, 0), blur_um / mpp)
    return np.clip(WHITE * 10 ** (-od), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("blur_um", [0.2, 0.4, 0.6, 0.8, 1.0])
def test_blur_estimate_tracks_the_true_blur(blur_um):
    window = _cell_window(100.3, 97.8, blur_um)
    refined = refine_centre(window, 0.25, (104.0, 94.0), STAINS, CropParams())
    assert refined.found
    assert refined.blur_um == pytest.approx(blur_um, abs=0.1)


@pytest.mark.parametrize("blur_um", [1.5, 2.0, 2.4])
def test_strong_blur_is_above_the_default_focus_limit(blur_um):
    # On a 6-um nucleus the estimate saturates near 1.2 um, still well above the 0.9 um default limit.
    window = _cell_window(100.3, 97.8, blur_um)
    refined = refine_centre(window, 0.25, (104.0, 94.0), STAINS, CropParams())
    assert refined.blur_um > QualityParams().max_blur_um


def test_recentres_on_the_nucleus_and_merges_lobes():
    mpp = 0.25
    # three lobes around (100, 100) px: the merged centroid is the mean of the lobe centres
    lobes = ((-3.0, 0.0), (0.0, 0.5), (3.0, 0.0))
    window = _cell_window(100.0, 100.0, 0.2, mpp=mpp, lobes=lobes)
    params = CropParams(merge_um=2.5)
    refined = refine_centre(window, mpp, (108.0, 92.0), STAINS, params)
    assert refined.found
    new_x = 108.0 + refined.dx_um / mpp
    new_y = 92.0 + refined.dy_um / mpp
    assert new_x == pytest.approx(100.0, abs=1.0)
    assert new_y == pytest.approx(100.0 + 0.5 / 3 / mpp, abs=1.0)


def test_nothing_within_the_search_radius_is_not_found():
    window = _cell_window(30.0, 30.0, 0.2)
    refined = refine_centre(window, 0.25, (170.0, 170.0), STAINS, CropParams(search_um=5.0))
    assert not refined.found
    assert refined.dx_um == 0.0 and refined.dy_um == 0.0


def test_padding_flag_and_crop_geometry():
    params = CropParams()
    assert params.crop_mpp == pytest.approx(25 / 288)
    assert not is_padded(500.0, 500.0, 0.25, params, (1000, 1000))
    assert is_padded(40.0, 500.0, 0.25, params, (1000, 1000))  # 12.5 um = 50 px to the left edge
    assert is_padded(500.0, 960.0, 0.25, params, (1000, 1000))
    with pytest.raises(ParameterError, match="--crop-px"):
        CropParams(crop_px=4)
    with pytest.raises(ParameterError, match="--crop-um"):
        CropParams(crop_um=0.5)


# ------------------------------------------------------------- the small first window, bit for bit
def _refine_both_ways(field: np.ndarray, points, stains, params, mpp=0.25):
    """refine_centre_at on a field (white outside) and refine_centre on each whole search window."""
    sizes = []

    def read(x0: int, y0: int, size: int) -> np.ndarray:
        sizes.append(size)
        out = np.full((size, size, 3), 255, np.uint8)
        h, w = field.shape[:2]
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
        if sx0 < sx1 and sy0 < sy1:
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = field[sy0:sy1, sx0:sx1]
        return out

    half = math.ceil(search_window_half_um(params) / mpp)
    pairs = []
    for x, y in points:
        fast = refine_centre_at(read, x, y, mpp, stains, params)
        wx0, wy0 = math.floor(x) - half, math.floor(y) - half
        whole = refine_centre(read(wx0, wy0, 2 * half), mpp, (x - wx0, y - wy0), stains, params)
        pairs.append((fast, whole))
    return pairs, sizes


def _same(a: Refined, b: Refined) -> bool:
    return repr(a) == repr(b)  # NaN blur compares equal this way, and every bit of the offsets counts


def test_first_window_gives_the_whole_windows_answer_on_real_smears():
    """Real photographs (BCCD, resampled to 0.25 um/px): nuclei of every size, clumps, stain debris."""
    from benchmarks.real_smears import SOURCES, load_source

    shared_path("data", "bccd")
    source = SOURCES["bccd"]
    photos = load_source(source, "held-out", limit=12)
    scale = source.um_per_px / 0.25
    tiles = [cv2.resize(p.rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) for p in photos]
    th, tw = min(t.shape[0] for t in tiles), min(t.shape[1] for t in tiles)
    field = np.concatenate([t[:th, :tw] for t in tiles], axis=1)
    overview = cv2.resize(field, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    stains = estimate_slide_stains([overview], 1.0, SegmentParams())
    boxes = [
        ((bx0 + bx1) / 2 * scale + k * tw, (by0 + by1) / 2 * scale)
        for k, p in enumerate(photos)
        for bx0, by0, bx1, by1 in p.boxes
    ]
    grid = [(x + 0.3, y + 0.7) for y in range(10, th, 41) for x in range(10, field.shape[1], 41)]
    pairs, sizes = _refine_both_ways(field, boxes + grid, stains, CropParams())
    assert all(_same(fast, whole) for fast, whole in pairs)
    assert sum(whole.found for _, whole in pairs) > 20  # nuclei were found, not only glass
    first, whole_px = min(sizes), max(sizes)
    assert first < whole_px and sizes.count(first) == len(pairs)  # the first window, every time
    assert sizes.count(whole_px) > len(pairs)  # and the whole one where it had to (plus the reference)


@pytest.mark.parametrize(
    ("mpp", "reads"),
    # Reads per cell: the first window only, or the first and the whole one (each +1 reference read).
    # At 0.5 um/px the first window is 16 px smaller in um than the margins it needs: the nucleus at
    # the search radius no longer fits.
    [(0.25, [2, 3, 2, 2]), (0.5, [2, 3, 3, 2])],
)
def test_first_window_falls_back_where_a_nucleus_reaches_its_edge(mpp, reads):
    params = CropParams()
    size = 400
    # A small nucleus at the centre, a large one, a nucleus at the search radius, and glass.
    cells = [
        (_cell_window(200, 200, 0.4, mpp, size), (200.3, 200.6)),
        (_cell_window(200, 200, 0.4, mpp, size, radius_um=11.0), (200.5, 200.5)),
        (_cell_window(200 + 5.5 / mpp, 200, 0.4, mpp, size), (200.0, 200.0)),
        (np.full((size, size, 3), 240, np.uint8), (200.0, 200.0)),
    ]
    counts = []
    for field, centre in cells:
        pairs, sizes = _refine_both_ways(field, [centre], STAINS, params, mpp)
        ((fast, whole),) = pairs
        assert _same(fast, whole)
        counts.append((fast.found, len(sizes)))
    assert counts == list(zip([True, True, True, False], reads, strict=True))
