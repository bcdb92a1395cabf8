"""The direct TIFF reader: decodes only the tiles or strips a rectangle touches, with one file
descriptor (``os.pread``) and the page's own tifffile decoder; recent tiles are cached."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ..errors import SlideError
from ._common import _reason, _Unsupported
from .pixels import _PixelFormat


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
        return _segments_end(self.offsets, self.bytecounts)


def _segments_end(offsets: Any, bytecounts: Any) -> int:
    """Byte just past the last non-empty segment of a segment table (0 if there is none)."""
    n = min(len(offsets), len(bytecounts))  # a damaged page may list more of one than the other
    starts = np.asarray(offsets, dtype=np.int64)[:n]
    sizes = np.asarray(bytecounts, dtype=np.int64)[:n]
    present = sizes > 0
    return int((starts[present] + sizes[present]).max()) if present.any() else 0


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
