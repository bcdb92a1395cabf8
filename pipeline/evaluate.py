"""Compare a gallery with the simulator's truth: recall, precision, centring error, duplicates.

Matching is one-to-one: candidate-truth pairs closer than the match radius (the larger of
``min_radius_um`` and the truth cell's radius) are taken in order of distance, each candidate and each
truth cell at most once. A candidate left over that lies within the radius of an already matched truth
cell is a *duplicate*; any other leftover is a *false* detection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .errors import ParameterError
from .gallery import open_gallery

MIN_MATCH_RADIUS_UM = 6.0


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of detections to truth cells."""

    truth_of_detection: np.ndarray  # index into truth, -1 if unmatched
    detection_of_truth: np.ndarray  # index into detections, -1 if unmatched
    distance_um: np.ndarray  # per detection, distance to its truth (nan if unmatched)
    duplicate: np.ndarray  # per detection: unmatched but within the radius of a matched truth cell


def match(
    det_x_um: np.ndarray,
    det_y_um: np.ndarray,
    truth_x_um: np.ndarray,
    truth_y_um: np.ndarray,
    truth_radius_um: np.ndarray,
    min_radius_um: float = MIN_MATCH_RADIUS_UM,
) -> Matching:
    """Match detections to truth cells one-to-one, closest pairs first (see the module docstring)."""
    n_det, n_truth = len(det_x_um), len(truth_x_um)
    truth_of = np.full(n_det, -1, dtype=np.int64)
    det_of = np.full(n_truth, -1, dtype=np.int64)
    distance = np.full(n_det, np.nan)
    duplicate = np.zeros(n_det, dtype=bool)
    if n_det == 0 or n_truth == 0:
        return Matching(truth_of, det_of, distance, duplicate)
    radius = np.maximum(np.asarray(truth_radius_um, dtype=float), min_radius_um)
    tree = cKDTree(np.column_stack([truth_x_um, truth_y_um]))
    det = np.column_stack([det_x_um, det_y_um])
    pairs = []
    for i, near in enumerate(tree.query_ball_point(det, r=float(radius.max()))):
        for j in near:
            d = math.hypot(det[i, 0] - truth_x_um[j], det[i, 1] - truth_y_um[j])
            if d <= radius[j]:
                pairs.append((d, i, j))
    pairs.sort()
    within: dict[int, list[int]] = {}
    for d, i, j in pairs:
        within.setdefault(i, []).append(j)
        if truth_of[i] < 0 and det_of[j] < 0:
            truth_of[i], det_of[j], distance[i] = j, i, d
    for i, truths in within.items():
        if truth_of[i] < 0 and any(det_of[j] >= 0 for j in truths):
            duplicate[i] = True
    return Matching(truth_of, det_of, distance, duplicate)


def _rate(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


def evaluate_tables(
    candidates: pd.DataFrame, cells: pd.DataFrame, truth: pd.DataFrame, mpp: float
) -> dict[str, Any]:
    """Recall and precision of candidates and accepted cells against truth, by class and by zone.

    Parameters
    ----------
    candidates, cells
        The gallery's tables (level-0 ``x_px``, ``y_px``).
    truth
        The simulator's truth table.
    mpp
        Level-0 pixel size of the slide, um/px.
    """
    if not {"x_um", "y_um", "diameter_um", "cell_class", "zone"} <= set(truth.columns):
        raise ParameterError(
            "the truth table lacks simulator columns (x_um, y_um, diameter_um, cell_class, zone)"
        )
    tx, ty = truth["x_um"].to_numpy(float), truth["y_um"].to_numpy(float)
    tr = truth["diameter_um"].to_numpy(float) / 2
    report: dict[str, Any] = {"truth_cells": len(truth)}
    for name, table in (("candidates", candidates), ("accepted", cells)):
        m = match(table["x_px"].to_numpy(float) * mpp, table["y_px"].to_numpy(float) * mpp, tx, ty, tr)
        found = m.detection_of_truth >= 0
        true_pos = int((m.truth_of_detection >= 0).sum())
        errors = m.distance_um[m.truth_of_detection >= 0]
        section: dict[str, Any] = {
            "detections": len(table),
            "matched": true_pos,
            "recall": _rate(int(found.sum()), len(truth)),
            "precision": _rate(true_pos, len(table)),
            "duplicates": int(m.duplicate.sum()),
            "false": int(((m.truth_of_detection < 0) & ~m.duplicate).sum()),
            "centring_error_um": {
                "median": float(np.median(errors)) if errors.size else None,
                "p95": float(np.percentile(errors, 95)) if errors.size else None,
            },
            "recall_by_class": {
                str(c): _rate(
                    int(found[truth["cell_class"].to_numpy() == c].sum()),
                    int((truth["cell_class"] == c).sum()),
                )
                for c in sorted(truth["cell_class"].unique())
            },
            "recall_by_zone": {
                str(z): _rate(
                    int(found[truth["zone"].to_numpy() == z].sum()), int((truth["zone"] == z).sum())
                )
                for z in sorted(truth["zone"].unique())
            },
        }
        report[name] = section
    return report


def evaluate_gallery(gallery_path: str | Path, truth_path: str | Path) -> dict[str, Any]:
    """Evaluate a gallery against a ``*.truth.csv`` written by ``python -m pipeline simulate``."""
    gallery = open_gallery(gallery_path)
    truth_file = Path(truth_path)
    if not truth_file.is_file():
        raise ParameterError(f"truth file {truth_file} not found; simulate writes it beside the slide")
    truth = pd.read_csv(truth_file)
    return evaluate_tables(gallery.candidates, gallery.cells, truth, float(gallery.attrs["slide"]["mpp"]))
