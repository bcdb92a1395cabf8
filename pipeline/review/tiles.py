"""Pictures the review app serves: Deep Zoom tiles of slides, gallery crops, crops of rejected candidates.

Slide tiles come from OpenSlide's own Deep Zoom generator (:class:`openslide.deepzoom.DeepZoomGenerator`),
which picks the pyramid level each Deep Zoom level is best made from, so every level of the slide is
used. Handles are opened once per slide and kept (OpenSlide reads are thread-safe).
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import cv2
import numpy as np
import openslide
from openslide.deepzoom import DeepZoomGenerator

from ..errors import SlideError

__all__ = ["TILE_FORMAT", "SlideTiles", "encode_jpeg"]

TILE_FORMAT = "jpeg"
# 254 + 2 x 1 px overlap = 256: tiles line up with the slide's own 256 px JPEG tiles.
_TILE_PX = 254
_OVERLAP_PX = 1
_JPEG_QUALITY = 85


def encode_jpeg(rgb: np.ndarray, quality: int = _JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB uint8 image."""
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError(f"could not encode a {rgb.shape} image as JPEG")
    return encoded.tobytes()


class SlideTiles:
    """Deep Zoom tiles and on-the-fly crops of one slide.

    Parameters
    ----------
    path
        The slide file (as its gallery names it).

    Raises
    ------
    SlideError
        If OpenSlide cannot open the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(
                f"{path}: OpenSlide cannot open it ({exc}), so the viewer cannot show it; the gallery "
                "is still shown"
            ) from exc
        self.deepzoom = DeepZoomGenerator(
            self.slide, tile_size=_TILE_PX, overlap=_OVERLAP_PX, limit_bounds=False
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

        White outside the slide, as the gallery's padded crops.
        """
        level = self.slide.get_best_level_for_downsample(side_px / out_px)
        factor = float(self.slide.level_downsamples[level])
        size = max(1, round(side_px / factor))
        left, top = round(x_px - side_px / 2), round(y_px - side_px / 2)
        rgba = np.asarray(self.slide.read_region((left, top), level, (size, size)))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
        return cv2.resize(rgb, (out_px, out_px), interpolation=cv2.INTER_AREA)

    def close(self) -> None:
        """Release the OpenSlide handle."""
        self.slide.close()


class TileCache:
    """One :class:`SlideTiles` per slide path, opened on first use (thread-safe)."""

    def __init__(self) -> None:
        self._tiles: dict[Path, SlideTiles] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> SlideTiles:
        """The tiles of ``path``, opening it the first time."""
        with self._lock:
            tiles = self._tiles.get(path)
            if tiles is None:
                tiles = self._tiles[path] = SlideTiles(path)
            return tiles

    def close(self) -> None:
        """Release every handle."""
        with self._lock:
            for tiles in self._tiles.values():
                tiles.close()
            self._tiles.clear()
