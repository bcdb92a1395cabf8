"""The 4x-reduced level of a slide being simulated: kept on disk, then JPEG-encoded band by band.

Workers write the reduction of the chunk they rendered, one small file per chunk. As soon as the render
has covered a band of :data:`BAND_PX` level-1 rows, a task (on the cluster, beside the rendering)
encodes that band's level-1 tiles into a file of its own and returns the band's 4x reduction (level 2).
The driver then only copies encoded bytes into the slide: no second pass over level 1 at the end, when
nothing else runs. One file per chunk and per band (not one shared file) because workers may run on other
machines over a shared file system, where writes into one file from several hosts are not safe.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .svs import TILE_PX, encode_tile, tiles_of

#: Level-1 rows per band: four tile rows, whose 4x reduction is a whole number of level-2 rows.
BAND_PX = 4 * TILE_PX


@dataclass(frozen=True)
class Level1Store:
    """Level-1 pixels (``height`` x ``width`` x 3, uint8) in pieces of ``chunk_px // 4`` squares.

    Attributes
    ----------
    folder
        Where the pieces live (created by :meth:`create`).
    width, height
        Level-1 size in pixels.
    piece_px
        Side of a piece: the render chunk side divided by 4.
    """

    folder: str
    width: int
    height: int
    piece_px: int

    @classmethod
    def create(cls, folder: Path, width: int, height: int, chunk_px: int) -> Level1Store:
        """Make the folder and return the store."""
        folder.mkdir(parents=True, exist_ok=True)
        return cls(str(folder), width, height, chunk_px // 4)

    def _path(self, row: int, col: int) -> str:
        return os.path.join(self.folder, f"{row}_{col}.npy")

    def write(self, y0: int, x0: int, pixels: np.ndarray) -> None:
        """Store the piece whose top-left level-1 pixel is (y0, x0); a rerun of the task replaces it."""
        path = self._path(y0 // self.piece_px, x0 // self.piece_px)
        with open(path + ".partial", "wb") as f:
            np.save(f, np.ascontiguousarray(pixels))
        os.replace(path + ".partial", path)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Level-1 rows [y0, y1) at full width; pixels no piece covers are white."""
        y1 = min(y1, self.height)
        out = np.full((max(0, y1 - y0), self.width, 3), 255, dtype=np.uint8)
        p = self.piece_px
        for row in range(y0 // p, math.ceil(y1 / p)):
            for col in range(math.ceil(self.width / p)):
                path = self._path(row, col)
                if not os.path.exists(path):
                    continue
                piece = np.load(path)
                ya, yb = max(y0, row * p), min(y1, row * p + piece.shape[0])
                xa, xb = col * p, min(self.width, col * p + piece.shape[1])
                if ya < yb and xa < xb:
                    out[ya - y0 : yb - y0, xa:xb] = piece[ya - row * p : yb - row * p, : xb - xa]
        return out


@dataclass(frozen=True)
class EncodedBand:
    """Level-1 rows ``[y0, y0 + BAND_PX)`` as JPEG tiles in one file, and their 4x reduction.

    Attributes
    ----------
    path
        The tiles' bytes, one after the other in row-major tile order.
    lengths
        Each tile's length in bytes.
    reduced
        The band reduced 4x (rows of level 2), or None when the slide has no level 2.
    """

    path: str
    lengths: tuple[int, ...]
    reduced: np.ndarray | None

    def tiles(self) -> Iterator[bytes]:
        """The encoded tiles, in order."""
        with open(self.path, "rb") as f:
            data = f.read()
        start = 0
        for length in self.lengths:
            yield data[start : start + length]
            start += length


def band_starts(height: int) -> range:
    """First level-1 row of every band of a level ``height`` rows high."""
    return range(0, height, BAND_PX)


def encode_band(y0: int, store: Level1Store, reduce: bool) -> EncodedBand:
    """Encode the level-1 tiles of the band starting at row ``y0`` (all its pieces must be written).

    Parameters
    ----------
    y0
        First level-1 row of the band, a multiple of :data:`BAND_PX`.
    store
        The level-1 pieces.
    reduce
        Also return the band reduced 4x (level 2).

    Returns
    -------
    EncodedBand
    """
    height = min(BAND_PX, store.height - y0)
    # A tile row at a time (a quarter of the band's memory in the worker), unless the band's last rows
    # are no multiple of 4: its reduction then averages across tile rows and needs the band whole.
    strip = TILE_PX if height % 4 == 0 else height
    lengths: list[int] = []
    reduced: list[np.ndarray] = []
    path = os.path.join(store.folder, f"band_{y0}.jpg-tiles")
    with open(path + ".partial", "wb") as f:  # a rerun of the task replaces it
        for top in range(y0, y0 + height, strip):
            rows = store.rows(top, top + strip)
            # The tiles a TIFF writer cuts from the whole level: full width, padded white at the edges.
            for t in range(0, rows.shape[0], TILE_PX):
                for tile in tiles_of(rows[t : t + TILE_PX]):
                    lengths.append(f.write(encode_tile(tile)))
            if reduce:
                reduced.append(reduce4(rows))
    os.replace(path + ".partial", path)
    return EncodedBand(path, tuple(lengths), np.concatenate(reduced) if reduce else None)


def reduce4(image: np.ndarray) -> np.ndarray:
    """An image reduced 4x (rounding its size up), area-averaged."""
    h, w = image.shape[:2]
    return cv2.resize(image, (math.ceil(w / 4), math.ceil(h / 4)), interpolation=cv2.INTER_AREA)
