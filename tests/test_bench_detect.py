"""The hand-written baseline of ``benchmarks/bench_detect.py`` does the job it is compared on: it finds
white-cell nuclei, not red cells, and writes one crop per object."""

from __future__ import annotations

import numpy as np
import pandas as pd
import zarr

from benchmarks.bench_detect import _evaluate, glass_white, hand_written, nucleus_objects

# Median colours of real MGG smears (DESIGN-NOTES section 3, PBC/CellaVision): the baseline's threshold
# was taken from these, so a picture painted in them is what it must get right.
GLASS = (255, 228, 203)
RED_CELL = (202, 164, 165)
NUCLEUS = (70, 25, 133)
PLATELET = (147, 87, 167)


def _disc(image: np.ndarray, cy: float, cx: float, radius: float, colour: tuple[int, int, int]) -> None:
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = colour


def test_bench_glass_white_is_the_brightest_pixels() -> None:
    image = np.full((100, 100, 3), RED_CELL, dtype=np.uint8)
    image[:5] = GLASS  # 5 % glass: above the 97th percentile of brightness
    np.testing.assert_allclose(glass_white(image), GLASS)


def test_bench_nucleus_objects_keep_nuclei_and_drop_red_cells() -> None:
    # 1 um/px: single red cells, a red-cell clump of ~400 um^2 (kept by an Otsu threshold of all stain),
    # a platelet, and one nucleus of 10 um (79 um^2) inside a white cell's paler cytoplasm.
    image = np.full((160, 160, 3), GLASS, dtype=np.uint8)
    for cy, cx in [(20, 20), (20, 40), (40, 20), (140, 30)]:
        _disc(image, cy, cx, 3.75, RED_CELL)
    image[100:120, 100:120] = RED_CELL
    _disc(image, 30, 130, 1.5, PLATELET)
    _disc(image, 80, 70, 7.0, (204, 160, 174))  # neutrophil cytoplasm
    _disc(image, 80, 70, 5.0, NUCLEUS)
    objects = nucleus_objects(image, glass_white(image), mpp=1.0)
    assert len(objects) == 1
    row, col, area = objects[0]
    assert abs(row - 80) < 1 and abs(col - 70) < 1
    assert 60 < area < 100
    # The 40 um^2 floor: a nucleus of 6 um (28 um^2, a small lymphocyte's) is not kept.
    small = np.full((40, 40, 3), GLASS, dtype=np.uint8)
    _disc(small, 20, 20, 3.0, NUCLEUS)
    assert nucleus_objects(small, np.asarray(GLASS, float), mpp=1.0) == []


def test_bench_hand_written_on_a_small_slide(small_slide, tmp_path) -> None:
    out = tmp_path / "crops.zarr"
    found = hand_written(small_slide.slide_path, out)
    truth = pd.read_csv(small_slide.truth_path)
    crops = zarr.open_array(str(out), mode="r")
    assert crops.shape == (len(found), 288, 288, 3)
    assert len(found) > 0
    # Crops hold the slide, not the zeros of an unwritten chunk; the last one was written too.
    assert 100 < crops[0].mean() < 250 and 100 < crops[len(found) - 1].mean() < 250
    recall, precision = _evaluate(found, small_slide.truth_path, 0.25)
    assert recall is not None and precision is not None
    # Nuclei, not red cells: about one crop per white cell at most, nearly all of them on a cell.
    assert len(found) <= 1.2 * len(truth)
    assert precision >= 0.9
    assert recall >= 0.3
