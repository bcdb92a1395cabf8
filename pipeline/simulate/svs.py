"""Write Aperio-style SVS files that OpenSlide opens as vendor ``aperio`` with MPP and objective power.

Layout (DESIGN-NOTES.md section 5): page 0 is the tiled JPEG level 0 with the Aperio description; page 1
a stripped thumbnail; then the reduced levels, tiled, in the main IFD chain. Every page is written with
``photometric='rgb', compression='jpeg', metadata=None``: tifffile then stores YCbCr JPEG with 2x2 chroma
subsampling, and writes no second ImageDescription (with one, OpenSlide falls back to generic TIFF).

Level-0 tiles arrive already JPEG-encoded (workers encode them in parallel) with :func:`encode_tile`,
which uses exactly the settings tifffile records in the tags.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import cv2
import imagecodecs
import numpy as np
import tifffile

TILE_PX = 256
JPEG_QUALITY = 85
_APERIO = "Aperio Image Library v12.0.15"


def encode_tile(tile: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG-encode one RGB uint8 tile the way tifffile does for ``photometric='rgb'``."""
    return imagecodecs.jpeg_encode(
        np.ascontiguousarray(tile), level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )


def objective_power(mpp: float) -> float:
    """Nominal objective magnification of a scan at ``mpp`` um/px (40x at 0.25 um/px)."""
    return round(10.0 / mpp, 2)


#: Aperio's names of the codecs in the image description, by tifffile compression.
_CODEC_NAMES = {"jpeg": "JPEG/RGB", 33005: "J2K/KDU", "jpeg2000": "J2K/KDU"}


def _scale(mpp: float | None) -> str:
    """The description's pixel-size fields; none for a scan without a known pixel size."""
    return "" if mpp is None else f"|AppMag = {objective_power(mpp):g}|MPP = {mpp:.6g}"


def _description(
    width: int,
    height: int,
    mpp: float | None,
    quality: int,
    level_size: tuple[int, int] | None,
    compression: int | str = "jpeg",
) -> str:
    head = f"{_APERIO} \r\n{width}x{height} [0,0 {width}x{height}] ({TILE_PX}x{TILE_PX})"
    if level_size is not None:
        head += f" -> {level_size[0]}x{level_size[1]}"
    return f"{head} {_CODEC_NAMES.get(compression, compression)} Q={quality}{_scale(mpp)}"


def pyramid_sizes(
    width: int, height: int, min_levels: int = 3, smallest_px: int = 2048
) -> list[tuple[int, int]]:
    """Level sizes: level 0, then every 4x reduction; at least ``min_levels``, more while large."""
    sizes = [(width, height)]
    while len(sizes) < min_levels or max(sizes[-1]) > smallest_px:
        w, h = sizes[-1]
        if max(w, h) < 4:
            break
        sizes.append((math.ceil(w / 4), math.ceil(h / 4)))
    return sizes


def tiles_of(image: np.ndarray, background: int = 255) -> Iterator[np.ndarray]:
    """Full 256 x 256 tiles of an image in row-major order, padded at the right and bottom."""
    h, w = image.shape[:2]
    for ty in range(0, h, TILE_PX):
        for tx in range(0, w, TILE_PX):
            part = image[ty : ty + TILE_PX, tx : tx + TILE_PX]
            if part.shape[:2] == (TILE_PX, TILE_PX):
                yield part
            else:
                tile = np.full((TILE_PX, TILE_PX, 3), background, dtype=np.uint8)
                tile[: part.shape[0], : part.shape[1]] = part
                yield tile


