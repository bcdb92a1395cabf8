"""The :class:`Slide` handle over any reader, :func:`open_slide`, and the picklable :class:`SlideRef`."""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from ..errors import ParameterError, SlideError
from ._common import _Reader, _reason
from .mpp import _resolve_mpp
from .opening import _check_path, _open_any, _Opened
from .resample import _axis_plan, _plan_kind, _resample

# A level counts as "fine enough" for a requested mpp if it is at most this much coarser, so rounding
# in reported MPPs and downsamples does not send a read to a level with 16x the pixels.
_LEVEL_MPP_TOLERANCE = 0.01
# read_at_mpp reads at most this many level pixels at once (~50 MB of RGB); it interpolates in
# tiles of resample._REMAP_TILE_PX output pixels square.
_BAND_SOURCE_PX = 1 << 24


@dataclass(frozen=True)
class SlideRef:
    """A picklable description of a slide, put into Dask graphs instead of a handle.

    Parameters
    ----------
    path : str
        Path of the slide file (``os.PathLike`` is converted to ``str``).
    mpp_override : float or None
        Level-0 pixel size in um/px that replaces the file's metadata (the CLI's ``--mpp``).
    """

    path: str
    mpp_override: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        if self.mpp_override is not None:
            object.__setattr__(self, "mpp_override", float(self.mpp_override))


