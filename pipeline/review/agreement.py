"""Agreement between annotators of one gallery: counts per class, confusion matrices, Cohen's kappa.

Kappa is computed on the cells both annotators labelled, with every label as its own category ("unsure"
and "not a cell" included: they are answers an examiner gave). It is written out here rather than taken
from scikit-learn, which the pipeline does not depend on; the tests compare it with
``sklearn.metrics.cohen_kappa_score``.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..gallery import open_gallery
from .labels import LABELS, LabelStore

__all__ = ["PairAgreement", "agreement_report", "cohen_kappa", "format_agreement", "pair_agreement"]


def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen's kappa of two raters' labels of the same items.

    Parameters
    ----------
    a, b
        Labels of the same items, in the same order.

    Returns
    -------
    float
        ``(p_o - p_e) / (1 - p_e)``; NaN for no items, and when both raters used one and the same
        label for everything (``p_e = 1``: agreement by chance cannot be told from real agreement).

    Examples
    --------
    >>> round(cohen_kappa(["x", "x", "y", "y"], ["x", "y", "y", "y"]), 3)
    0.5
    """
    if len(a) != len(b):
        raise ValueError(f"the raters labelled {len(a)} and {len(b)} items; kappa needs the same items")
    if not a:
        return float("nan")
    categories = sorted(set(a) | set(b))
    matrix = confusion(a, b, categories).astype(float)
    total = matrix.sum()
    observed = np.trace(matrix) / total
    expected = float(matrix.sum(axis=1) @ matrix.sum(axis=0)) / total**2
    if expected == 1.0:
        return float("nan")
    return float((observed - expected) / (1.0 - expected))


def confusion(a: list[str], b: list[str], categories: list[str]) -> np.ndarray:
    """Counts of (label by A, label by B): rows A's categories, columns B's, in ``categories`` order."""
    position = {name: i for i, name in enumerate(categories)}
    matrix = np.zeros((len(categories), len(categories)), dtype=np.int64)
    for x, y in zip(a, b, strict=True):
        matrix[position[x], position[y]] += 1
    return matrix


@dataclass(frozen=True)
class PairAgreement:
    """Agreement of two annotators on the cells both labelled.

    Attributes
    ----------
    a, b
        The annotators.
    n_cells
        Cells both labelled.
    observed
        Fraction of those cells with the same label.
    kappa
        Cohen's kappa (NaN when undefined, see :func:`cohen_kappa`).
    categories
        Labels either gave, in :data:`~pipeline.review.labels.LABELS` order.
    matrix
        Confusion matrix, rows ``a``'s labels, columns ``b``'s.
    """

    a: str
    b: str
    n_cells: int
    observed: float
    kappa: float
    categories: list[str]
    matrix: np.ndarray


def pair_agreement(table: pd.DataFrame, a: str, b: str) -> PairAgreement:
    """Agreement of columns ``a`` and ``b`` of a label table (one row per cell, None when unlabelled)."""
    both = table[[a, b]].dropna()
    labels_a, labels_b = both[a].tolist(), both[b].tolist()
    order = {name: i for i, name in enumerate(LABELS)}
    categories = sorted(set(labels_a) | set(labels_b), key=lambda name: order.get(name, len(order)))
    matrix = confusion(labels_a, labels_b, categories)
    n = len(both)
    observed = float(np.trace(matrix) / n) if n else float("nan")
    return PairAgreement(a, b, n, observed, cohen_kappa(labels_a, labels_b), categories, matrix)


def agreement_report(gallery_path: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[PairAgreement]]:
    """Counts per class and annotator, and the agreement of every pair of annotators of a gallery.

    Parameters
    ----------
    gallery_path
        ``OUT/<stem>.zarr``.

    Returns
    -------
    counts : pandas.DataFrame
        One row per label any annotator gave (in label order), one column per annotator.
    pairs : list of PairAgreement
        One per pair of annotators, in name order.
    """
    gallery = open_gallery(gallery_path)
    table = LabelStore(gallery.path, gallery.attrs).table()
    annotators = list(table.columns)
    counts = pd.DataFrame({name: table[name].value_counts() for name in annotators}, dtype="Int64")
    counts = counts.reindex([name for name in LABELS if name in counts.index]).fillna(0).astype(int)
    pairs = [pair_agreement(table, a, b) for a, b in itertools.combinations(annotators, 2)]
    return counts, pairs


def format_agreement(
    gallery_path: str | os.PathLike[str], counts: pd.DataFrame, pairs: list[PairAgreement]
) -> str:
    """The report ``python -m pipeline agreement`` prints."""
    lines = [f"{gallery_path}: {counts.shape[1]} annotator(s)"]
    if counts.shape[1] == 0:
        lines.append("no labels yet; label cells with `python -m pipeline review`")
        return "\n".join(lines)
    lines += ["", "cells per label:", counts.to_string()]
    if not pairs:
        lines.append("\none annotator only: agreement needs two")
    for pair in pairs:
        kappa = "undefined" if np.isnan(pair.kappa) else f"{pair.kappa:.3f}"
        lines += [
            "",
            f"{pair.a} vs {pair.b}: {pair.n_cells} cells labelled by both, "
            + (f"{pair.observed:.1%} agree, Cohen's kappa {kappa}" if pair.n_cells else "nothing to compare"),
        ]
        if pair.n_cells:
            frame = pd.DataFrame(pair.matrix, index=pair.categories, columns=pair.categories)
            frame.index.name = f"{pair.a} \\ {pair.b}"
            lines.append(frame.to_string())
    return "\n".join(lines)
