"""The per-pixel maps of one overview tile that detection needs, in one cache-friendly pass.

Detection needs, per pixel, the stain feature (:func:`pipeline.segment.stain_feature`) and the red-cell
layers (:func:`pipeline.quality.red_cell_layers`), both functions of the optical density. The OD itself
is three float32 channels: 18 MB on a 1228 x 1228 px tile, written once and read twice, which costs
more in memory traffic than the arithmetic. Here it is computed in strips of rows that stay in the
processor's cache, and each strip's feature and layers are taken from it at once; only the feature and
the layers (one channel each) are kept. Every step is per pixel, so the maps are bit for bit those of
the whole-tile functions (``tests/test_segment.py`` checks it). (Statistics without a nuclear
direction, from older runs, take ``cv2.magnitude``, whose last bit depends on how its input happens to
be aligned in memory, whole tile or not.) Segmentation recomputes the OD of the few object pixels it
measures from the image and the local white.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import numpy as np

from .od import optical_density as od_against
from .quality import red_cell_layers
from .segment import SegmentParams, SlideStains, local_white, stain_feature

#: Rows per strip: ~2 MB of OD at 1228 px, where the per-strip calls no longer cost (measured: 8 rows
#: 15.4, 32 rows 12.3, 128 rows 11.1 ms a tile against 17.3 ms for whole-tile arrays).
STRIP_ROWS = 128


class TileMaps(NamedTuple):
    """Per-pixel maps of one tile.

    Attributes
    ----------
    white
        The local glass white, ``(h, w, 3)`` uint8 (:func:`pipeline.segment.local_white`).
    feature
        The stain feature, ``(h, w)`` float32.
    layers
        Red-cell layers, ``(h, w)`` float32, NaN where not tissue.
    """

    white: np.ndarray
    feature: np.ndarray
    layers: np.ndarray


def tile_maps(
    rgb: np.ndarray, mpp: float, params: SegmentParams, stains: SlideStains, red_cell_od: float
) -> TileMaps:
    """Local white, stain feature and red-cell layers of an overview tile, without keeping its OD.

    Parameters
    ----------
    rgb
        RGB uint8 overview tile ``(h, w, 3)``.
    mpp
        Its pixel size, um/px.
    params
        Segmentation parameters.
    stains
        The slide's statistics.
    red_cell_od
        A single red cell's OD, the unit of the layers.

    Returns
    -------
    TileMaps
        Equal to ``local_white``, and to ``stain_feature`` and ``red_cell_layers`` of
        :func:`pipeline.segment.optical_density`.
    """
    white = local_white(rgb, mpp, params, stains.white_rgb)
    rgb = np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    feature = np.empty((h, w), np.float32)
    layers = np.empty((h, w), np.float32)
    for a, b in pairwise([*range(0, h, STRIP_ROWS), h]):
        od = od_against(rgb[a:b], white[a:b])
        if stains.nucleus_direction is not None:
            stain_feature(od, stains.red_cell_direction, stains.nucleus_direction, out=feature[a:b])
        else:  # the residual's length (older statistics) is not written in place
            feature[a:b] = stain_feature(od, stains.red_cell_direction)
        red_cell_layers(od, stains.red_cell_direction, red_cell_od, out=layers[a:b])
    return TileMaps(white, feature, layers)