class SvsWriter:
    """Stream an Aperio SVS to disk: level 0 from encoded tiles, then thumbnail and reduced levels.

    Examples
    --------
    >>> with SvsWriter(path, width, height, mpp=0.25) as svs:   # doctest: +SKIP
    ...     svs.write_level0(encoded_tiles)
    ...     svs.write_thumbnail(thumbnail_rgb)
    ...     svs.write_level(level1_tiles, (w1, h1))
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        mpp: float | None,
        quality: int = JPEG_QUALITY,
        compression: int | str = "jpeg",
    ):
        """``mpp`` None leaves the pixel size out (a faulty scan); ``compression`` other than ``jpeg``
        (e.g. 33005, Aperio's JPEG 2000) takes level-0 tiles as RGB arrays rather than encoded."""
        self.path = Path(path)
        self.width, self.height, self.mpp, self.quality = width, height, mpp, quality
        self.compression = compression
        self._tw = tifffile.TiffWriter(self.path, bigtiff=True)

    def __enter__(self) -> SvsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._tw.close()

    def write_level0(self, encoded_tiles: Iterable[bytes] | Iterable[np.ndarray]) -> None:
        """Write level 0 from JPEG tiles (see :func:`encode_tile`) in row-major tile order (RGB tiles
        when the compression is not JPEG)."""
        self._write_tiled(encoded_tiles, (self.width, self.height), None)

    def write_thumbnail(self, rgb: np.ndarray) -> None:
        """Write the stripped thumbnail page (page 1 of an Aperio file)."""
        h, w = rgb.shape[:2]
        self._tw.write(
            np.ascontiguousarray(rgb),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": 90},
            rowsperstrip=16,
            description=f"{_APERIO} \r\n{self.width}x{self.height} -> {w}x{h} - {_scale(self.mpp)}",
            metadata=None,
        )

    def write_level(self, tiles: Iterable[np.ndarray], size: tuple[int, int]) -> None:
        """Write a reduced level of ``size`` (width, height) from full RGB tiles in row-major order."""
        self._write_tiled(tiles, size, size)

    def _write_tiled(
        self,
        tiles: Iterable[bytes] | Iterable[np.ndarray],
        size: tuple[int, int],
        reduced: tuple[int, int] | None,
    ) -> None:
        w, h = size
        extra: dict = {} if reduced is None else {"subfiletype": 0}
        if self.compression == "jpeg":  # the settings encode_tile uses for pre-encoded level-0 tiles
            extra |= {"compressionargs": {"level": self.quality}, "subsampling": (2, 2)}
        self._tw.write(
            iter(tiles),
            shape=(h, w, 3),
            dtype=np.uint8,
            tile=(TILE_PX, TILE_PX),
            photometric="rgb",
            compression=self.compression,
            description=_description(
                self.width, self.height, self.mpp, self.quality, reduced, self.compression
            ),
            metadata=None,
            **extra,
        )


def thumbnail_from(level: np.ndarray, max_px: int = 1024) -> np.ndarray:
    """A thumbnail no larger than ``max_px`` on its long side, area-averaged."""
    h, w = level.shape[:2]
    scale = min(1.0, max_px / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(level, size, interpolation=cv2.INTER_AREA)


def write_svs(
    image: np.ndarray,
    path: str | Path,
    mpp: float | None,
    quality: int = JPEG_QUALITY,
    compression: int | str = "jpeg",
) -> None:
    """Write an in-memory RGB image as an Aperio SVS with a 4x pyramid and a thumbnail.

    For small images (tests, benchmarks, mosaics of photographs): every level is held in memory.

    Parameters
    ----------
    image
        RGB uint8 ``(h, w, 3)``.
    path
        Output ``.svs`` path.
    mpp
        Level-0 pixel size, um/px (written as the Aperio ``MPP`` and its ``AppMag``); None writes
        neither, as a scan whose pixel size was lost.
    quality
        JPEG quality of the tiles.
    compression
        ``jpeg``, or another tifffile compression of the tiled levels: 33005 (Aperio's JPEG 2000, which
        OpenSlide reads) or ``jpeg2000`` (34712, which OpenSlide refuses).
    """
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"write_svs needs an (h, w, 3) uint8 image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    levels = [image]
    for _ in pyramid_sizes(w, h)[1:]:
        prev = levels[-1]
        size = (math.ceil(prev.shape[1] / 4), math.ceil(prev.shape[0] / 4))
        levels.append(cv2.resize(prev, size, interpolation=cv2.INTER_AREA))
    with SvsWriter(path, w, h, mpp, quality, compression) as svs:
        jpeg = compression == "jpeg"
        svs.write_level0(encode_tile(t, quality) if jpeg else t for t in tiles_of(image))
        svs.write_thumbnail(thumbnail_from(levels[-1]))
        for level in levels[1:]:
            svs.write_level(tiles_of(level), (level.shape[1], level.shape[0]))
