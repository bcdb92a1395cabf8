"""The on-disk cell gallery: one sharded zarr v3 group per slide (a public, versioned format).

Format ``bloodsmear-gallery`` version 1
---------------------------------------
::

    OUT/<slide stem>.zarr             zarr v3 group, consolidated metadata
      images        uint8 (N, H, W, 3), dimension_names ("cell", "y", "x", "c"), H = W = crop_px
                    (default 288 px = 25 um at 11.52 px/um); RGB, cell centred; one chunk per
                    cell, shards of shard_cells cells (default 128; shard i is the file
                    images/c/<i>/0/0/0); zstd level 1 (or no compression)
      cells/        1-D arrays of length N; row i describes images[i]
        x_px, y_px  float, centre of the crop in level-0 slide pixels
        area_um2    float, area of the detected object
        quality     float, quality score of the object (higher is better)
        padded      bool, the crop reached past the slide edge and was padded
        ...         writers may add columns (e.g. cell_class, candidate_index); readers ignore unknown ones
      candidates/   1-D arrays of length M; every object that passed the size filter
        x_px, y_px  float, centroid in level-0 slide pixels
        area_um2    float
        accepted    bool, the object is in cells/ and images
        reason      str, why it was rejected; "" when accepted
        ...         optional further columns, as for cells/
      attrs         format ("bloodsmear-gallery"), format_version (1), complete, n_cells, n_candidates,
                    crop_px, shard_cells, compression, created_utc, finalized_utc, zarr_version, and what
                    the run adds: pipeline version, every parameter, slide path, vendor, mpp, level used,
                    counts, timings

Each table group stores its column order in its ``columns`` attribute. String columns are zarr v3
variable-length UTF-8 strings. Attributes are plain JSON: numpy scalars become Python numbers and
non-finite floats (NaN, inf) become ``null``.

A gallery is complete only when its root attributes say ``"complete": true``. Writers build the group
under a hidden sibling ``OUT/.<slide stem>.zarr.partial``, write ``complete: true`` after everything else
is on disk, and only then move the directory to its final name, so a gallery under its final name is
always whole. Readers must refuse a gallery whose ``complete`` is not ``true`` or whose
``format_version`` they do not know.

Writing workflow
----------------
1. The driver calls :func:`create_gallery`; it creates every array and writes the tables. A driver
   that learns which cells to keep only while crops are cut calls :func:`create_gallery_draft`
   instead, with room for the most cells there can be, and hands the tables to step 3.
2. Tasks (any process) call :func:`write_shard` with the partial path and a shard index; each call
   writes exactly one whole shard. Concurrent writes to different chunks of one shard lose data
   silently in zarr-python, so never split a shard between tasks.
3. The driver calls :func:`finalize_gallery`, which writes the tables if they are not written yet,
   checks every shard is on disk, marks the gallery complete and moves it to its final name
   (atomically swapping out an older gallery on overwrite).

Reading
-------
>>> gallery = open_gallery("OUT/slide1.zarr")  # doctest: +SKIP
>>> image, row = gallery[0]  # doctest: +SKIP
>>> image.shape, row["area_um2"]  # a uint8 crop and its cells/ row as a dict  # doctest: +SKIP
>>> gallery.cells.head()  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as dt
import errno
import math
import os
import re
import shutil
import sys
import warnings
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any, Literal

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import ZstdCodec

from pipeline import _zarr_shard
from pipeline.errors import GalleryError, ParameterError

__all__ = [
    "DEFAULT_CROP_PX",
    "DEFAULT_SHARD_CELLS",
    "GALLERY_FORMAT",
    "GALLERY_FORMAT_VERSION",
    "IMAGE_DIMENSION_NAMES",
    "REQUIRED_CANDIDATE_COLUMNS",
    "REQUIRED_CELL_COLUMNS",
    "RESERVED_ATTRS",
    "Gallery",
    "GalleryDraft",
    "ShardReceipt",
    "create_gallery",
    "create_gallery_draft",
    "finalize_gallery",
    "images_checksum",
    "is_complete",
    "open_gallery",
    "partial_path_for",
    "remove_partial",
    "shard_ranges",
    "to_json_safe",
    "write_shard",
]

GALLERY_FORMAT = "bloodsmear-gallery"
GALLERY_FORMAT_VERSION = 1

DEFAULT_CROP_PX = 288
DEFAULT_SHARD_CELLS = 128
SHARD_CELLS_MIN, SHARD_CELLS_MAX = 64, 256
CROP_PX_MIN, CROP_PX_MAX = 8, 4096

IMAGE_DIMENSION_NAMES = ("cell", "y", "x", "c")
REQUIRED_CELL_COLUMNS = ("x_px", "y_px", "area_um2", "quality", "padded")
REQUIRED_CANDIDATE_COLUMNS = ("x_px", "y_px", "area_um2", "accepted", "reason")

Compression = Literal["zstd", "none"]

# Keys the module owns; callers may not set them through attrs or attrs_update.
RESERVED_ATTRS = frozenset(
    {
        "format",
        "format_version",
        "complete",
        "n_cells",
        "n_candidates",
        "crop_px",
        "shard_cells",
        "compression",
        "created_utc",
        "finalized_utc",
        "zarr_version",
    }
)

_PARTIAL_SUFFIX = ".partial"
_REPLACED_SUFFIX = ".replaced"
_COLUMN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Table columns are small; one chunk holds up to this many rows.
_TABLE_CHUNK_ROWS = 1 << 18
_IMAGES = "images"
_TABLES = ("cells", "candidates")


# --------------------------------------------------------------------------------------------------
# Small public helpers
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GalleryDraft:
    """A gallery being written: the handle the driver passes from creation to finalization.

    Attributes
    ----------
    final_path : Path
        Where the finished gallery will appear.
    partial_path : Path
        The hidden sibling directory that holds the gallery while it is written.
    n_cells : int
        Number of crops (rows of ``images`` and ``cells/``). For a draft from
        :func:`create_gallery_draft`, the room for crops until :func:`finalize_gallery` learns the
        number from the tables.
    crop_px : int
        Height and width of every crop in pixels.
    shard_cells : int
        Cells per shard; shard ``i`` holds rows ``shard_ranges(n_cells, shard_cells)[i]``.
    overwrite : bool
        Whether finalization may replace an existing gallery at ``final_path``.
    has_tables : bool
        Whether ``cells/`` and ``candidates/`` are written; if not, :func:`finalize_gallery` writes them.
    """

    final_path: Path
    partial_path: Path
    n_cells: int
    crop_px: int
    shard_cells: int
    overwrite: bool
    has_tables: bool = True

    @property
    def n_shards(self) -> int:
        """Number of shards, i.e. of :func:`write_shard` calls needed."""
        return len(self.shard_ranges())

    def shard_ranges(self) -> list[tuple[int, int]]:
        """Half-open row ranges ``(start, stop)`` of every shard, in shard order."""
        return shard_ranges(self.n_cells, self.shard_cells)


@dataclasses.dataclass(frozen=True)
class ShardReceipt:
    """What a :func:`write_shard` call wrote; the driver may hand these to :func:`finalize_gallery`.

    Attributes
    ----------
    shard_index : int
        Index of the shard.
    start, stop : int
        Half-open range of rows written.
    crc32 : int or None
        :func:`images_checksum` of the images written; None when :func:`write_shard` was asked not to
        compute it (``checksum=False``), and then ``finalize_gallery(..., verify_data=True)`` refuses it.
    """

    shard_index: int
    start: int
    stop: int
    crc32: int | None = None


def shard_ranges(n_cells: int, shard_cells: int) -> list[tuple[int, int]]:
    """Split ``n_cells`` rows into consecutive shards of ``shard_cells`` rows (the last may be short).

    Parameters
    ----------
    n_cells : int
        Number of rows, >= 0.
    shard_cells : int
        Rows per shard, >= 1.

    Returns
    -------
    list of tuple of int
        ``[(0, S), (S, 2S), ..., (kS, n_cells)]``; empty when ``n_cells`` is 0.

    Examples
    --------
    >>> shard_ranges(300, 128)
    [(0, 128), (128, 256), (256, 300)]
    """
    if n_cells < 0 or shard_cells < 1:
        raise ValueError(f"need n_cells >= 0 and shard_cells >= 1, got {n_cells} and {shard_cells}")
    return [(start, min(n_cells, start + shard_cells)) for start in range(0, n_cells, shard_cells)]


def partial_path_for(final_path: str | os.PathLike[str]) -> Path:
    """Hidden sibling directory in which the gallery for ``final_path`` is written.

    Examples
    --------
    >>> partial_path_for("OUT/slide1.zarr").as_posix()
    'OUT/.slide1.zarr.partial'
    """
    final = Path(final_path)
    return final.with_name(f".{final.name}{_PARTIAL_SUFFIX}")


def _replaced_path_for(final_path: Path) -> Path:
    return final_path.with_name(f".{final_path.name}{_REPLACED_SUFFIX}")


def images_checksum(images: np.ndarray) -> int:
    """CRC-32 of the raw bytes of ``images`` in C order (cheap; used to verify shards)."""
    return zlib.crc32(np.ascontiguousarray(images).view(np.uint8).reshape(-1))


def to_json_safe(value: Any, where: str = "attrs") -> Any:
    """Convert ``value`` into plain JSON types (dict with str keys, list, str, int, float, bool, None).

    Numpy scalars and arrays become Python numbers and lists, paths and dates become strings,
    dataclass instances become dicts, and non-finite floats become ``None`` (JSON has no NaN).

    Parameters
    ----------
    value : Any
        The value to convert.
    where : str
        Name of the value, used in error messages.

    Returns
    -------
    Any
        A value that ``json.dumps(..., allow_nan=False)`` accepts.

    Raises
    ------
    TypeError
        If a value has no JSON form (bytes, complex, arbitrary objects) or a mapping key is not a string.
    """
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        # str() gives the shortest repr, so float32(0.1) is stored as 0.1, not 0.10000000149011612.
        value = float(str(value))
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json_safe(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        return {_json_key(key, where): to_json_safe(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [to_json_safe(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"{where} is a {type(value).__name__}, which cannot be stored as JSON")


def _json_key(key: object, where: str) -> str:
    if isinstance(key, np.str_ | str):
        return str(key)
    raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; JSON keys must be strings")


# --------------------------------------------------------------------------------------------------
# Driver: create
# --------------------------------------------------------------------------------------------------


def create_gallery(
    final_path: str | os.PathLike[str],
    n_cells: int,
    cells: Mapping[str, np.ndarray],
    candidates: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    *,
    crop_px: int = DEFAULT_CROP_PX,
    shard_cells: int = DEFAULT_SHARD_CELLS,
    compression: Compression = "zstd",
    overwrite: bool = False,
) -> GalleryDraft:
    """Create a gallery draft: the group, the empty ``images`` array, and both tables.

    Only the driver calls this. Leftovers of an earlier crashed run at the same path (the hidden
    ``.partial`` directory) are removed first; two runs must not write the same gallery at once.

    Parameters
    ----------
    final_path : str or PathLike
        Where the finished gallery will appear, e.g. ``OUT/<slide stem>.zarr``.
    n_cells : int
        Number of crops N.
    cells : Mapping of str to ndarray
        Columns of ``cells/``, each 1-D of length N; must hold :data:`REQUIRED_CELL_COLUMNS`.
    candidates : Mapping of str to ndarray
        Columns of ``candidates/``, each 1-D of one common length M; must hold
        :data:`REQUIRED_CANDIDATE_COLUMNS`.
    attrs : Mapping of str to Any
        Run metadata (pipeline version, parameters, slide path, vendor, mpp, level, ...); converted
        with :func:`to_json_safe`. Keys in ``RESERVED_ATTRS`` are not allowed.
    crop_px : int
        Crop height and width in pixels.
    shard_cells : int
        Cells per shard, 64-256.
    compression : {"zstd", "none"}
        Codec for ``images``: zstd level 1 (1.3-1.8x smaller, ~20-30 % slower writes) or none.
    overwrite : bool
        Allow :func:`finalize_gallery` to replace an existing gallery at ``final_path``.

    Returns
    -------
    GalleryDraft
        Picklable handle; tasks need only ``draft.partial_path`` and a shard index.

    Raises
    ------
    ParameterError
        If ``crop_px``, ``shard_cells``, ``n_cells`` or ``compression`` is out of range.
    GalleryError
        If ``final_path`` exists and ``overwrite`` is false, or exists and is not a gallery, or the
        directory cannot be written.
    ValueError, TypeError
        If a table column is missing, misnamed, of the wrong length, or of an unsupported dtype.
    """
    _check_parameters(n_cells, crop_px, shard_cells, compression)
    cell_columns = _prepare_table(cells, int(n_cells), REQUIRED_CELL_COLUMNS, "cells")
    candidate_columns = _prepare_table(candidates, None, REQUIRED_CANDIDATE_COLUMNS, "candidates")
    draft = create_gallery_draft(
        final_path,
        n_cells,
        attrs,
        crop_px=crop_px,
        shard_cells=shard_cells,
        compression=compression,
        overwrite=overwrite,
    )
    _write_tables(draft, cell_columns, candidate_columns)
    return dataclasses.replace(draft, has_tables=True)


def create_gallery_draft(
    final_path: str | os.PathLike[str],
    max_cells: int,
    attrs: Mapping[str, Any],
    *,
    crop_px: int = DEFAULT_CROP_PX,
    shard_cells: int = DEFAULT_SHARD_CELLS,
    compression: Compression = "zstd",
    overwrite: bool = False,
) -> GalleryDraft:
    """Create a gallery draft before its tables are known: the group and an ``images`` array with
    room for ``max_cells`` crops.

    For writers that decide which cells to keep while they cut crops: shards are written as rows
    become known (:func:`write_shard` with ``n_cells`` for the last one), and :func:`finalize_gallery`
    writes the tables and cuts ``images`` to the rows of ``cells/``. Only the driver calls this.

    Parameters
    ----------
    final_path : str or PathLike
        Where the finished gallery will appear, e.g. ``OUT/<slide stem>.zarr``.
    max_cells : int
        At least as many crops as the gallery will hold.
    attrs : Mapping of str to Any
        Run metadata, as for :func:`create_gallery`.
    crop_px, shard_cells, compression, overwrite
        As for :func:`create_gallery`.

    Returns
    -------
    GalleryDraft
        With ``has_tables`` false.

    Raises
    ------
    ParameterError, GalleryError
        As for :func:`create_gallery`.
    """
    _check_parameters(max_cells, crop_px, shard_cells, compression)
    max_cells, crop_px, shard_cells = int(max_cells), int(crop_px), int(shard_cells)
    final = Path(final_path)
    _check_final_path_replaceable(final, overwrite)
    root_attrs = _user_attrs(attrs, "attrs") | {
        "format": GALLERY_FORMAT,
        "format_version": GALLERY_FORMAT_VERSION,
        "complete": False,
        "crop_px": crop_px,
        "shard_cells": shard_cells,
        "compression": compression,
        "created_utc": _utc_now(),
        "zarr_version": zarr.__version__,
    }
    partial = partial_path_for(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_tree(partial)
        group = zarr.open_group(partial, mode="w-", zarr_format=3, attributes=root_attrs)
        _create_images(group, max_cells, crop_px, shard_cells, compression)
    except OSError as exc:
        raise GalleryError(f"cannot write gallery {partial}: {exc}; check the output directory") from exc
    return GalleryDraft(final, partial, max_cells, crop_px, shard_cells, overwrite, has_tables=False)


def _write_tables(
    draft: GalleryDraft, cells: Mapping[str, np.ndarray], candidates: Mapping[str, np.ndarray]
) -> None:
    """Write both (prepared) tables into a draft, record their sizes, and cut ``images`` to the cells."""
    n_cells = len(next(iter(cells.values())))
    n_candidates = len(next(iter(candidates.values())))
    try:
        group = zarr.open_group(draft.partial_path, mode="r+", zarr_format=3)
        images = group[_IMAGES]
        if images.shape[0] != n_cells:
            images.resize((n_cells, *images.shape[1:]))
        _write_table(group, "cells", cells)
        _write_table(group, "candidates", candidates)
        group.attrs.update({"n_cells": n_cells, "n_candidates": n_candidates})
    except OSError as exc:
        where = draft.partial_path
        raise GalleryError(f"cannot write gallery {where}: {exc}; check the output directory") from exc


def _check_parameters(n_cells: int, crop_px: int, shard_cells: int, compression: str) -> None:
    _check_int("n_cells", n_cells, 0, None, "cells")
    _check_int("crop_px", crop_px, CROP_PX_MIN, CROP_PX_MAX, "px")
    _check_int("shard_cells", shard_cells, SHARD_CELLS_MIN, SHARD_CELLS_MAX, "cells")
    if compression not in ("zstd", "none"):
        raise ParameterError(f"compression must be 'zstd' or 'none', got {compression!r}")


def _check_int(name: str, value: object, low: int, high: int | None, unit: str) -> None:
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if is_int and low <= value and (high is None or value <= high):
        return
    bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ParameterError(f"{name} must be an integer in {bounds} {unit}, got {value!r}")


def _check_final_path_replaceable(final: Path, overwrite: bool) -> None:
    if not os.path.lexists(final):
        return
    if not overwrite:
        raise GalleryError(f"{final} already exists; pass --overwrite to replace it or choose another output")
    # Never delete a directory we did not write: overwrite only replaces galleries.
    if _gallery_format_of(final) != GALLERY_FORMAT:
        raise GalleryError(f"{final} exists and is not a gallery; refusing to replace it, remove it yourself")


def _gallery_format_of(path: Path) -> object:
    try:
        return _read_root_attrs(path).get("format")
    except GalleryError:
        return None


def _user_attrs(attrs: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    safe = to_json_safe(dict(attrs or {}), where)
    clash = sorted(RESERVED_ATTRS & safe.keys())
    if clash:
        raise ValueError(f"{where} may not set reserved gallery attributes {clash}")
    return safe


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _image_codecs(compression: str) -> list[ZstdCodec] | None:
    # Measured on real smear crops: zstd 1 gives 1.3-1.8x; higher levels add ~5 % for half the speed.
    return [ZstdCodec(level=1)] if compression == "zstd" else None


def _create_images(group: zarr.Group, n_cells: int, crop_px: int, shard_cells: int, compression: str) -> None:
    crop_shape = (crop_px, crop_px, 3)
    group.create_array(
        _IMAGES,
        shape=(n_cells, *crop_shape),
        dtype="uint8",
        chunks=(1, *crop_shape),
        shards=(shard_cells, *crop_shape),
        dimension_names=IMAGE_DIMENSION_NAMES,
        compressors=_image_codecs(compression),
        fill_value=0,
    )


def _prepare_table(
    columns: Mapping[str, np.ndarray], n_rows: int | None, required: Iterable[str], table: str
) -> dict[str, np.ndarray]:
    """Validate a table and return its columns as arrays zarr stores without warnings."""
    missing = [name for name in required if name not in columns]
    if missing:
        raise ValueError(f"{table} table lacks required columns {missing}")
    prepared = {
        name: _prepare_column(np.asarray(values), f"{table}/{name}") for name, values in columns.items()
    }
    lengths = {name: len(values) for name, values in prepared.items()}
    expected = n_rows if n_rows is not None else next(iter(lengths.values()))
    wrong = {name: length for name, length in lengths.items() if length != expected}
    if wrong:
        raise ValueError(f"{table} columns must all have {expected} rows; got {wrong}")
    return prepared


def _prepare_column(values: np.ndarray, where: str) -> np.ndarray:
    name = where.split("/", 1)[1]
    if not _COLUMN_NAME.match(name):
        raise ValueError(f"column name {where!r} must be a Python identifier (letters, digits, _)")
    if values.ndim != 1:
        raise ValueError(f"column {where} must be 1-D, got shape {values.shape}")
    if values.dtype.kind in "biuf":
        return values
    if values.dtype.kind in "UT" or (values.dtype.kind == "O" and all(isinstance(v, str) for v in values)):
        return values.astype(np.dtypes.StringDType())
    raise TypeError(f"column {where} has dtype {values.dtype}; use bool, integer, float or str")


def _write_table(group: zarr.Group, table: str, columns: Mapping[str, np.ndarray]) -> None:
    sub = group.create_group(table, attributes={"columns": list(columns)})
    for name, values in columns.items():
        is_string = values.dtype.kind == "T"
        array = sub.create_array(
            name,
            shape=values.shape,
            dtype=str if is_string else values.dtype,
            chunks=(min(max(len(values), 1), _TABLE_CHUNK_ROWS),),
            compressors=[ZstdCodec(level=1)],
        )
        if len(values):
            array[:] = values


# --------------------------------------------------------------------------------------------------
# Tasks: write one whole shard
# --------------------------------------------------------------------------------------------------


def write_shard(
    partial_path: str | os.PathLike[str],
    shard_index: int,
    images: np.ndarray,
    *,
    n_cells: int | None = None,
    checksum: bool = True,
) -> ShardReceipt:
    """Write every crop of one shard of a draft gallery in a single call (safe in any process).

    Re-running the call for the same shard rewrites it whole, so task retries are safe. Different
    shards may be written concurrently; one shard must never be split between calls.

    Parameters
    ----------
    partial_path : str or PathLike
        ``GalleryDraft.partial_path`` of the draft.
    shard_index : int
        Index into ``shard_ranges(n_cells, shard_cells)``.
    images : ndarray
        uint8 array of shape ``(stop - start, crop_px, crop_px, 3)`` for that shard's rows.
    n_cells : int, optional
        The gallery's final number of cells, for a draft from :func:`create_gallery_draft` whose last
        shard holds fewer rows than its room; by default the rows of the draft's ``images``.
    checksum : bool
        Put the images' :func:`images_checksum` into the receipt, for ``finalize_gallery(...,
        verify_data=True)``. A caller that does not verify skips it (about 0.06 ms per 288 px crop).

    Returns
    -------
    ShardReceipt
        The rows written and, with ``checksum``, their :func:`images_checksum`.

    Raises
    ------
    GalleryError
        If ``partial_path`` is not an unfinished gallery draft.
    ValueError, TypeError
        If ``shard_index`` is out of range or ``images`` has the wrong shape or dtype.
    """
    path = Path(partial_path)
    try:
        group = zarr.open_group(path, mode="r+", zarr_format=3)
    except (OSError, ValueError, zarr.errors.BaseZarrError) as exc:
        raise GalleryError(f"no gallery draft at {path}; create it with create_gallery first") from exc
    _check_is_draft(path, dict(group.attrs))
    # A crop is never all fill value; checking each one for it (zarr's default) costs a third of
    # the write's CPU beyond compression.
    array = group[_IMAGES].with_config({"write_empty_chunks": True})
    rows, crop_px = array.shape[0], array.shape[1]
    if n_cells is not None and not 0 <= n_cells <= rows:
        raise ValueError(f"n_cells must be in [0, {rows}] for {path}, got {n_cells!r}")
    ranges = shard_ranges(rows if n_cells is None else int(n_cells), array.shards[0])
    if not isinstance(shard_index, int | np.integer) or not 0 <= shard_index < len(ranges):
        raise ValueError(f"shard_index must be in [0, {len(ranges)}) for {path}, got {shard_index!r}")
    start, stop = ranges[shard_index]
    _check_shard_images(images, (stop - start, crop_px, crop_px, 3), shard_index)
    layout = _zarr_shard.shard_layout(array)
    if layout is None:
        array[start:stop] = images
    else:  # the same bytes as zarr's write, for a third of the CPU beyond compression (_zarr_shard)
        shard = _zarr_shard.encode_shard(images, layout)
        _zarr_shard.write_file_atomically(_shard_file(path, array, shard_index), shard)
    return ShardReceipt(int(shard_index), start, stop, images_checksum(images) if checksum else None)


def _check_is_draft(path: Path, attrs: Mapping[str, Any]) -> None:
    if attrs.get("format") != GALLERY_FORMAT:
        raise GalleryError(f"{path} is not a gallery draft (format {attrs.get('format')!r})")
    if attrs.get("complete") is not False:
        raise GalleryError(f"{path} is already complete; a finished gallery is never written to")


def _check_shard_images(images: np.ndarray, shape: tuple[int, ...], shard_index: int) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = getattr(images, "dtype", type(images).__name__)
        raise TypeError(f"shard {shard_index}: images must be a uint8 ndarray, got {got}")
    if images.shape != shape:
        raise ValueError(f"shard {shard_index}: images must have shape {shape}, got {images.shape}")


# --------------------------------------------------------------------------------------------------
# Driver: finalize
# --------------------------------------------------------------------------------------------------


def finalize_gallery(
    draft: GalleryDraft,
    attrs_update: Mapping[str, Any] | None = None,
    receipts: Iterable[ShardReceipt] | None = None,
    *,
    verify_data: bool = False,
    cells: Mapping[str, np.ndarray] | None = None,
    candidates: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Check every shard is on disk, mark the gallery complete, and move it to its final name.

    Order of operations: shard check, consolidated metadata, root attributes with ``complete: true``
    (the last write inside the gallery), then one rename to the final name. An existing gallery is
    swapped out atomically (Linux ``renameat2(RENAME_EXCHANGE)``) and then deleted; where the file
    system cannot exchange (e.g. NFS, macOS) it is renamed aside first, which leaves the final name
    briefly empty but never holding a partial gallery.

    Parameters
    ----------
    draft : GalleryDraft
        What :func:`create_gallery` returned.
    attrs_update : Mapping of str to Any, optional
        Attributes known only at the end (counts, timings); converted with :func:`to_json_safe`.
    receipts : iterable of ShardReceipt, optional
        What the :func:`write_shard` calls returned; when given, they must cover every shard once.
    verify_data : bool
        Re-read every shard and compare it with its receipt's checksum (reads the whole gallery); the
        receipts must carry one (:func:`write_shard` with ``checksum=True``, the default).
    cells, candidates : Mapping of str to ndarray, optional
        The tables, for a draft from :func:`create_gallery_draft` (and only then), as for
        :func:`create_gallery`; ``images`` is cut to the rows of ``cells``.

    Returns
    -------
    Path
        ``draft.final_path``.

    Raises
    ------
    GalleryError
        If a shard is missing or differs from its receipt, the draft is not a draft, or the final
        path appeared meanwhile and may not be replaced.
    ValueError
        If ``verify_data`` is asked for without receipts, or with receipts that carry no checksum.
    """
    partial = draft.partial_path
    try:
        group = zarr.open_group(partial, mode="r+", zarr_format=3)
    except (OSError, ValueError, zarr.errors.BaseZarrError) as exc:
        raise GalleryError(f"gallery draft {partial} has disappeared; re-run the slide") from exc
    _check_is_draft(partial, dict(group.attrs))
    update = _user_attrs(attrs_update, "attrs_update")
    draft = _with_tables(draft, cells, candidates)
    group = zarr.open_group(partial, mode="r+", zarr_format=3)
    _check_shards_on_disk(draft, group[_IMAGES])
    if receipts is not None:
        listed = list(receipts)
        if verify_data and any(receipt.crc32 is None for receipt in listed):
            raise ValueError("verify_data=True needs receipts with checksums (write_shard's checksum=True)")
        _check_receipts(draft, group[_IMAGES], listed, verify_data)
    elif verify_data:
        raise ValueError("verify_data=True needs the receipts returned by write_shard")
    _check_final_path_replaceable(draft.final_path, draft.overwrite)
    _consolidate(partial)
    group = zarr.open_group(partial, mode="r+", zarr_format=3)
    group.attrs.update(update | {"finalized_utc": _utc_now(), "complete": True})
    _publish(partial, draft.final_path)
    return draft.final_path