class Slide:
    """An open whole-slide image (a per-process handle; use :class:`SlideRef` across processes).

    Create with :func:`open_slide` or :func:`cached_slide`. Use as a context manager to close it.

    Attributes
    ----------
    path : pathlib.Path
        The slide file.
    vendor : str
        OpenSlide's vendor (``"aperio"``, ``"generic-tiff"``, ...) or ``"tiff"`` for the tifffile reader.
    backend : str
        ``"tiff-tiles"``, ``"openslide"`` or ``"tifffile"`` (see the module docstring).
    mpp : float
        Level-0 pixel size in um/px (the override wins over metadata).
    level_count : int
    level_dimensions : tuple of (int, int)
        ``(width, height)`` of each level, finest first.
    level_downsamples : tuple of float
        Level-0 pixels per level pixel (OpenSlide's mean of the x and y ratios).
    properties : Mapping[str, str]
        Read-only metadata (OpenSlide's properties, or ``tiff.*`` tags).
    dimensions : (int, int)
        ``(width, height)`` of level 0.
    greyscale : bool
        The file stores one colour sample per pixel (read as grey RGB). Stain colour is what tells
        white cells from red cells, so detection finds few or none on such scans. Always False for
        files only OpenSlide decodes (it returns RGB whatever the file holds).
    """

    def __init__(self, path: Path, opened: _Opened, mpp: float, mpp_override: float | None) -> None:
        self.path = path
        self.vendor = opened.vendor
        self.backend = opened.backend
        self.mpp = mpp
        self.level_count = len(opened.level_dimensions)
        self.level_dimensions = opened.level_dimensions
        self.level_downsamples = opened.level_downsamples
        self.properties: Mapping[str, str] = MappingProxyType(opened.properties)
        self.dimensions = opened.level_dimensions[0]
        self.greyscale = opened.greyscale
        self._mpp_override = mpp_override
        self._reader: _Reader | None = opened.reader
        self._failed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file handle; later reads raise :class:`SlideError`."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"Slide handles cannot be pickled (open file of {self.path.name}); put "
            "SlideRef(path, mpp_override) into the task and call cached_slide(ref) in the worker"
        )

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, vendor={self.vendor!r}, backend={self.backend!r}, "
            f"mpp={self.mpp:g}, levels={self.level_count})"
        )

    @property
    def ref(self) -> SlideRef:
        """The picklable :class:`SlideRef` that reopens this slide in another process."""
        return SlideRef(str(self.path), self._mpp_override)

    @property
    def usable(self) -> bool:
        """False once closed or after a read error (the cache then reopens the file)."""
        return self._reader is not None and not self._failed

    # -- geometry ----------------------------------------------------------------------------------

    def level_mpp(self, level: int) -> float:
        """Pixel size of ``level`` in um/px (``mpp`` times the level's downsample)."""
        return self.mpp * self.level_downsamples[self._check_level(level)]

    def level_for_mpp(self, mpp_target: float) -> int:
        """The level whose pixel size is nearest ``mpp_target`` on a log scale."""
        target = self._check_mpp_out(mpp_target)
        errors = [abs(math.log(self.level_mpp(lv) / target)) for lv in range(self.level_count)]
        return int(np.argmin(errors))

    def _read_level(self, mpp_out: float) -> int:
        """Coarsest level at least as fine as ``mpp_out`` (1 % tolerance), else level 0."""
        limit = mpp_out * (1.0 + _LEVEL_MPP_TOLERANCE)
        fine_enough = [lv for lv in range(self.level_count) if self.level_mpp(lv) <= limit]
        return max(fine_enough, key=self.level_mpp) if fine_enough else 0

    # -- pixels ------------------------------------------------------------------------------------

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read a rectangle of one level.

        Parameters
        ----------
        level : int
            Pyramid level (0 is the finest).
        x, y : int
            Top-left corner in pixels of ``level`` (not level 0); may be negative.
        width, height : int
            Size in pixels of ``level``; at least 1.

        Returns
        -------
        numpy.ndarray
            RGB uint8 of shape ``(height, width, 3)``; parts outside the level are white (255).

        Raises
        ------
        SlideError
            The slide is closed, or its data cannot be read or decoded.
        """
        level = self._check_level(level)
        x, y, width, height = (operator.index(v) for v in (x, y, width, height))
        if width < 1 or height < 1:
            raise ParameterError(f"region size must be at least 1x1 px, got {width}x{height}")
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_w), min(y + height, level_h)
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):
            return self._read_inside(level, x, y, width, height)  # readers return fresh arrays
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_inside(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        reader = self._reader
        if reader is None:
            raise SlideError(f"{self.path}: the slide was closed; open it again")
        try:
            return reader.read(level, x, y, width, height)
        except SlideError:
            self._failed = True
            raise
        except Exception as exc:
            self._failed = True
            raise SlideError(
                f"{self.path}: level {level} region at ({x}, {y}) cannot be read ({_reason(exc)})"
            ) from exc

    def read_at_mpp(self, x_px: float, y_px: float, width: int, height: int, mpp_out: float) -> np.ndarray:
        """Read a window resampled to ``mpp_out`` um/px.

        The window's top-left corner is the level-0 position ``(x_px, y_px)``; output pixel ``(i, j)``
        covers level-0 pixels ``[x_px + j*r, x_px + (j+1)*r)`` horizontally (likewise vertically) with
        ``r = mpp_out / mpp``. The coarsest level at least as fine as ``mpp_out`` (within 1 %) is read.
        Parts outside the slide are white.

        Resampling, with ``s`` level pixels per output pixel:

        - ``s == 1`` and the window on the level's pixel grid: the level pixels, copied.
        - ``s`` an integer and the window on the grid: ``cv2.resize(..., INTER_AREA)``, i.e. exact
          ``s x s`` block means.
        - otherwise: a box filter of ``round(s)`` pixels (none when enlarging) followed by bilinear
          sampling at each output pixel's centre (``cv2.remap``). This is ``INTER_LINEAR`` when
          enlarging and within about 1 grey level (mean) of ``INTER_AREA`` when shrinking tissue.

        What is exact: sample positions are computed from the slide origin and rounded to 1/32 px,
        and every sampled pixel's box lies inside the pixels read, so a window cut out of a larger
        window (origin moved by whole output pixels, ``x_px + a*r``) has bit-identical pixels, borders
        included; the same holds for any split into bands. The only exception is float rounding of
        ``x_px + a*r`` moving a position across a 1/64-px rounding boundary (not seen in tests).

        Parameters
        ----------
        x_px, y_px : float
            Top-left corner in level-0 pixels.
        width, height : int
            Output size in pixels.
        mpp_out : float
            Output pixel size in um/px.

        Returns
        -------
        numpy.ndarray
            RGB uint8 of shape ``(height, width, 3)``.
        """
        mpp_out = self._check_mpp_out(mpp_out)
        width, height = int(width), int(height)
        if width < 1 or height < 1:
            raise ParameterError(f"output size must be at least 1x1 px, got {width}x{height}")
        level = self._read_level(mpp_out)
        scale = mpp_out / self.level_mpp(level)  # level pixels per output pixel
        ds = self.level_downsamples[level]
        u0, v0 = float(x_px) / ds, float(y_px) / ds
        kind = _plan_kind(u0, v0, scale)
        plan_x = _axis_plan(kind, u0, scale, width)
        plan_y = _axis_plan(kind, v0, scale, height)
        src_x0, src_x1 = plan_x.source_span(0, width)
        # Read in bands of output rows so huge windows (thumbnails) never hold a whole level; bands
        # are large because tiles straddling a band edge are decoded twice. A copy is one read.
        rows_per_band = max(1, int(_BAND_SOURCE_PX / ((src_x1 - src_x0) * max(scale, 1.0))))
        if kind == "copy":
            rows_per_band = height
        out = np.empty((height, width, 3), dtype=np.uint8)
        for start in range(0, height, rows_per_band):
            rows = slice(start, min(height, start + rows_per_band))
            src_y0, src_y1 = plan_y.source_span(rows.start, rows.stop)
            source = self.read_region(level, src_x0, src_y0, src_x1 - src_x0, src_y1 - src_y0)
            out[rows] = _resample(source, plan_x, plan_y, rows)
        return out

    def thumbnail(self, max_size_px: int) -> tuple[np.ndarray, float]:
        """An RGB image of the whole slide whose longer side is at most ``max_size_px``.

        Returns
        -------
        image : numpy.ndarray
            RGB uint8 ``(height, width, 3)``; never enlarged beyond level 0.
        mpp : float
            Its pixel size in um/px.
        """
        max_size_px = int(max_size_px)
        if max_size_px < 1:
            raise ParameterError(f"thumbnail size must be at least 1 px, got {max_size_px}")
        width0, height0 = self.dimensions
        ratio = max(1.0, max(width0, height0) / max_size_px)  # level-0 px per thumbnail px
        width = max(1, min(max_size_px, int(width0 / ratio + 1e-6)))
        height = max(1, min(max_size_px, int(height0 / ratio + 1e-6)))
        mpp_out = self.mpp * ratio
        return self.read_at_mpp(0.0, 0.0, width, height, mpp_out), mpp_out

    # -- validation --------------------------------------------------------------------------------

    def _check_level(self, level: int) -> int:
        level = int(level)
        if not 0 <= level < self.level_count:
            raise ParameterError(f"{self.path}: level {level} does not exist (0-{self.level_count - 1})")
        return level

    def _check_mpp_out(self, mpp_out: float) -> float:
        value = float(mpp_out)
        if not math.isfinite(value) or value <= 0:
            raise ParameterError(f"output pixel size must be a positive number of um/px, got {mpp_out!r}")
        return value


def open_slide(path: str | os.PathLike[str], mpp_override: float | None = None) -> Slide:
    """Open a whole-slide image.

    Parameters
    ----------
    path : str or os.PathLike
        Slide file: anything OpenSlide reads, or a TIFF tifffile reads.
    mpp_override : float or None
        Level-0 pixel size in um/px replacing the metadata (validated against ``MPP_RANGE_UM``).

    Returns
    -------
    Slide

    Raises
    ------
    SlideError
        Missing, a directory, empty, not a slide, truncated, or unreadable.
    MppError
        No usable pixel size in the metadata and no override, or an implausible value.

    Examples
    --------
    >>> with open_slide("scan.svs", mpp_override=0.25) as slide:  # doctest: +SKIP
    ...     tile = slide.read_region(0, 0, 0, 512, 512)
    """
    slide_path = Path(os.fspath(path))
    _check_path(slide_path)
    opened = _open_any(slide_path)
    try:
        mpp = _resolve_mpp(slide_path, opened.mpp_xy, mpp_override)
    except BaseException:
        if opened.reader is not None:
            opened.reader.close()
        raise
    override = None if mpp_override is None else float(mpp_override)
    return Slide(slide_path, opened, mpp, override)
