"""Whole-slide image access for the detection pipeline.

One :class:`Slide` type over three readers, chosen when the file is opened:

``"tiff-tiles"``
    Aperio SVS and generic tiled TIFF that OpenSlide opens and whose levels map one-to-one (by
    dimensions) onto TIFF pages: tiles are read with one file descriptor (``os.pread``) and decoded
    with the page's own tifffile decoder (JPEG tables, YCbCr, predictors), several times faster than
    OpenSlide's ``read_region`` and pixel-identical to it (see ``tests/test_slide.py``).
``"openslide"``
    Every other format OpenSlide reads; RGBA is composited on white.
``"tifffile"``
    TIFFs OpenSlide rejects but tifffile reads (stripped, one level, greyscale, RGBA, 16-bit, planar).

Handles hold open files and cannot be pickled. Dask graphs carry a :class:`SlideRef`; tasks call
:func:`cached_slide`, which keeps a few handles per process and reopens a handle after an error.

Examples
--------
>>> with open_slide("scan.svs") as slide:  # doctest: +SKIP
...     overview = slide.read_at_mpp(0, 0, 2048, 2048, mpp_out=1.0)
"""

from __future__ import annotations

import logging
import math
import operator
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import cv2
import numpy as np
import openslide
import tifffile

from pipeline.errors import MppError, ParameterError, SlideError, is_interrupt

__all__ = ["MPP_RANGE_UM", "Slide", "SlideRef", "cached_slide", "check_mpp_option", "open_slide"]

MPP_RANGE_UM: tuple[float, float] = (0.05, 10.0)
"""Plausible level-0 pixel sizes in um/px; metadata or ``--mpp`` outside this range is an error."""

_MPP_HINT = "pass --mpp UM_PER_PX (e.g. --mpp 0.25)"
_MPP_XY_WARN_FRACTION = 0.05
# A level counts as "fine enough" for a requested mpp if it is at most this much coarser, so rounding
# in reported MPPs and downsamples does not send a read to a level with 16x the pixels.
_LEVEL_MPP_TOLERANCE = 0.01
_CACHE_MAX_HANDLES = 4
# Sample positions are rounded to 1/32 px (OpenCV's remap precision) on the slide's global grid, so
# a window's pixels depend only on where they are, not on which larger window they were cut from.
_POSITION_STEPS_PER_PX = 32
# read_at_mpp reads at most this many level pixels at once (~50 MB of RGB); it interpolates in
# tiles of _REMAP_TILE_PX output pixels square.
_BAND_SOURCE_PX = 1 << 24
_REMAP_TILE_PX = 1024
# Levels at most this large are read once at open to find the bit depth of >8-bit images.
_PROBE_MAX_PX = 1 << 24
_DIRECT_VENDORS = frozenset({"aperio", "generic-tiff"})
# Codecs whose output the tests compare with OpenSlide's (none, LZW, JPEG, deflate); others, e.g.
# Aperio's JPEG 2000, go through OpenSlide.
_DIRECT_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946})
_JPEG_COMPRESSIONS = frozenset({6, 7})
_MAX_REASON_CHARS = 90

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """One short line describing ``exc`` for embedding in a user-facing message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


class _Unsupported(Exception):
    """A TIFF page layout the segment reader does not handle (internal; becomes a fallback)."""


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's warnings about broken IFDs while we probe a file; we report our own."""
    logger = logging.getLogger("tifffile")

    def drop(_record: logging.LogRecord) -> bool:
        return False

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# --------------------------------------------------------------------------------------------------
# Pixel conversion
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Readers: each returns RGB uint8 for a rectangle that lies inside the level
# --------------------------------------------------------------------------------------------------


class _Reader(Protocol):
    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray: ...

    def close(self) -> None: ...


