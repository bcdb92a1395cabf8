"""A picture of every simulated class, labelled: for the README and for checking morphology by eye."""

from __future__ import annotations

import math

import cv2
import numpy as np

from .cells import ALL_CLASSES, render_cell
from .stain import BASE_STAIN_MATRIX, concentrations_to_od

GLASS = 0.94  # transmittance of bare glass as a fraction of full scale


def sprite_rgb(cell_class: str, seed: int, mpp: float, size_px: int) -> np.ndarray:
    """One cell of a class drawn on bright glass, ``size_px`` square, with the base stain."""
    centre = size_px / 2
    sprite = render_cell(cell_class, seed, centre, centre, mpp)
    canvas = np.zeros((size_px, size_px, 3), np.float32)
    h, w = sprite.conc.shape[:2]
    ya, xa = max(0, sprite.y0), max(0, sprite.x0)
    yb, xb = min(size_px, sprite.y0 + h), min(size_px, sprite.x0 + w)
    canvas[ya:yb, xa:xb] = sprite.conc[ya - sprite.y0 : yb - sprite.y0, xa - sprite.x0 : xb - sprite.x0]
    od = concentrations_to_od(canvas, BASE_STAIN_MATRIX)
    return np.clip(255.0 * GLASS * 10.0 ** (-od), 0, 255).astype(np.uint8)


def render_legend(mpp: float = 0.25, seed: int = 0, columns: int = 5, cell_um: float = 28.0) -> np.ndarray:
    """An RGB grid with one example of every class in :data:`ALL_CLASSES`, each labelled.

    Parameters
    ----------
    mpp
        Pixel size the cells are drawn at, um/px.
    seed
        Seed of the examples.
    columns
        Cells per row.
    cell_um
        Side of each grid cell, um.
    """
    size = math.ceil(cell_um / mpp)
    label_h = max(16, size // 7)
    tiles = []
    for i, name in enumerate(ALL_CLASSES):
        rgb = sprite_rgb(name, seed * 1000 + i, mpp, size)
        label = np.full((label_h, size, 3), 255, np.uint8)
        scale = 0.35 * size / 112
        text = name.replace("_", " ")
        font = cv2.FONT_HERSHEY_SIMPLEX
        cv2.putText(label, text, (3, label_h - 5), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.vstack([rgb, label]))
    blank = np.full_like(tiles[0], 255)
    while len(tiles) % columns:
        tiles.append(blank)
    rows = [np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)]
    return np.vstack(rows)
