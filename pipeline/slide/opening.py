"""Opening a file: which reader serves it, its levels, properties and the pixel size in its metadata."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import openslide
import tifffile

from ..errors import SlideError, is_interrupt
from ._common import _quiet_tifffile, _Reader, _reason, _Unsupported
from .openslide_reader import _OpenSlideReader
from .pixels import _page_format, _probed_white
from .tiff_tiles import _segment_level, _SegmentLevel, _SegmentReader, _segments_end

_DIRECT_VENDORS = frozenset({"aperio", "generic-tiff"})
# Codecs whose output the tests compare with OpenSlide's (none, LZW, JPEG, deflate); others, e.g.
# Aperio's JPEG 2000, go through OpenSlide.
_DIRECT_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946})
_log = logging.getLogger(__name__)


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
    error = _truncation(path, max(level.data_end for level in levels))
    if error is not None:
        raise error


def _truncation(path: Path, data_end: int) -> SlideError | None:
    """The error for a file shorter than the image data its pages point to (``data_end``), else None."""
    size = path.stat().st_size
    if data_end <= size:
        return None
    return SlideError(
        f"{path} is truncated (image data runs to byte {data_end}, the file has {size}); re-copy the file"
    )


def _data_end(path: Path) -> int:
    """The largest end of any image data segment the readable pages of a TIFF point to (0 if none).

    For files no reader accepts, whose levels :func:`_check_complete` never sees.
    """
    end = 0
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                end = max(end, _segments_end(page.dataoffsets, page.databytecounts))
    except Exception:  # only a hint for the message: the caller reports the real error
        pass
    return end


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
        # A file cut short looks unsupported too (tag arrays and pages beyond its end): say so.
        truncated = _truncation(path, _data_end(path))
        if truncated is not None:
            raise truncated from exc
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
