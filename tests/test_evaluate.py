"""One-to-one matching of detections to truth, and the evaluate command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from pipeline.evaluate import match


def test_match_is_one_to_one_closest_first_and_counts_duplicates():
    truth_x = np.array([0.0, 100.0, 200.0])
    truth_y = np.zeros(3)
    radius = np.full(3, 5.0)
    det_x = np.array([1.0, 3.0, 101.0, 400.0])
    det_y = np.zeros(4)
    m = match(det_x, det_y, truth_x, truth_y, radius, min_radius_um=6.0)
    assert m.truth_of_detection.tolist() == [0, -1, 1, -1]
    assert m.detection_of_truth.tolist() == [0, 2, -1]
    assert m.duplicate.tolist() == [False, True, False, False]  # 3.0 is a second hit on cell 0
    assert m.distance_um[0] == 1.0 and np.isnan(m.distance_um[3])


def test_match_radius_follows_cell_size():
    m = match(np.array([9.0]), np.array([0.0]), np.array([0.0]), np.array([0.0]), np.array([10.0]))
    assert m.truth_of_detection[0] == 0  # within a 10 um radius cell, beyond the 6 um minimum
    m = match(np.array([9.0]), np.array([0.0]), np.array([0.0]), np.array([0.0]), np.array([3.0]))
    assert m.truth_of_detection[0] == -1


def test_evaluate_command_agrees_with_an_independent_count(small_slide, tmp_path):
    from pipeline.gallery import open_gallery
    from pipeline.runner import run_slide

    result = run_slide(small_slide.slide_path, tmp_path, workers=0, progress=False)
    command = [sys.executable, "-m", "pipeline", "evaluate", str(result.gallery), str(small_slide.truth_path)]
    proc = subprocess.run([*command, "--json"], capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout)
    # independent: brute-force nearest truth cell for every accepted cell
    import pandas as pd

    truth = pd.read_csv(small_slide.truth_path)
    cells = open_gallery(result.gallery).cells
    d = np.hypot(
        cells["x_um"].to_numpy()[:, None] - truth["x_um"].to_numpy()[None, :],
        cells["y_um"].to_numpy()[:, None] - truth["y_um"].to_numpy()[None, :],
    )
    limit = np.maximum(truth["diameter_um"].to_numpy() / 2, 6.0)[None, :]
    hits = (d <= limit).any(axis=1)
    assert report["accepted"]["detections"] == len(cells)
    assert report["accepted"]["matched"] + report["accepted"]["duplicates"] == int(hits.sum())
    assert report["truth_cells"] == len(truth)
