"""Quality features and the accept/reject rule, on hand-made arrays and tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ParameterError
from pipeline.quality import REASONS, QualityParams, judge, neighbour_gaps_um, ring_features


def _disc(shape, cx, cy, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r * r


def test_ring_coverage_separates_glass_from_a_carpet_of_red_cells():
    params = QualityParams()
    mpp, red = 1.0, 0.4
    shape = (80, 80)
    cell = _disc(shape, 40, 40, 6)
    labels = cell.astype(np.int32)
    sparse = np.where(cell, 1.5, 0.0).astype(np.float32)  # the cell alone on glass
    carpet = np.where(cell, 1.5, red).astype(np.float32)  # every ring pixel is a red cell
    stacked = np.where(cell, 1.5, 2 * red).astype(np.float32)  # red cells on top of each other
    args = (np.array([40.0]), np.array([40.0]), np.array([6.0]), mpp, red, params)
    glass = ring_features(sparse, labels, *args)
    thick = ring_features(carpet, labels, *args)
    double = ring_features(stacked, labels, *args)
    assert glass.coverage[0] == 0.0 and glass.overlap[0] == 0.0
    assert thick.coverage[0] == 1.0 and thick.overlap[0] == 0.0
    assert double.overlap[0] == 1.0


def test_ring_counts_other_objects_as_stained_but_not_as_overlap():
    params = QualityParams()
    shape = (80, 80)
    labels = np.zeros(shape, np.int32)
    labels[_disc(shape, 40, 40, 6)] = 1
    labels[_disc(shape, 52, 40, 4)] = 2  # a neighbour inside the ring
    od = np.where(labels > 0, 1.5, 0.0).astype(np.float32)
    ring = ring_features(od, labels, np.array([40.0]), np.array([40.0]), np.array([6.0]), 1.0, 0.4, params)
    assert 0 < ring.coverage[0] < 0.5
    assert ring.overlap[0] == 0.0


def test_neighbour_gaps_are_edge_to_edge_in_um():
    x = np.array([0.0, 20.0, 60.0, 500.0])
    gaps = neighbour_gaps_um(x, np.zeros(4), np.full(4, 5.0), search_um=60.0)
    assert gaps[0] == pytest.approx(10.0)
    assert gaps[1] == pytest.approx(10.0)
    assert gaps[2] == pytest.approx(30.0)
    assert math.isinf(gaps[3])  # nobody within the search distance
    assert math.isinf(neighbour_gaps_um(np.array([1.0]), np.array([1.0]), np.array([3.0]))[0])


def test_judge_names_the_first_failed_limit_and_scores_margins():
    params = QualityParams()
    table = pd.DataFrame(
        {
            "coverage": [0.3, 0.95, 0.3, 0.3, 0.3, 0.95, np.nan],
            "overlap": [0.0, 0.0, 0.5, 0.0, 0.0, 0.5, np.nan],
            "gap_um": [30.0, 30.0, 30.0, -2.0, 30.0, -2.0, np.inf],
            "blur_um": [0.3, 0.3, 0.3, 0.3, 2.0, 2.0, np.nan],
        }
    )
    verdict = judge(table, params)
    assert verdict.reason.tolist() == [
        "",
        "thick_zone",
        "overlapping",
        "touching",
        "out_of_focus",
        "thick_zone",
        "",
    ]
    assert verdict.accepted.tolist() == [True, False, False, False, False, False, True]
    assert verdict.quality[0] > 0.9
    assert (verdict.quality[1:6] < 0.5).all()
    assert set(verdict.reason) <= {"", *REASONS}


def test_quality_parameters_are_validated():
    with pytest.raises(ParameterError, match="max_coverage"):
        QualityParams(max_coverage=1.5)
    with pytest.raises(ParameterError, match="ring_width_um"):
        QualityParams(ring_width_um=0)
