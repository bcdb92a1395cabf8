"""Reading through OpenSlide, for every format it opens that the direct TIFF reader does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from ..errors import SlideError
from ._common import _reason
from .pixels import _composite_rgba_on_white


class _OpenSlideReader:
    """OpenSlide ``read_region`` in level pixels, RGBA composited on white."""

    def __init__(self, path: Path, handle: openslide.OpenSlide) -> None:
        self.path = path
        self._handle = handle
        self._downsamples = handle.level_downsamples

    def close(self) -> None:
        self._handle.close()

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        # OpenSlide takes the top-left in level-0 pixels; with a non-integer downsample OpenSlide
        # itself lands between level pixels (its own behaviour, not corrected here).
        ds = self._downsamples[level]
        try:
            image = self._handle.read_region((round(x * ds), round(y * ds)), level, (width, height))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.path}: level {level} region at ({x}, {y}) cannot be read ({_reason(exc)}); "
                "the file is corrupt, re-copy or re-export it"
            ) from exc
        return _composite_rgba_on_white(np.asarray(image))
