"""Quality features and the accept/reject rule, on hand-made arrays and tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ParameterError
from pipeline.quality import (
    REASONS,
    QualityParams,
    judge,
    neighbour_gaps_um,
    red_cell_layers,
    ring_features,
    slide_density,
)


def _disc(shape, cx, cy, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r * r


def _ring(layers, labels, params=None):
    params = params or QualityParams()
    return ring_features(layers, labels, np.array([40.0]), np.array([40.0]), np.array([6.0]), 1.0, params)


def test_ring_layers_count_red_cells_and_leave_other_objects_out():
    shape = (80, 80)
    cell = _disc(shape, 40, 40, 6)
    labels = cell.astype(np.int32)
    glass = _ring(np.where(cell, 3.0, 0.0).astype(np.float32), labels)
    carpet = _ring(np.where(cell, 3.0, 1.0).astype(np.float32), labels)  # touching single red cells
    stacked = _ring(np.where(cell, 3.0, 2.0).astype(np.float32), labels)  # two layers everywhere
    assert glass.layers[0] == 0.0 and glass.coverage[0] == 0.0 and glass.stacked[0] == 0.0
    assert carpet.layers[0] == pytest.approx(1.0) and carpet.coverage[0] == 1.0 and carpet.stacked[0] == 0.0
    assert stacked.layers[0] == pytest.approx(2.0) and stacked.stacked[0] == 1.0
    # a dense neighbour object in the ring is stain for coverage but not red cells for layers
    labels2 = labels.copy()
    labels2[_disc(shape, 52, 40, 4)] = 2
    other = _ring(np.where(labels2 > 0, 3.0, 0.0).astype(np.float32), labels2)
    assert 0 < other.coverage[0] < 0.5 and other.layers[0] == 0.0


def test_red_cell_layers_are_od_along_the_red_cell_direction_in_single_cells():
    direction = np.array([0.45, 0.75, 0.49])
    unit = direction / np.linalg.norm(direction)
    od = np.zeros((2, 2, 3), np.float32)
    od[0, 0] = 0.2 * unit  # one red cell
    od[0, 1] = 0.4 * unit  # two stacked
    od[1, 0] = -0.1 * unit  # below the white: glass
    layers = red_cell_layers(od, direction * 3, 0.2)
    assert layers[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert layers[0, 1] == pytest.approx(2.0, abs=1e-5)
    assert layers[1, 0] == 0.0 and layers[1, 1] == 0.0


@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (4, 1), (2, 2)])
def test_red_cell_layers_keep_the_shape_of_tiny_images(shape):
    od = np.full((*shape, 3), 0.1, np.float32)
    od[0, 0] = 1.0  # black: not the smear
    layers = red_cell_layers(od, (0.45, 0.75, 0.49), 0.2)
    assert layers.shape == shape
    assert np.isnan(layers[0, 0]) and np.isfinite(layers.ravel()[1:]).all()


def test_slide_density_is_the_median_of_stained_blocks():
    params = QualityParams(density_block_um=10.0)
    a = np.zeros((40, 40), np.float32)
    a[:20] = 0.8  # half of the window: a monolayer
    a[20:30] = 2.4  # a quarter: a thick zone
    density = slide_density([a], 1.0, params)  # glass blocks do not count
    assert density == pytest.approx(0.8)
    assert math.isnan(slide_density([np.zeros((40, 40), np.float32)], 1.0, params))


def test_a_crowded_monolayer_is_kept_and_a_field_much_denser_than_the_slide_is_not():
    params = QualityParams()
    table = pd.DataFrame(
        {
            # a ring of touching single red cells (1.0) on a slide whose typical field is 0.9 layers,
            # as the real photographs are; then red cells stacked 2.5 deep on the same slide
            "layers": [1.0, 2.5, 1.0, 1.0, 1.0, 1.0, np.nan],
            "gap_um": [30.0, 30.0, -2.0, 30.0, 30.0, 0.5, np.inf],
            "blur_um": [0.3, 0.3, 0.3, 2.0, 0.3, 0.3, np.nan],
            "cut": [False, False, False, False, True, False, False],
        }
    )
    verdict = judge(table, params, density=0.9)
    assert verdict.reason.tolist() == ["", "thick_zone", "touching", "out_of_focus", "cut", "touching", ""]
    assert verdict.accepted.tolist() == [True, False, False, False, False, False, True]
    assert verdict.density_ratio[0] == pytest.approx(1.0 / 0.9)
    assert verdict.quality[0] > 0.9
    assert (verdict.quality[1:6] < 0.5).all()
    assert set(verdict.reason) <= {"", *REASONS}
    # on a sparse slide (typical 0.3 layers) the typical field counts as 0.6 layers: a ring of touching
    # single red cells is kept, red cells stacked 1.6 deep (more than 2.5 x 0.6) are not
    sparse = pd.DataFrame({"layers": [1.0, 1.6], "gap_um": [30.0, 30.0]})
    assert judge(sparse, params, density=0.3).reason.tolist() == ["", "thick_zone"]
    # on a slide as crowded as the readable fields, the same 1.6 layers are a monolayer
    assert judge(sparse, params, density=0.9).reason.tolist() == ["", ""]
    # no density (blank glass): not judged on it
    assert judge(table.iloc[1:2], params).reason.tolist() == [""]


def test_neighbour_gaps_are_edge_to_edge_in_um():
    x = np.array([0.0, 20.0, 60.0, 500.0])
    gaps = neighbour_gaps_um(x, np.zeros(4), np.full(4, 5.0), search_um=60.0)
    assert gaps[0] == pytest.approx(10.0)
    assert gaps[1] == pytest.approx(10.0)
    assert gaps[2] == pytest.approx(30.0)
    assert math.isinf(gaps[3])  # nobody within the search distance
    assert math.isinf(neighbour_gaps_um(np.array([1.0]), np.array([1.0]), np.array([3.0]))[0])


def test_quality_parameters_are_validated():
    with pytest.raises(ParameterError, match="thick_factor"):
        QualityParams(thick_factor=0)
    with pytest.raises(ParameterError, match="ring_width_um"):
        QualityParams(ring_width_um=0)
    with pytest.raises(ParameterError, match="min_gap_um"):
        QualityParams(min_gap_um=math.nan)


# ------------------------------------------------------------- against the straightforward versions
def _reference_layers(od, direction, red_cell_od):
    """red_cell_layers as first written: a float64 projection and a per-pixel minimum over channels."""
    e = np.asarray(direction, float)
    e = e / np.linalg.norm(e) / max(red_cell_od, 1e-6)
    import cv2

    layers = cv2.transform(od, e.astype(np.float32)[None]).reshape(od.shape[:2])
    layers = np.maximum(layers, 0.0)
    layers[od.min(axis=2) >= 0.6] = np.nan
    return layers


def _reference_ring(layers, labels, x_px, y_px, radius_px, mpp, params):
    """ring_features as first written: one object at a time, every mean by numpy."""
    h, w = layers.shape
    out = np.full((len(x_px), 3), np.nan)
    for k, (x, y, r) in enumerate(zip(x_px, y_px, radius_px, strict=True)):
        inner = r + params.ring_gap_um / mpp
        outer = inner + params.ring_width_um / mpp
        y0, y1 = max(0, math.floor(y - outer)), min(h, math.ceil(y + outer) + 1)
        x0, x1 = max(0, math.floor(x - outer)), min(w, math.ceil(x + outer) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        d2 = (yy + 0.5 - y) ** 2 + (xx + 0.5 - x) ** 2
        ring = (d2 >= inner**2) & (d2 < outer**2)
        if not ring.any():
            continue
        window = layers[y0:y1, x0:x1][ring]
        other = labels[y0:y1, x0:x1][ring] > 0
        out[k, 0] = float(np.mean((window > params.stained_factor) | other))
        free = window[~other]
        free = free[~np.isnan(free)]
        if free.size:
            out[k, 1] = float(free.mean())
            out[k, 2] = float(np.mean(free > params.stacked_factor))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_layers_and_ring_features_equal_the_straightforward_versions_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    h, w = 90, 120
    od = rng.gamma(1.5, 0.15, (h, w, 3)).astype(np.float32)
    od[rng.random((h, w)) < 0.05] = rng.uniform(0.55, 2.5, 3).astype(np.float32)  # black, near the limit
    od[10:20, 30:50] = 0.6  # exactly at the limit: not tissue
    # a direction with a negative component takes the exhaustive path
    direction = [(0.45, 0.75, 0.49), (0.5, -0.1, 0.8)][seed % 2]
    layers = red_cell_layers(od, direction, 0.2)
    np.testing.assert_array_equal(layers, _reference_layers(od, direction, 0.2))
    assert np.isnan(layers).any()
    labels = np.zeros((h, w), np.int32)
    for i, (cy, cx) in enumerate(rng.uniform([-5, -5], [h + 5, w + 5], (30, 2))):
        labels[_disc((h, w), cx, cy, rng.uniform(2, 9))] = i + 1
    n = 60
    x, y = rng.uniform(-20, w + 20, n), rng.uniform(-20, h + 20, n)
    x[:10], y[:10] = np.round(x[:10] * 2) / 2, np.round(y[:10] * 2) / 2  # on pixel edges and centres
    radius = rng.uniform(0.0, 15.0, n)
    radius[:5] = [0.0, 0.5, 1.0, 2.5, 7.0]
    mpp = [0.8, 1.0, 0.5, 2.0][seed % 4]
    params = QualityParams(ring_gap_um=float(rng.uniform(0.3, 3)), ring_width_um=float(rng.uniform(0.4, 14)))
    got = ring_features(layers, labels, x, y, radius, mpp, params)
    want = _reference_ring(layers, labels, x, y, radius, mpp, params)
    np.testing.assert_array_equal(got[["coverage", "layers", "stacked"]].to_numpy(), want)
    assert np.isfinite(want).any() and np.isnan(want).any()
    # a few objects on a large tile: their boxes are measured one by one
    big_layers = np.zeros((700, 700), np.float32)
    big_labels = np.zeros((700, 700), np.int32)
    big_layers[300 : 300 + h, 250 : 250 + w], big_labels[300 : 300 + h, 250 : 250 + w] = layers, labels
    some = slice(0, 8)
    got = ring_features(big_layers, big_labels, x[some] + 250, y[some] + 300, radius[some], mpp, params)
    want = _reference_ring(big_layers, big_labels, x[some] + 250, y[some] + 300, radius[some], mpp, params)
    np.testing.assert_array_equal(got[["coverage", "layers", "stacked"]].to_numpy(), want)
