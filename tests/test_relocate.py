"""Re-centring at full resolution and the edge-blur estimate, on synthetic cells with known answers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.errors import ParameterError
from pipeline.quality import QualityParams
from pipeline.relocate import CropParams, is_padded, refine_centre
from pipeline.segment import DEFAULT_NUCLEUS_DIRECTION, SlideStains, _orthogonal

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


def _cell_window(cx, cy, blur_um, mpp=0.25, size=200, lobes=((0.0, 0.0),)):
    """A purple nucleus (one disc per lobe offset, um) on pink red-cell background, blurred."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    od = np.zeros((size, size, 3), np.float32)
    od[...] = (0.05, 0.07, 0.045)
    for dx, dy in lobes:
        nucleus = (xx - cx - dx / mpp) ** 2 + (yy - cy - dy / mpp) ** 2 < (3.0 / mpp) ** 2
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
