"""Pictures the review app serves: Deep Zoom tiles of slides, gallery crops, crops of rejected candidates.

Slide tiles come from OpenSlide's own Deep Zoom generator (:class:`openslide.deepzoom.DeepZoomGenerator`),
which picks the pyramid level each Deep Zoom level is best made from, so every level of the slide is
used. It reads pixels through :mod:`pipeline.slide`, the reader ``run`` used: the viewer shows what the
detection saw, also for TIFFs OpenSlide refuses (stripped, one level, 16-bit, ...). Handles are opened once
per slide and kept (their reads are thread-safe).
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path

import cv2
import numpy as np
from openslide import PROPERTY_NAME_BACKGROUND_COLOR
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from ..slide import Slide, open_slide

__all__ = ["TILE_FORMAT", "SlideTiles", "TileCache", "encode_jpeg"]

TILE_FORMAT = "jpeg"
# 254 + 2 x 1 px overlap = 256: tiles line up with the slide's own 256 px JPEG tiles.
_TILE_PX = 254
_OVERLAP_PX = 1
_JPEG_QUALITY = 85


def encode_jpeg(rgb: np.ndarray, quality: int = _JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB uint8 image."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not encode a {rgb.shape} image as JPEG")
    return encoded.tobytes()


class _DeepZoomSource:
    """The part of OpenSlide's slide API that :class:`DeepZoomGenerator` uses, over a pipeline Slide."""

    def __init__(self, slide: Slide) -> None:
        self.slide = slide
        self.level_count = slide.level_count
        self.level_dimensions = slide.level_dimensions
        self.level_downsamples = slide.level_downsamples
        self.dimensions = slide.dimensions
        # No bounds (the whole slide is shown) and a white background, as the gallery's padding.
        self.properties = {PROPERTY_NAME_BACKGROUND_COLOR: "ffffff"}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level at least as fine as ``downsample`` (OpenSlide's rule)."""
        fine_enough = [lv for lv, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-6)]
        return max(fine_enough) if fine_enough else 0

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA pixels of ``level``, top-left ``location`` in level-0 pixels (OpenSlide's convention)."""
        factor = self.level_downsamples[level]
        x, y = math.floor(location[0] / factor), math.floor(location[1] / factor)
        rgb = self.slide.read_region(level, x, y, max(1, size[0]), max(1, size[1]))
        return Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("RGBA")


class SlideTiles:
    """Deep Zoom tiles and on-the-fly crops of one slide.

    Parameters
    ----------
    path
        The slide file (as its gallery names it).
    mpp
        Its level-0 pixel size as the gallery recorded it (slides without one in their metadata were
        run with ``--mpp``).

    Raises
    ------
    SlideError
        If the file cannot be opened.
    """

    def __init__(self, path: Path, mpp: float | None) -> None:
        self.path = path
        self.slide = open_slide(path, mpp_override=mpp)
        self.source = _DeepZoomSource(self.slide)
        self.deepzoom = DeepZoomGenerator(
            self.source,  # type: ignore[arg-type]  # duck-typed: the members DeepZoomGenerator reads
            tile_size=_TILE_PX,
            overlap=_OVERLAP_PX,
            limit_bounds=False,
        )

    def dzi(self) -> str:
        """The Deep Zoom descriptor (XML) of the slide."""
        return self.deepzoom.get_dzi(TILE_FORMAT)

    def tile(self, level: int, column: int, row: int) -> bytes | None:
        """JPEG bytes of one Deep Zoom tile; ``None`` for a level or address the slide does not have."""
        if not 0 <= level < self.deepzoom.level_count:
            return None
        columns, rows = self.deepzoom.level_tiles[level]
        if not (0 <= column < columns and 0 <= row < rows):
            return None
        image = self.deepzoom.get_tile(level, (column, row))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=_JPEG_QUALITY)
        return buffer.getvalue()

    def crop(self, x_px: float, y_px: float, side_px: float, out_px: int) -> np.ndarray:
        """A square of ``side_px`` level-0 pixels centred on ``(x_px, y_px)``, resized to ``out_px``.

        Read with :meth:`~pipeline.slide.Slide.read_at_mpp`, as ``run`` reads its crops: at a gallery's
        scale it is the gallery's crop of that point. White outside the slide, as the gallery's padding.
        """
        mpp_out = side_px * self.slide.mpp / out_px
        left, top = x_px - side_px / 2.0, y_px - side_px / 2.0
        return self.slide.read_at_mpp(left, top, out_px, out_px, mpp_out)

    def close(self) -> None:
        """Release the slide's file handle."""
        self.slide.close()


class TileCache:
    """One :class:`SlideTiles` per slide path, opened on first use (thread-safe)."""

    def __init__(self) -> None:
        self._tiles: dict[Path, SlideTiles] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, mpp: float | None) -> SlideTiles:
        """The tiles of ``path``, opening it the first time."""
        with self._lock:
            tiles = self._tiles.get(path)
            if tiles is None:
                tiles = self._tiles[path] = SlideTiles(path, mpp)
            return tiles

    def close(self) -> None:
        """Release every handle."""
        with self._lock:
            for tiles in self._tiles.values():
                tiles.close()
            self._tiles.clear()
