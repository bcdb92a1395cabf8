"""Optical density: the one place where light becomes absorbance.

Bright-field absorbance adds where intensity multiplies (Beer-Lambert): ``OD = -log10(I / I0)`` per
channel, with ``I0`` the white of the glass. Every stage computes it here, from 8-bit levels through
look-up tables, so that the same pixel gives the same OD everywhere:

- :func:`od_lut` against one white (the slide's glass): re-centring at full resolution, the thumbnail's
  stain map;
- :func:`optical_density` against a white per pixel (the local glass of the overview, see
  :func:`pipeline.segment.optical_density`), or one white.

Pixels at or above their white read as glass (0); a black pixel reads as level 1 (a finite OD).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["od_lut", "optical_density", "optical_density_of"]

#: log10 of every 8-bit level (0 read as 1: a black pixel has OD log10(I0), not infinity).
_LOG10 = np.log10(np.maximum(np.arange(256, dtype=np.float64), 1.0)).astype(np.float32)


def od_lut(white_rgb: Sequence[float]) -> np.ndarray:
    """Look-up table ``(1, 256, 3)`` float32 of each 8-bit level's OD against ``white_rgb``, for ``cv2.LUT``.

    Parameters
    ----------
    white_rgb
        The glass white per channel (any positive levels, fractional allowed).
    """
    white = np.maximum(np.asarray(white_rgb, dtype=np.float64), 1.0)[None, :]
    levels = np.maximum(np.arange(256, dtype=np.float64), 1.0)[:, None]
    od = np.maximum(np.log10(white) - np.log10(levels), 0.0)
    return od.astype(np.float32)[None]


def optical_density(rgb: np.ndarray, white: np.ndarray | Sequence[float]) -> np.ndarray:
    """``-log10(I / I0)`` per channel, >= 0, as float32 ``(h, w, 3)``.

    Parameters
    ----------
    rgb
        RGB uint8 image ``(h, w, 3)``.
    white
        The glass white: three levels, or a uint8 image of the same shape (a white per pixel).
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if isinstance(white, np.ndarray) and white.shape == rgb.shape:
        white = np.ascontiguousarray(white, dtype=np.uint8)
        # log10(I0) - log10(min(I, I0)) through a table: two lookups and a subtraction per channel.
        od = cv2.LUT(white, _LOG10)
        cv2.subtract(od, cv2.LUT(cv2.min(rgb, white), _LOG10), dst=od)
        return od
    return cv2.LUT(rgb, od_lut(white))


def optical_density_of(levels: np.ndarray, white: np.ndarray) -> np.ndarray:
    """:func:`optical_density` of a few pixels against their whites, with numpy (no OpenCV call).

    The same two table lookups and float32 subtraction, so the same values as the whole image's OD at
    those pixels.

    Parameters
    ----------
    levels, white
        uint8 arrays of one shape (for example ``(n, 3)``: pixels and the glass white at each).
    """
    levels = np.asarray(levels, dtype=np.uint8)
    white = np.asarray(white, dtype=np.uint8)
    return _LOG10[white] - _LOG10[np.minimum(levels, white)]