def _with_tables(
    draft: GalleryDraft, cells: Mapping[str, np.ndarray] | None, candidates: Mapping[str, np.ndarray] | None
) -> GalleryDraft:
    """The draft with its tables written: those given now, for a draft created without them."""
    given = cells is not None or candidates is not None
    if draft.has_tables:
        if given:
            raise ValueError(f"gallery draft {draft.partial_path} has its tables; do not pass them again")
        return draft
    if cells is None or candidates is None:
        raise ValueError(f"gallery draft {draft.partial_path} has no tables yet; pass cells and candidates")
    cell_columns = _prepare_table(cells, None, REQUIRED_CELL_COLUMNS, "cells")
    candidate_columns = _prepare_table(candidates, None, REQUIRED_CANDIDATE_COLUMNS, "candidates")
    n_cells = len(next(iter(cell_columns.values())))
    if n_cells > draft.n_cells:
        where = draft.partial_path
        raise ValueError(f"{n_cells} cells do not fit the draft {where}, made for {draft.n_cells}")
    _write_tables(draft, cell_columns, candidate_columns)
    return dataclasses.replace(draft, n_cells=n_cells, has_tables=True)


def _shard_file(partial: Path, array: zarr.Array, shard_index: int) -> Path:
    # With sharding, the array's chunk grid is the shard grid, so this key names the shard file.
    key = array.metadata.encode_chunk_key((shard_index, 0, 0, 0))
    return partial / _IMAGES / key


