"""Pictures to check a run by eye: the overview with detections, and a contact sheet of crops."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ._files import atomic_path

#: Mark colours (RGB) per outcome.
COLOURS = {
    "accepted": (0, 170, 0),
    "thick_zone": (220, 120, 0),
    "cut": (200, 0, 200),
    "touching": (230, 0, 0),
    "out_of_focus": (0, 120, 230),
}


def overview_picture(
    image: np.ndarray, image_mpp: float, mpp0: float, candidates: pd.DataFrame, max_px: int = 2400
) -> np.ndarray:
    """Mark candidates on a low-resolution image of the slide: circles coloured by outcome, a legend.

    Parameters
    ----------
    image
        RGB image of the whole slide (a coarse level or thumbnail).
    image_mpp
        Its pixel size, um/px.
    mpp0
        Level-0 pixel size, um/px (candidate coordinates are level-0 px).
    candidates
        Table with ``x_px``, ``y_px``, ``area_um2``, ``accepted`` and ``reason``.
    max_px
        Longest side of the picture.
    """
    scale = min(1.0, max_px / max(image.shape[:2]))
    if scale < 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    picture = np.ascontiguousarray(image[..., :3]).copy()
    px_per_um = scale / image_mpp
    for row in candidates.itertuples(index=False):
        outcome = "accepted" if row.accepted else str(row.reason)
        colour = COLOURS.get(outcome, (90, 90, 90))
        x = row.x_px * mpp0 * px_per_um
        y = row.y_px * mpp0 * px_per_um
        radius = max(3, round(math.sqrt(row.area_um2 / math.pi) * px_per_um) + 2)
        cv2.circle(picture, (round(x), round(y)), radius, colour, 1 if radius < 8 else 2, cv2.LINE_AA)
    return _with_legend(picture, candidates)


def _with_legend(picture: np.ndarray, candidates: pd.DataFrame) -> np.ndarray:
    counts = {"accepted": int(candidates["accepted"].sum()) if len(candidates) else 0}
    for reason, n in (
        candidates.loc[~candidates["accepted"], "reason"].value_counts().items() if len(candidates) else []
    ):
        counts[str(reason)] = int(n)
    line_h = 22
    legend = np.full((line_h * len(COLOURS) + 8, max(picture.shape[1], 260), 3), 255, np.uint8)
    for i, (name, colour) in enumerate(COLOURS.items()):
        y = 18 + i * line_h
        cv2.circle(legend, (12, y - 5), 7, colour, 2, cv2.LINE_AA)
        cv2.putText(
            legend,
            f"{name}: {counts.get(name, 0)}",
            (26, y),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    if legend.shape[1] > picture.shape[1]:
        pad = np.full((picture.shape[0], legend.shape[1] - picture.shape[1], 3), 255, np.uint8)
        picture = np.hstack([picture, pad])
    return np.vstack([picture, legend])


def contact_sheet(
    images: np.ndarray, labels: list[str] | None = None, columns: int = 10, tile_px: int = 144
) -> np.ndarray:
    """A grid of crops (N, H, W, 3), each shrunk to ``tile_px`` with an optional label under it."""
    n = len(images)
    if n == 0:
        sheet = np.full((60, 400, 3), 255, np.uint8)
        cv2.putText(
            sheet, "no accepted cells", (10, 35), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 1, cv2.LINE_AA
        )
        return sheet
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    label_h = 16 if labels else 0
    cell_h = tile_px + label_h + 4
    sheet = np.full((rows * cell_h, columns * (tile_px + 4), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        small = cv2.resize(np.asarray(images[i]), (tile_px, tile_px), interpolation=cv2.INTER_AREA)
        y, x = r * cell_h + 2, c * (tile_px + 4) + 2
        sheet[y : y + tile_px, x : x + tile_px] = small
        if labels:
            cv2.putText(
                sheet,
                labels[i][:22],
                (x, y + tile_px + 12),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.35,
                (0, 0, 0),
                1,
                cv2.LINE_AA,
            )
    return sheet


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an RGB image as PNG.

    Parameters
    ----------
    rgb
        uint8 image ``(h, w, 3)``.

    Returns
    -------
    bytes
    """
    # zlib level 1: a smear's noise barely compresses at any level (11.6 vs 11.5 MB for a 3 mm overview),
    # and level 1 takes a fifth less time than the default 3.
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not encode a {rgb.shape} image as PNG")
    return encoded.tobytes()


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary name, then a rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB image as PNG atomically (a temporary name, then a rename)."""
    write_file(path, png_bytes(rgb))
