"""Pictures to check a run by eye: the overview with detections, and a contact sheet of crops."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd

from ._files import atomic_path

if TYPE_CHECKING:
    from .gallery import Gallery

#: Mark colours (RGB) per outcome.
COLOURS = {
    "accepted": (0, 170, 0),
    "thick_zone": (220, 120, 0),
    "cut": (200, 0, 200),
    "touching": (230, 0, 0),
    "out_of_focus": (0, 120, 230),
}
_PADDED_COLOUR = (255, 150, 0)


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
    rejected_layer = picture.copy()
    px_per_um = scale / image_mpp
    accepted_rings = []
    for row in candidates.itertuples(index=False):
        outcome = "accepted" if row.accepted else str(row.reason)
        colour = COLOURS.get(outcome, (90, 90, 90))
        x = row.x_px * mpp0 * px_per_um
        y = row.y_px * mpp0 * px_per_um
        radius = max(3, round(math.sqrt(row.area_um2 / math.pi) * px_per_um) + 2)
        ring = ((round(x), round(y)), radius, colour, 1 if radius < 8 else 2, cv2.LINE_AA)
        if row.accepted:
            accepted_rings.append(ring)
        else:
            cv2.circle(rejected_layer, *ring)
    # Rejected rings at half strength: the thick zone, where most rejects lie, stays visible under them.
    picture = cv2.addWeighted(picture, 0.5, rejected_layer, 0.5, 0.0)
    for ring in accepted_rings:
        cv2.circle(picture, *ring)
    return _with_legend(picture, candidates)


def legend_text_px(width_px: int) -> int:
    """Cap height of the legend's text on a picture ``width_px`` wide: 1/80 of the width, >= 16 px.

    Pictures are mostly looked at fitted to a screen, not at 100 %; text that scales with the picture
    stays readable either way (34 px on a 2400 px overview: 17 px when shown at half size).
    """
    return max(16, round(width_px / 80))


def _with_legend(picture: np.ndarray, candidates: pd.DataFrame) -> np.ndarray:
    counts = {"accepted": int(candidates["accepted"].sum()) if len(candidates) else 0}
    for reason, n in (
        candidates.loc[~candidates["accepted"], "reason"].value_counts().items() if len(candidates) else []
    ):
        counts[str(reason)] = int(n)
    text_px = legend_text_px(picture.shape[1])
    # FONT_HERSHEY_SIMPLEX at scale 1 has a cap height of about 22 px.
    font_scale, thickness = text_px / 22.0, max(1, round(text_px / 14))
    line_h = round(text_px * 1.8)
    entries = [
        (name, COLOURS.get(name, (90, 90, 90))) for name in [*COLOURS, *sorted(set(counts) - set(COLOURS))]
    ]
    texts = [f"{name}: {counts.get(name, 0)}" for name, _ in entries]
    text_w = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)[0][0] for t in texts)
    legend_w = max(picture.shape[1], text_w + 3 * text_px)
    legend = np.full((line_h * len(entries) + text_px, legend_w, 3), 255, np.uint8)
    for i, ((_, colour), text) in enumerate(zip(entries, texts, strict=True)):
        y = text_px + i * line_h + text_px // 2
        cv2.circle(
            legend, (text_px, y - text_px // 2), round(text_px * 0.55), colour, max(2, thickness), cv2.LINE_AA
        )
        cv2.putText(
            legend,
            text,
            (round(text_px * 2.1), y),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (0, 0, 0),
            thickness,
            cv2.LINE_AA,
        )
    if legend.shape[1] > picture.shape[1]:
        pad = np.full((picture.shape[0], legend.shape[1] - picture.shape[1], 3), 255, np.uint8)
        picture = np.hstack([picture, pad])
    return np.vstack([picture, legend])


def contact_sheet(
    images: np.ndarray,
    labels: list[str] | None = None,
    columns: int = 10,
    tile_px: int = 144,
    padded: list[bool] | None = None,
) -> np.ndarray:
    """A grid of crops (N, H, W, 3), each shrunk to ``tile_px`` with an optional label under it.

    Parameters
    ----------
    images
        The crops.
    labels
        Text under each tile (e.g. its gallery index and quality).
    columns
        Tiles per row.
    tile_px
        Side of a tile.
    padded
        Crops padded with white at the slide's edge: framed in orange, with "padded" after the label.

    Returns
    -------
    ndarray
        The sheet, RGB uint8.
    """
    n = len(images)
    if n == 0:
        sheet = np.full((60, 400, 3), 255, np.uint8)
        cv2.putText(
            sheet, "no accepted cells", (10, 35), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 1, cv2.LINE_AA
        )
        return sheet
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    label_h = 22 if labels else 0
    cell_h = tile_px + label_h + 4
    sheet = np.full((rows * cell_h, columns * (tile_px + 4), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        small = cv2.resize(np.asarray(images[i]), (tile_px, tile_px), interpolation=cv2.INTER_AREA)
        y, x = r * cell_h + 2, c * (tile_px + 4) + 2
        sheet[y : y + tile_px, x : x + tile_px] = small
        if padded is not None and padded[i]:
            cv2.rectangle(sheet, (x, y), (x + tile_px - 1, y + tile_px - 1), _PADDED_COLOUR, 3)
        if labels:
            text = labels[i][:22] + (" padded" if padded is not None and padded[i] else "")
            cv2.putText(
                sheet,
                text,
                (x, y + tile_px + 16),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.42,
                (0, 0, 0),
                1,
                cv2.LINE_AA,
            )
    return sheet


def gallery_contact_sheet(gallery: Gallery, n_max: int = 100) -> np.ndarray:
    """Contact sheet of a gallery's first ``n_max`` crops, each labelled ``#<row> q=<quality>``.

    The row is the crop's index in the gallery (``images[row]``, ``cells/`` row and exported file name),
    so a tile can be traced back; padded crops are framed and marked "padded".
    """
    n = min(len(gallery), n_max)
    if n == 0:
        return contact_sheet(np.zeros((0, 1, 1, 3), np.uint8))
    quality = gallery.cells["quality"].to_numpy()[:n]
    labels = [f"#{i} q={q:.2f}" for i, q in enumerate(quality)]
    padded = [bool(p) for p in gallery.cells["padded"].to_numpy()[:n]] if "padded" in gallery.cells else None
    return contact_sheet(np.asarray(gallery.images[:n]), labels, padded=padded)


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