def _check_shards_on_disk(draft: GalleryDraft, array: zarr.Array) -> None:
    missing = [
        (i, rows)
        for i, rows in enumerate(draft.shard_ranges())
        if not _shard_file(draft.partial_path, array, i).is_file()
    ]
    if missing:
        shown = ", ".join(f"shard {i} (cells {a}-{b - 1})" for i, (a, b) in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise GalleryError(
            f"gallery {draft.final_path} is incomplete: {len(missing)} of {draft.n_shards} shards were "
            f"never written ({shown}{more}); a task failed, re-run the slide"
        )


def _check_receipts(
    draft: GalleryDraft, array: zarr.Array, receipts: list[ShardReceipt], verify_data: bool
) -> None:
    expected = draft.shard_ranges()
    by_index = {receipt.shard_index: receipt for receipt in receipts}
    if len(by_index) != len(receipts) or sorted(by_index) != list(range(len(expected))):
        raise GalleryError(
            f"gallery {draft.final_path}: receipts cover shards {sorted(by_index)}, expected "
            f"0-{len(expected) - 1} once each; a task failed or ran twice, re-run the slide"
        )
    for index, (start, stop) in enumerate(expected):
        receipt = by_index[index]
        if (receipt.start, receipt.stop) != (start, stop):
            raise GalleryError(f"gallery {draft.final_path}: shard {index} receipt has wrong rows")
        if verify_data and images_checksum(array[start:stop]) != receipt.crc32:
            raise GalleryError(
                f"gallery {draft.final_path}: shard {index} (cells {start}-{stop - 1}) on disk differs "
                "from what its task wrote; re-run the slide"
            )


def _consolidate(path: Path) -> None:
    # Consolidated metadata is not yet part of the zarr v3 spec; zarr-python reads it, others fall
    # back to the per-array zarr.json files that stay in place, so the warning is not for users.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path), zarr_format=3)


def _publish(partial: Path, final: Path) -> None:
    """Move ``partial`` to ``final``; an existing ``final`` is swapped out and deleted."""
    try:
        if not os.path.lexists(final):
            os.rename(partial, final)
            return
        if _exchange_paths(partial, final):
            _remove_tree(partial)  # now holds the old gallery
            return
        aside = _replaced_path_for(final)
        _remove_tree(aside)
        os.rename(final, aside)
        os.rename(partial, final)
        _remove_tree(aside)
    except OSError as exc:
        raise GalleryError(f"cannot move gallery {partial} to {final}: {exc}") from exc


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange_paths(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux renameat2); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or musl without the wrapper
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the file system (e.g. NFS) cannot exchange
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def wait_for_pending_writes(timeout_s: float = 10.0) -> None:
    """Wait until writes zarr has started in this process are done (at most ``timeout_s``).

    zarr-python runs its IO on a background event loop; when a wait for it is interrupted (Ctrl-C),
    the write goes on and may create files after the caller has already deleted the draft.
    """
    import asyncio

    async def _drain() -> None:
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    try:
        from zarr.core import sync as zarr_sync  # zarr's own IO loop (not public API)

        if zarr_sync.loop[0] is None:  # zarr has done no IO in this process
            return
        zarr_sync.sync(_drain(), timeout=timeout_s + 1.0)
    except Exception as exc:  # best effort: a leftover draft is removed by the next run anyway
        warnings.warn(f"pending gallery writes not confirmed finished: {exc}", RuntimeWarning, stacklevel=2)


def _remove_tree(path: Path) -> bool:
    if not os.path.lexists(path):
        return False
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    return True


# --------------------------------------------------------------------------------------------------
# State checks and clean-up
# --------------------------------------------------------------------------------------------------


def _read_root_attrs(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise GalleryError(f"no gallery at {path}; check the path or run the pipeline on the slide")
    try:
        group = zarr.open_group(path, mode="r")
    except (OSError, ValueError, zarr.errors.BaseZarrError) as exc:
        raise GalleryError(f"{path} is not a gallery (no zarr group there)") from exc
    return dict(group.attrs)


def _check_readable(path: Path, attrs: Mapping[str, Any]) -> None:
    if attrs.get("format") != GALLERY_FORMAT:
        raise GalleryError(f"{path} is a zarr group but not a {GALLERY_FORMAT} gallery")
    version = attrs.get("format_version")
    if version != GALLERY_FORMAT_VERSION:
        raise GalleryError(
            f"{path} has gallery format version {version!r}; this pipeline reads version "
            f"{GALLERY_FORMAT_VERSION}. Re-run the pipeline or install the matching version"
        )
    if attrs.get("complete") is not True:
        raise GalleryError(
            f"{path} is incomplete (the run that wrote it did not finish); re-run the pipeline for this slide"
        )


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True only for a finished gallery of this format version (safe to skip when resuming).

    Parameters
    ----------
    path : str or PathLike
        The gallery's final path, e.g. ``OUT/<slide stem>.zarr``.

    Returns
    -------
    bool
        False for a missing path, a non-gallery, another format version, or an unfinished draft.
    """
    gallery_path = Path(path)
    try:
        _check_readable(gallery_path, _read_root_attrs(gallery_path))
    except GalleryError:
        return False
    return True


def remove_partial(final_path: str | os.PathLike[str]) -> list[Path]:
    """Delete what a crashed run left next to ``final_path`` (never the gallery at ``final_path``).

    Parameters
    ----------
    final_path : str or PathLike
        The gallery's final path, e.g. ``OUT/<slide stem>.zarr``.

    Returns
    -------
    list of Path
        The directories removed (empty when there was nothing to clean).
    """
    final = Path(final_path)
    leftovers = [partial_path_for(final), _replaced_path_for(final)]
    return [path for path in leftovers if _remove_tree(path)]


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class Gallery:
    """A finished gallery opened for reading; indexable like a PyTorch map-style Dataset.

    Attributes
    ----------
    path : Path
        The gallery directory.
    images : zarr.Array
        Lazy uint8 array of shape ``(N, crop_px, crop_px, 3)``; slicing reads from disk.
    cells : pandas.DataFrame
        N rows; row i describes ``images[i]``.
    candidates : pandas.DataFrame
        Every object that passed the size filter, with ``accepted`` and ``reason``.
    attrs : dict
        The gallery's attributes (run metadata).

    Examples
    --------
    >>> gallery = open_gallery("OUT/slide1.zarr")  # doctest: +SKIP
    >>> image, row = gallery[0]  # doctest: +SKIP
    >>> row["area_um2"]  # doctest: +SKIP
    """

    def __init__(
        self,
        path: Path,
        images: zarr.Array,
        cells: pd.DataFrame,
        candidates: pd.DataFrame,
        attrs: dict[str, Any],
    ) -> None:
        self.path = path
        self.images = images
        self.cells = cells
        self.candidates = candidates
        self.attrs = attrs
        self._records: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Return crop ``index`` as a ``(crop_px, crop_px, 3)`` uint8 array and its cells row."""
        if not isinstance(index, int | np.integer):
            raise TypeError(f"gallery index must be an integer, got {type(index).__name__}")
        n = len(self)
        position = int(index) + n if index < 0 else int(index)
        if not 0 <= position < n:
            raise IndexError(f"cell index {index} out of range for a gallery of {n} cells")
        if self._records is None:
            self._records = self.cells.to_dict("records")
        return np.asarray(self.images[position]), dict(self._records[position])

    def __repr__(self) -> str:
        return f"Gallery({str(self.path)!r}, cells={len(self)}, candidates={len(self.candidates)})"


def open_gallery(path: str | os.PathLike[str]) -> Gallery:
    """Open a finished gallery for reading.

    Parameters
    ----------
    path : str or PathLike
        The gallery directory, e.g. ``OUT/<slide stem>.zarr``.

    Returns
    -------
    Gallery
        Lazy images, the two tables as DataFrames, and the attributes.

    Raises
    ------
    GalleryError
        If the path is missing, is not a gallery of this format version, or is incomplete.
    """
    gallery_path = Path(path)
    attrs = _read_root_attrs(gallery_path)
    _check_readable(gallery_path, attrs)
    group = zarr.open_group(gallery_path, mode="r")
    try:
        images = group[_IMAGES]
        tables = [_read_table(group[name]) for name in _TABLES]
    except KeyError as exc:
        raise GalleryError(f"gallery {gallery_path} lacks {exc}; it is damaged, re-run the slide") from exc
    return Gallery(gallery_path, images, tables[0], tables[1], attrs)


def _read_table(group: zarr.Group) -> pd.DataFrame:
    names = group.attrs.get("columns") or sorted(group.array_keys())
    return pd.DataFrame({name: _column_series(group[name][:]) for name in names})


def _column_series(values: np.ndarray) -> pd.Series:
    # dtype=str gives pandas' own string type (object in pandas 2, "str" in pandas 3), also when empty.
    if values.dtype.kind == "T":
        return pd.Series(values.astype(object), dtype=str)
    return pd.Series(values)
