"""The 4x-reduced level of a slide being simulated, kept on disk as one small file per render chunk.

Workers write the reduction of the chunk they rendered; the driver reads it back band by band to build
the reduced pyramid levels. One file per chunk (not one shared file) because workers may run on other
machines over a shared file system, where writes into one file from several hosts are not safe.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
