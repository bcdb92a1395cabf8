"""Pixel conversion of TIFF pages to RGB uint8: bit depth, greyscale, alpha on white."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tifffile

from ._common import _Unsupported

_JPEG_COMPRESSIONS = frozenset({6, 7})
# Levels at most this large are read once at open to find the bit depth of >8-bit images.
_PROBE_MAX_PX = 1 << 24


@dataclass(frozen=True)
class _PixelFormat:
    """How a page's native samples become RGB uint8."""

    colour_samples: int  # 1 (grey) or 3 (RGB)
    samples: int  # all samples per pixel, including extra samples
    dtype: np.dtype
    white: float  # native value displayed as 255
    invert: bool = False  # MinIsWhite
    alpha_index: int | None = None
    alpha_associated: bool = False

    @property
    def is_rgb8(self) -> bool:
        return (
            self.dtype == np.uint8
            and self.samples == 3
            and self.white == 255
            and not self.invert
            and self.alpha_index is None
        )

    def to_rgb(self, native: np.ndarray) -> np.ndarray:
        """Convert an ``(h, w, samples)`` native array to RGB uint8, alpha composited on white."""
        if self.is_rgb8:
            return native
        colour = native[..., : self.colour_samples].astype(np.float32)
        if self.white != 255:
            colour *= np.float32(255.0 / self.white)
        if self.invert:
            colour = 255.0 - colour
        if self.alpha_index is not None:
            alpha = np.clip(native[..., self.alpha_index : self.alpha_index + 1] / self.white, 0.0, 1.0)
            alpha = alpha.astype(np.float32)
            # Associated alpha is premultiplied already: only the white background is added.
            colour = colour + 255.0 * (1.0 - alpha) if self.alpha_associated else _over_white(colour, alpha)
        if self.colour_samples == 1:
            colour = np.repeat(colour, 3, axis=2)
        return np.clip(np.rint(colour), 0, 255).astype(np.uint8)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return colour * alpha + 255.0 * (1.0 - alpha)


def _composite_rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's non-premultiplied RGBA to RGB on a white background (transparent = outside)."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    weight = alpha.astype(np.float32) / 255.0
    rgb = _over_white(rgba[..., :3].astype(np.float32), weight)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _page_format(page: tifffile.TiffPage, white: float | None = None) -> _PixelFormat:
    """Describe a page's samples, or raise :class:`_Unsupported` naming what is not handled."""
    dtype = page.dtype
    if dtype is None or dtype.kind not in "uf" or dtype == np.bool_:
        raise _Unsupported(f"{page.bitspersample}-bit samples of format {page.sampleformat}")
    if page.imagedepth != 1:
        raise _Unsupported("volumetric TIFF pages")
    photometric = int(page.photometric)
    if photometric in (0, 1):
        colour = 1
    elif photometric == 2 or (photometric == 6 and page.compression in _JPEG_COMPRESSIONS):
        colour = 3  # JPEG decoders return YCbCr as RGB
    else:
        raise _Unsupported(f"photometric interpretation {page.photometric.name}")
    if page.samplesperpixel < colour:
        raise _Unsupported(f"{page.samplesperpixel} samples for {page.photometric.name}")
    alpha_index, associated = None, False
    for i, kind in enumerate(page.extrasamples or ()):
        if int(kind) in (1, 2):
            alpha_index, associated = colour + i, int(kind) == 1
            break
    if alpha_index is not None and alpha_index >= page.samplesperpixel:
        alpha_index = None
    return _PixelFormat(
        colour_samples=colour,
        samples=page.samplesperpixel,
        dtype=np.dtype(dtype),
        white=_nominal_white(page) if white is None else white,
        invert=photometric == 0,
        alpha_index=alpha_index,
        alpha_associated=associated,
    )


def _nominal_white(page: tifffile.TiffPage) -> float:
    """White from the tags alone: 255 for 8-bit, else MaxSampleValue or the bit depth."""
    dtype = np.dtype(page.dtype)
    if dtype.kind == "f":
        return 1.0
    bits = int(page.bitspersample)
    if dtype == np.uint8 and bits == 8:
        return 255.0
    max_tag = page.tags.get(281)  # MaxSampleValue
    if max_tag is not None:
        value = max_tag.value
        value = float(max(value) if isinstance(value, tuple | list) else value)
        if 0 < value < np.iinfo(dtype).max:
            return value
    return float(2**bits - 1)


def _probed_white(page: tifffile.TiffPage, nominal: float) -> float:
    """Estimate white of a >8-bit image from a small level's maximum (12-bit data in 16-bit files).

    The maximum is rounded up to the next ``2**bits - 1`` (at least 255) so every tile of the slide is
    scaled the same way and a slightly dark coarse level does not change the scale.
    """
    dtype = np.dtype(page.dtype)
    if dtype == np.uint8 or page.imagewidth * page.imagelength > _PROBE_MAX_PX:
        return nominal
    try:
        data = page.asarray()
    except Exception:  # a broken level is reported when it is read, not here
        return nominal
    top = float(np.nanmax(data)) if data.size else 0.0
    if dtype.kind == "f":
        return 1.0 if top <= 1.0 else top
    if top <= 0:
        return nominal
    bits = max(8, math.ceil(math.log2(top + 1)))  # never stretch a dim image beyond 8-bit range
    return float(min(2**bits - 1, nominal))