class _FileHandle:
    """A lazily opened read-only descriptor; ``pread`` is thread-safe without a lock on POSIX."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _descriptor(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._closed:
                    raise SlideError(f"{self.path}: the slide was closed; open it again")
                if self._fd is None:
                    try:
                        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    except OSError as exc:
                        raise SlideError(f"{self.path}: cannot be opened ({_reason(exc)})") from exc
        return self._fd

    def pread(self, offset: int, size: int) -> bytes:
        fd = self._descriptor()
        if hasattr(os, "pread"):
            return os.pread(fd, size, offset)
        with self._lock:  # Windows: seek+read must not interleave between threads
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, size)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _SegmentLevel:
    """Where one pyramid level's strips or tiles are and how to decode them."""

    page_index: int
    width: int
    height: int
    seg_width: int
    seg_height: int
    planes: int  # 1 for contiguous samples, samples-per-pixel for planar-separate
    offsets: np.ndarray
    bytecounts: np.ndarray
    decode: Callable[..., Any]
    jpegtables: bytes | None
    jpegheader: bytes | None
    fmt: _PixelFormat

    @property
    def across(self) -> int:
        return -(-self.width // self.seg_width)

    @property
    def down(self) -> int:
        return -(-self.height // self.seg_height)

    @property
    def data_end(self) -> int:
        """Byte just past the level's last segment (0 if all segments are empty)."""
        present = self.bytecounts > 0
        return int((self.offsets[present] + self.bytecounts[present]).max()) if present.any() else 0


def _segment_level(page: tifffile.TiffPage, index: int, fmt: _PixelFormat) -> _SegmentLevel:
    """Collect a page's segment table; raise :class:`_Unsupported` if it is not plain 2-D."""
    if page.is_tiled:
        seg_width, seg_height = int(page.tilewidth), int(page.tilelength)
    else:
        seg_width, seg_height = int(page.imagewidth), min(int(page.rowsperstrip), int(page.imagelength))
    planes = int(page.samplesperpixel) if page.planarconfig == 2 else 1
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
    level = _SegmentLevel(
        page_index=index,
        width=int(page.imagewidth),
        height=int(page.imagelength),
        seg_width=seg_width,
        seg_height=max(1, seg_height),
        planes=planes,
        offsets=offsets,
        bytecounts=bytecounts,
        decode=page.decode,
        jpegtables=page.jpegtables,
        jpegheader=page.jpegheader,
        fmt=fmt,
    )
    expected = planes * level.across * level.down
    if len(offsets) != expected or len(bytecounts) != expected:
        raise _Unsupported(f"{len(offsets)} segments where {expected} were expected")
    return level


#: Decoded tiles kept per open slide: neighbouring cells' relocation windows and crops share tiles.
TILE_CACHE_BYTES = 64 * 2**20


class _SegmentReader:
    """Reads rectangles by decoding only the strips or tiles they touch (recent ones are cached)."""

    def __init__(self, path: Path, levels: list[_SegmentLevel]) -> None:
        self.path = path
        self.levels = levels
        self._file = _FileHandle(path)
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()

    def close(self) -> None:
        self._file.close()

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        lv = self.levels[level]
        native = np.zeros((height, width, lv.fmt.samples), dtype=lv.fmt.dtype)
        missing: list[tuple[slice, slice]] = []
        for row in range(y // lv.seg_height, (y + height - 1) // lv.seg_height + 1):
            for col in range(x // lv.seg_width, (x + width - 1) // lv.seg_width + 1):
                self._paste_segment(level, row, col, (x, y, width, height), native, missing)
        rgb = lv.fmt.to_rgb(native)
        if missing and rgb is native:
            rgb = rgb.copy()
        for rows, cols in missing:
            rgb[rows, cols] = 255  # absent tiles are transparent in OpenSlide, i.e. white here
        return rgb

    def _paste_segment(
        self,
        level: int,
        row: int,
        col: int,
        region: tuple[int, int, int, int],
        native: np.ndarray,
        missing: list[tuple[slice, slice]],
    ) -> None:
        lv = self.levels[level]
        x, y, width, height = region
        top, left = row * lv.seg_height, col * lv.seg_width
        y0, y1 = max(y, top), min(y + height, top + lv.seg_height, lv.height)
        x0, x1 = max(x, left), min(x + width, left + lv.seg_width, lv.width)
        dst = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
        for plane in range(lv.planes):
            index = (plane * lv.down + row) * lv.across + col
            segment = self._decode(level, index, row, col)
            if segment is None:
                missing.append(dst)
                continue
            part = segment[y0 - top : y1 - top, x0 - left : x1 - left]
            if part.shape[:2] != (y1 - y0, x1 - x0):
                raise SlideError(
                    f"{self.path}: tile (column {col}, row {row}) of level {level} decodes to "
                    f"{segment.shape[1]}x{segment.shape[0]} px; the file is corrupt, re-copy or re-export it"
                )
            if lv.planes == 1:
                native[dst] = part
            else:
                native[(*dst, slice(plane, plane + 1))] = part

    def _decode(self, level: int, index: int, row: int, col: int) -> np.ndarray | None:
        key = (level, index)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        segment = self._decode_uncached(level, index, row, col)
        size = 0 if segment is None else segment.nbytes
        with self._cache_lock:
            self._cache[key] = segment
            self._cache_bytes += size
            while self._cache_bytes > TILE_CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= 0 if old is None else old.nbytes
        return segment

    def _decode_uncached(self, level: int, index: int, row: int, col: int) -> np.ndarray | None:
        lv = self.levels[level]
        offset, size = int(lv.offsets[index]), int(lv.bytecounts[index])
        if size <= 0 or offset <= 0:
            return None
        where = f"tile (column {col}, row {row}) of level {level}"
        try:
            data = self._file.pread(offset, size)
        except OSError as exc:
            raise SlideError(f"{self.path}: {where} cannot be read ({_reason(exc)})") from exc
        if len(data) < size:
            raise SlideError(f"{self.path}: {where} is cut off (file truncated); re-copy the file")
        try:
            segment, _, _ = lv.decode(data, index, jpegtables=lv.jpegtables, jpegheader=lv.jpegheader)
        except Exception as exc:  # codecs raise their own types; users get one SlideError
            raise SlideError(
                f"{self.path}: {where} cannot be decoded ({_reason(exc)}); "
                "the file is corrupt, re-copy or re-export it"
            ) from exc
        return segment[0]


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


# --------------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------------


@dataclass
class _Opened:
    """What opening a file found, before the pixel size is decided."""

    backend: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]
    mpp_xy: tuple[float | None, float | None]
    reader: _Reader | None = None
    greyscale: bool = False


def _check_path(path: Path) -> None:
    if not path.exists():
        raise SlideError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise SlideError(f"{path} is a directory, not a slide file; pass the slide file itself")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SlideError(f"{path}: cannot be read ({_reason(exc)})") from exc
    if size == 0:
        raise SlideError(f"{path} is empty (0 bytes); re-copy or re-export the slide")
    if not os.access(path, os.R_OK):
        raise SlideError(f"{path}: permission denied; make the file readable")


def _check_complete(path: Path, levels: list[_SegmentLevel]) -> None:
    size = path.stat().st_size
    end = max(level.data_end for level in levels)
    if end > size:
        raise SlideError(
            f"{path} is truncated (image data runs to byte {end}, the file has {size}); re-copy the file"
        )


def _float_or_none(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _open_any(path: Path) -> _Opened:
    """Open with OpenSlide (directly decoded tiles where possible), else with tifffile."""
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:  # includes OpenSlideUnsupportedFormatError
        return _open_tifffile(path, _reason(exc))
    try:
        opened = _openslide_metadata(path, handle)
        levels = _map_tiff_levels(path, handle)
    except BaseException:
        handle.close()
        raise
    if levels is None:
        opened.reader = _OpenSlideReader(path, handle)
        return opened
    handle.close()  # not needed any more: its properties are copied, tiles are ours to decode
    opened.reader = _SegmentReader(path, levels)
    opened.backend = "tiff-tiles"
    opened.greyscale = levels[0].fmt.colour_samples == 1
    return opened


def _openslide_metadata(path: Path, handle: openslide.OpenSlide) -> _Opened:
    props = dict(handle.properties)
    mpp_xy = (_float_or_none(props.get("openslide.mpp-x")), _float_or_none(props.get("openslide.mpp-y")))
    if mpp_xy == (None, None):
        mpp_xy = _tiff_property_mpp(props)
    return _Opened(
        backend="openslide",
        vendor=props.get("openslide.vendor") or "generic",
        level_dimensions=tuple((int(w), int(h)) for w, h in handle.level_dimensions),
        level_downsamples=tuple(float(d) for d in handle.level_downsamples),
        properties=props,
        mpp_xy=mpp_xy,
    )


def _tiff_property_mpp(props: Mapping[str, str]) -> tuple[float | None, float | None]:
    unit = (props.get("tiff.ResolutionUnit") or "").lower()
    um_per_unit = {"inch": 25400.0, "centimeter": 10000.0, "cm": 10000.0}.get(unit)
    if um_per_unit is None:
        return None, None
    xres = _float_or_none(props.get("tiff.XResolution"))
    yres = _float_or_none(props.get("tiff.YResolution"))
    return (
        um_per_unit / xres if xres and xres > 0 else None,
        um_per_unit / yres if yres and yres > 0 else None,
    )


def _map_tiff_levels(path: Path, handle: openslide.OpenSlide) -> list[_SegmentLevel] | None:
    """Match OpenSlide's levels to tiled TIFF pages by size; None means "let OpenSlide read it"."""
    vendor = handle.properties.get("openslide.vendor")
    if vendor not in _DIRECT_VENDORS:
        return None
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            levels = []
            for width, height in handle.level_dimensions:
                page_index = _find_page(tif, width, height)
                if page_index is None:
                    _log.debug("%s: no TIFF page of %dx%d; reading through OpenSlide", path, width, height)
                    return None
                page = tif.pages[page_index]
                fmt = _page_format(page)
                if page.compression not in _DIRECT_COMPRESSIONS:
                    raise _Unsupported(f"compression {page.compression}")
                levels.append(_segment_level(page, page_index, fmt))
            white = _probed_white(tif.pages[levels[-1].page_index], levels[0].fmt.white)
    except Exception as exc:  # anything odd in the TIFF structure: OpenSlide is the reference reader
        if is_interrupt(exc):  # Ctrl-C inside OpenSlide's ctypes calls arrives as ctypes.ArgumentError
            raise KeyboardInterrupt(str(exc)) from exc
        _log.debug("%s: direct tile reading not possible (%s); using OpenSlide", path, exc)
        return None
    _check_complete(path, levels)
    return [_with_white(level, white) for level in levels]


def _with_white(level: _SegmentLevel, white: float) -> _SegmentLevel:
    return level if level.fmt.white == white else replace(level, fmt=replace(level.fmt, white=white))


def _find_page(tif: tifffile.TiffFile, width: int, height: int) -> int | None:
    for index, page in enumerate(tif.pages):
        if (
            isinstance(page, tifffile.TiffPage)
            and page.is_tiled
            and (int(page.imagewidth), int(page.imagelength)) == (width, height)
            and int(page.tags.valueof(274, 1)) == 1  # Orientation: OpenSlide ignores it, so must we
        ):
            return index
    return None


def _open_tifffile(path: Path, openslide_reason: str) -> _Opened:
    """Open a TIFF OpenSlide rejected; errors name both readers' complaints briefly."""
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            return _tifffile_opened(path, tif)
    except _Unsupported as exc:
        raise SlideError(f"{path}: cannot be read ({exc}); convert it to a tiled RGB TIFF or SVS") from exc
    except SlideError:
        raise  # already says what is wrong (e.g. truncated) and names the file
    except tifffile.TiffFileError as exc:
        if "not a TIFF" in str(exc):
            raise SlideError(
                f"{path} is not a slide OpenSlide or tifffile can read ({openslide_reason}); "
                "check the file format"
            ) from exc
        raise SlideError(
            f"{path}: cannot be opened ({_reason(exc)}); the file may be truncated or corrupt, re-copy it"
        ) from exc
    except Exception as exc:  # parsing an unknown file can fail in many ways; all are a bad file
        raise SlideError(
            f"{path}: cannot be opened ({_reason(exc)}); the file may be truncated or corrupt, re-copy it"
        ) from exc


def _tifffile_opened(path: Path, tif: tifffile.TiffFile) -> _Opened:
    if not tif.series:
        raise _Unsupported("no image in the TIFF")
    pages = [lvl.keyframe for lvl in tif.series[0].levels]
    first = pages[0]
    if first.compression != 1 and first.compression not in tifffile.TIFF.DECOMPRESSORS:
        raise _Unsupported(f"unsupported TIFF compression {int(first.compression)}")
    nominal = _page_format(first).white
    white = _probed_white(pages[-1], nominal)
    levels = [_segment_level(page, i, _page_format(page, white)) for i, page in enumerate(pages)]
    _check_complete(path, levels)
    dims = tuple((lv.width, lv.height) for lv in levels)
    w0, h0 = dims[0]
    downsamples = tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)
    return _Opened(
        reader=_SegmentReader(path, levels),
        backend="tifffile",
        vendor="tiff",
        level_dimensions=dims,
        level_downsamples=downsamples,
        properties=_tiff_properties(first),
        mpp_xy=_tiff_tag_mpp(first),
        greyscale=levels[0].fmt.colour_samples == 1,
    )


def _tiff_properties(page: tifffile.TiffPage) -> dict[str, str]:
    props = {
        "tiff.ImageWidth": str(page.imagewidth),
        "tiff.ImageLength": str(page.imagelength),
        "tiff.Compression": str(int(page.compression)),
        "tiff.Photometric": page.photometric.name,
        "tiff.SamplesPerPixel": str(page.samplesperpixel),
        "tiff.BitsPerSample": str(page.bitspersample),
    }
    for code, name in ((270, "ImageDescription"), (305, "Software"), (306, "DateTime")):
        value = page.tags.valueof(code)
        if isinstance(value, str) and value:
            props[f"tiff.{name}"] = value
    for code, name in ((282, "XResolution"), (283, "YResolution")):
        value = _rational(page.tags.valueof(code))
        if value is not None:
            props[f"tiff.{name}"] = repr(value)
    unit = page.tags.valueof(296)
    if unit is not None:
        props["tiff.ResolutionUnit"] = {1: "none", 2: "inch", 3: "centimeter"}.get(int(unit), str(unit))
    return props


def _rational(value: Any) -> float | None:
    if isinstance(value, tuple) and len(value) == 2:
        num, den = value
        return float(num) / float(den) if den else None
    return float(value) if isinstance(value, int | float) else None


def _tiff_tag_mpp(page: tifffile.TiffPage) -> tuple[float | None, float | None]:
    return _tiff_property_mpp(_tiff_properties(page))


# --------------------------------------------------------------------------------------------------
# Pixel size
# --------------------------------------------------------------------------------------------------


def _check_mpp_value(path: Path | None, value: float, origin: str) -> float:
    low, high = MPP_RANGE_UM
    if not math.isfinite(value) or not low <= value <= high:
        where = "" if path is None else f"{path}: "
        raise MppError(
            f"{where}{origin} {value:g} um/px is outside the plausible {low:g}-{high:g} um/px; {_MPP_HINT}"
        )
    return value


def check_mpp_option(value: float) -> float:
    """Refuse an implausible ``--mpp`` before any slide is looked at (or skipped).

    Parameters
    ----------
    value
        The pixel size given on the command line, um/px.

    Returns
    -------
    float
        ``value``, if within :data:`MPP_RANGE_UM`.

    Raises
    ------
    MppError
        Outside the range, or not a finite number.
    """
    return _check_mpp_value(None, value, "--mpp")


def _resolve_mpp(path: Path, mpp_xy: tuple[float | None, float | None], override: float | None) -> float:
    """The level-0 pixel size: the override if given, else the (mean) metadata value."""
    if override is not None:
        try:
            value = float(override)
        except (TypeError, ValueError) as exc:
            raise MppError(f"{path}: --mpp {override!r} is not a number; {_MPP_HINT}") from exc
        return _check_mpp_value(path, value, "--mpp")
    values = [v for v in mpp_xy if v is not None]
    if not values:
        raise MppError(f"{path} has no pixel size (MPP) in its metadata; {_MPP_HINT}")
    for value in values:
        _check_mpp_value(path, value, "pixel size")
    mpp = sum(values) / len(values)
    if len(values) == 2 and abs(values[0] - values[1]) > _MPP_XY_WARN_FRACTION * mpp:
        warnings.warn(
            f"{path}: pixel width {values[0]:g} and height {values[1]:g} um differ by more than "
            f"{_MPP_XY_WARN_FRACTION:.0%}; using their mean {mpp:g} um/px",
            UserWarning,
            stacklevel=3,
        )
    return mpp


# --------------------------------------------------------------------------------------------------
# Resampling for read_at_mpp
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AxisPlan:
    """Which level pixels make each output pixel along one axis.

    "copy": output pixel ``j`` is level pixel ``first[j]``. "block": the mean of level pixels
    ``first[j] .. first[j] + box - 1``. "remap": the level is box-filtered with a ``box``-pixel
    kernel, then sampled bilinearly ``frac[j] / 32`` of the way from pixel ``first[j]`` to the next.
    """

    kind: str  # "copy", "block" or "remap"
    box: int
    first: np.ndarray  # (n_out,) int64, non-decreasing
    frac: np.ndarray | None = None  # remap: (n_out,) int64 in [0, 32)

    @property
    def margin(self) -> tuple[int, int]:
        """Extra level pixels the remap path's box filter needs before and after the samples."""
        if self.kind != "remap":
            return 0, 0
        return self.box // 2, self.box - 1 - self.box // 2

    def source_span(self, start: int, stop: int) -> tuple[int, int]:
        """Half-open range of level pixels used by output pixels ``start:stop``."""
        before, after = self.margin
        taps = {"copy": 1, "block": self.box, "remap": 2}[self.kind]
        return int(self.first[start]) - before, int(self.first[stop - 1]) + taps + after


def _near_int(value: float, tolerance: float) -> bool:
    return abs(value - round(value)) <= tolerance


def _plan_kind(u0: float, v0: float, scale: float) -> str:
    """Copying and a plain integer shrink need the window on the level's pixel grid."""
    aligned = _near_int(u0, 1e-6) and _near_int(v0, 1e-6)
    if aligned and abs(scale - 1.0) <= 1e-9:
        return "copy"
    if aligned and scale > 1.5 and _near_int(scale, 1e-9):
        return "block"
    return "remap"


def _axis_plan(kind: str, start: float, scale: float, n_out: int) -> _AxisPlan:
    """Plan one axis of a window starting at level coordinate ``start``, ``scale`` level px per output px."""
    if kind in ("copy", "block"):
        factor = round(scale)
        return _AxisPlan(kind, factor, round(start) + factor * np.arange(n_out, dtype=np.int64))
    # A box of about `scale` pixels, then bilinear sampling at each output pixel's centre, is within
    # ~1 grey level of INTER_AREA on tissue and needs no per-window weights.
    box = max(1, int(scale + 0.5))
    centre = start + scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5  # pixel-index coordinates
    if box % 2 == 0:
        centre += 0.5  # an even box filter's output pixel p is centred on p - 0.5
    centre_q = np.round(centre * _POSITION_STEPS_PER_PX).astype(np.int64)
    first = centre_q // _POSITION_STEPS_PER_PX
    return _AxisPlan(kind, box, first, centre_q - first * _POSITION_STEPS_PER_PX)


def _remap_tile(
    image: np.ndarray, plan_x: _AxisPlan, plan_y: _AxisPlan, cols: slice, rows: slice
) -> np.ndarray:
    """Bilinear samples for output ``rows`` x ``cols``; ``image`` starts at the first sampled pixel."""
    assert plan_x.frac is not None and plan_y.frac is not None
    x_first, y_first = plan_x.first[cols], plan_y.first[rows]
    map_xy = np.empty((len(y_first), len(x_first), 2), dtype=np.int16)
    map_xy[..., 0] = (x_first - x_first[0])[None, :]
    map_xy[..., 1] = (y_first - y_first[0])[:, None]
    # OpenCV's fixed-point map: interpolation table index (y_frac << 5) + x_frac, in 1/32 px.
    map_frac = (plan_y.frac[rows, None] * _POSITION_STEPS_PER_PX + plan_x.frac[None, cols]).astype(np.uint16)
    return cv2.remap(image, map_xy, map_frac, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _resample(source: np.ndarray, plan_x: _AxisPlan, plan_y: _AxisPlan, rows: slice) -> np.ndarray:
    """Output rows ``rows`` from ``source``, the level pixels ``plan_x.source_span(0, width)`` x
    ``plan_y.source_span(rows.start, rows.stop)``."""
    height, width = rows.stop - rows.start, len(plan_x.first)
    if plan_x.kind == "copy":
        return source
    if plan_x.kind == "block":
        return cv2.resize(source, (width, height), interpolation=cv2.INTER_AREA)
    box = plan_x.box
    # Every sampled pixel's box lies inside `source` (see margin), so border handling never matters.
    smooth = cv2.blur(source, (box, box), borderType=cv2.BORDER_REPLICATE) if box > 1 else source
    before = plan_x.margin[0]
    y_base, x_base = int(plan_y.first[rows.start]) - before, int(plan_x.first[0]) - before
    out = np.empty((height, width, 3), dtype=np.uint8)
    tile = _REMAP_TILE_PX  # keeps int16 map coordinates small and the maps a few MB
    for r0 in range(rows.start, rows.stop, tile):
        tile_rows = slice(r0, min(rows.stop, r0 + tile))
        y0 = int(plan_y.first[tile_rows.start]) - y_base
        y1 = int(plan_y.first[tile_rows.stop - 1]) + 2 - y_base
        for c0 in range(0, width, tile):
            tile_cols = slice(c0, min(width, c0 + tile))
            x0 = int(plan_x.first[tile_cols.start]) - x_base
            x1 = int(plan_x.first[tile_cols.stop - 1]) + 2 - x_base
            out[r0 - rows.start : tile_rows.stop - rows.start, tile_cols] = _remap_tile(
                smooth[y0:y1, x0:x1], plan_x, plan_y, tile_cols, tile_rows
            )
    return out


# --------------------------------------------------------------------------------------------------
# Slide
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Per-process handle cache
# --------------------------------------------------------------------------------------------------

_cache: OrderedDict[SlideRef, Slide] = OrderedDict()
_cache_lock = threading.Lock()
_cache_pid = os.getpid()


def cached_slide(ref: SlideRef) -> Slide:
    """The open :class:`Slide` for ``ref`` in this process, opening it on first use.

    Keeps at most a few handles (least recently used dropped first). A handle that was closed or
    raised during a read is dropped and the file reopened, because OpenSlide handles stay broken after
    an error. Dropped handles are not closed here, since another thread may still be reading: they
    close when garbage-collected. Do not use the result as a context manager (that closes it for
    every other user in the process).

    Parameters
    ----------
    ref : SlideRef

    Returns
    -------
    Slide
    """
    global _cache_pid
    with _cache_lock:
        if os.getpid() != _cache_pid:  # forked child: the parent's handles are not ours
            _cache.clear()
            _cache_pid = os.getpid()
        slide = _cache.get(ref)
        if slide is not None and slide.usable:
            _cache.move_to_end(ref)
            return slide
        _cache.pop(ref, None)
        slide = open_slide(ref.path, ref.mpp_override)
        _cache[ref] = slide
        while len(_cache) > _CACHE_MAX_HANDLES:
            _cache.popitem(last=False)
        return slide
