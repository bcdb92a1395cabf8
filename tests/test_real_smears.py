"""Detection and the quality filter on real photographs (a small part of ``benchmarks/real_smears.py``).

Each source's held-out photographs (never used to choose a default) are tiled into a slide and run end to
end; the acceptance numbers of the full benchmark are >= 98 % / >= 90 % / >= 98 %, these samples are
smaller, so the limits leave room for a cell or two.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from benchmarks.real_smears import SOURCES, run_source
from pipeline.runner import SlideEstimate, slide_warnings
from pipeline.segment import (
    DEFAULT_RED_CELL_DIRECTION,
    USUAL_THRESHOLD_OD,
    SegmentParams,
    SlideStains,
    estimate_slide_stains,
)

from .conftest import shared_path


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_keeps_the_white_cells_of_real_readable_fields(name):
    data = shared_path("data")
    row = run_source(SOURCES[name], "held-out", 0.25, data=data, limit=48)
    assert row["uncut"] >= 20, row
    assert row["candidate_recall"] >= 0.95, row
    assert row["gallery_recall"] >= 0.90, row
    assert row["gallery_precision"] >= 0.97, row
    assert not row["warnings"], row


def _eyepiece_fields(data, n=24, mpp=0.5):
    """chula-rbc fields (dense, some purple red cells, tinted glass) seen through an eyepiece: a black
    field stop around a disc, at 0.5 um/px."""
    rng = np.random.default_rng(0)
    fields = []
    for path in sorted((data / "chula-rbc" / "images").glob("*.jpg"))[1::2][:n]:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        rgb = cv2.resize(rgb, None, fx=0.18 / mpp, fy=0.18 / mpp, interpolation=cv2.INTER_AREA)
        h, w = rgb.shape[:2]
        yy, xx = np.mgrid[:h, :w]
        outside = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 >= (0.55 * min(h, w)) ** 2
        rgb[outside] = rng.integers(0, 12, size=(int(outside.sum()), 3))
        fields.append(rgb)
    return fields


def test_black_field_stops_do_not_move_the_stain_estimate():
    data = shared_path("data")
    fields = _eyepiece_fields(data)
    params = SegmentParams()
    with_black = estimate_slide_stains(fields, 0.5, params)
    # the same fields with the black replaced by their own glass
    clean = []
    for f in fields:
        g = f.copy()
        dark = (g < 20).all(axis=2)
        lit = f[~dark]
        brightness = lit.sum(axis=1)
        g[dark] = np.median(lit[brightness >= np.percentile(brightness, 97)], axis=0)
        clean.append(g)
    without = estimate_slide_stains(clean, 0.5, params)
    assert with_black.threshold_od == pytest.approx(without.threshold_od, rel=0.15)
    assert with_black.red_cell_od == pytest.approx(without.red_cell_od, rel=0.15)
    assert np.dot(with_black.red_cell_direction, without.red_cell_direction) > np.cos(np.radians(5))


def test_a_slide_of_dense_purple_vignetted_fields_is_never_silently_empty(tmp_path):
    from pipeline.gallery import open_gallery
    from pipeline.runner import run_slide
    from pipeline.simulate.svs import write_svs

    data = shared_path("data")
    fields = [f[:170, :228] for f in _eyepiece_fields(data)]
    mosaic = np.vstack([np.hstack(fields[i : i + 6]) for i in range(0, 24, 6)])
    write_svs(mosaic, tmp_path / "eyepiece.svs", 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_slide(tmp_path / "eyepiece.svs", tmp_path / "out", workers=0, progress=False)
    attrs = open_gallery(result.gallery).attrs
    lo, hi = USUAL_THRESHOLD_OD
    assert lo <= attrs["estimate"]["stains"]["threshold_od"] <= hi  # the black did not make it 1.4 OD
    # Red cells only: either white-cell candidates are found, or the run says that it found none, in a
    # warning, in the result (the batch record's column) and in the gallery's attrs.
    said = any("no white-cell candidate" in str(w.message) for w in caught)
    assert said == (result.candidates == 0), (result.candidates, [str(w.message) for w in caught])
    assert said == any("no white-cell candidate" in w for w in attrs["warnings"])
    # black is not the smear: the typical density is that of the red cells, not of the field stops
    assert attrs["estimate"]["density_layers"] < 1.0


def test_unusual_estimates_and_empty_stained_slides_are_reported():
    stains = SlideStains((230.0, 220.0, 215.0), DEFAULT_RED_CELL_DIRECTION, 0.03, 0.09, 0.5, 0.2)
    assert slide_warnings(SlideEstimate(stains, 0.9), 12) == []
    empty = slide_warnings(SlideEstimate(stains, 0.9), 0)
    assert len(empty) == 1 and "no white-cell candidate" in empty[0]
    odd = SlideStains((230.0, 220.0, 215.0), (0.1, 0.2, 0.97), 0.4, 1.4, 0.5, 1.2)
    notes = slide_warnings(SlideEstimate(odd, 3.0), 5)
    assert len(notes) == 4, notes  # threshold, red-cell OD, red-cell colour, no monolayer
    blank = SlideStains((230.0, 220.0, 215.0), DEFAULT_RED_CELL_DIRECTION, 0.0, 0.02, 0.0)
    assert slide_warnings(SlideEstimate(blank, float("nan")), 0) == [
        "no stain in the sample windows: the slide looks like blank glass"
    ]
