"""Export a gallery as image files, CSV tables or a GeoJSON overlay for QuPath.

Layout written into ``OUT`` for a gallery ``<stem>.zarr`` (``python -m pipeline export``)::

    OUT/<stem>/<stem>_<index>_x<X>_y<Y>.<ext>   --format png | jpeg | tiff: one image per cell, in
                                                 gallery order; X, Y the level-0 pixel holding the crop
                                                 centre; index zero-padded to sort in gallery order
    OUT/<stem>/<stem>.cells.csv                  ... and one row per image: file (name in the folder),
                                                 slide, and every column of the gallery's cells/ table
    OUT/<stem>.cells.csv                         --format csv: the cells/ table, one row per cell
    OUT/<stem>.candidates.csv                    ... and every candidate, accepted or rejected
    OUT/<stem>.geojson                           --format geojson: every candidate as a QuPath detection

The public galleries name each image by a prefix and a running number (PBC: class and a random id,
``BNE_12345.jpg``; AML-Cytomorphology_LMU: class abbreviation and an index, with ``annotations.dat``
mapping file names to labels). There is no class before annotation, so the prefix is the slide, the
coordinates find the cell again on the slide, and ``<stem>.cells.csv`` plays the part of
``annotations.dat``: its ``label`` column holds the labels given in the review app
(:mod:`pipeline.review.labels`), with one ``label_<annotator>`` column per annotator, and ``--by-label``
writes ``OUT/<stem>/<label>/<file>``, the folder-per-class layout torchvision's ImageFolder reads.

Images are read one gallery shard at a time, so memory stays at one shard (128 crops, ~32 MB) whatever
the gallery's size. The image folder, its table included, is written under a hidden temporary name of
its own (``.<stem>.export.<pid>-<random>.partial``, so concurrent exports never share one) and renamed
when complete, so it can be moved or merged with other slides' folders as a whole. Only a killed export
(SIGKILL, power loss) leaves such a folder behind; it is safe to delete.

GeoJSON (QuPath's import format, read by ``File > Import objects from file`` or drag and drop): a
``FeatureCollection`` with one ``Feature`` per candidate; geometry in level-0 pixel coordinates (QuPath's
image space, origin at the top left); ``properties.objectType`` ``"detection"``,
``properties.classification`` ``{"name": "accepted" or the reject reason, "color": [r, g, b]}``,
``properties.measurements`` the candidate's numeric features (QuPath reads them as a name-to-number map,
so non-finite values are left out) and ``properties.metadata`` identifiers as strings. The geometry is a
polygon: a circle of the object's equivalent area (32 vertices, scaled so the polygon's area equals
``area_um2``), because the gallery keeps no outlines and a point would show neither the cell's size nor
let QuPath measure it; a polygon also selects with a click and counts in QuPath's annotations.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ._files import atomic_path
from .crop_presets import EXPORT_FORMATS, IMAGE_FORMATS, match_crop_preset
from .errors import GalleryError, ParameterError
from .gallery import DEFAULT_SHARD_CELLS, Gallery, open_gallery, shard_ranges
from .review.labels import UNSURE, LabelStore, check_annotator

__all__ = [
    "CIRCLE_VERTICES",
    "EXPORT_FORMATS",
    "ExportResult",
    "cell_labels",
    "check_distinct_stems",
    "circle_polygon",
    "default_image_format",
    "export_galleries",
    "export_gallery",
    "export_geojson",
    "export_images",
    "export_tables",
    "geojson_features",
    "image_file_name",
]

#: Vertices of the circle drawn for each detection in the GeoJSON.
CIRCLE_VERTICES = 32
#: File name extension per image format (the public galleries use .jpg and .tiff).
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "tiff": "tiff"}
_GREY = (90, 90, 90)
_UUID_NAMESPACE = uuid.UUID("6f1d3c52-9a57-4d0e-8a43-2c7b1e6a0f21")


@dataclass(frozen=True)
class ExportResult:
    """What one export wrote.

    Attributes
    ----------
    gallery
        The gallery exported.
    export_format
        One of :data:`EXPORT_FORMATS`.
    files
        Tables and overlays written (not the individual images).
    image_dir
        Folder of the images (``None`` for csv and geojson).
    n_images
        Image files written.
    n_features
        GeoJSON features written (every candidate), or rows of the candidates table for csv.
    n_accepted
        Accepted candidates (cells) of the gallery.
    seconds
        Wall time.
    """

    gallery: Path
    export_format: str
    files: list[Path] = field(default_factory=list)
    image_dir: Path | None = None
    n_images: int = 0
    n_features: int = 0
    n_accepted: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the terminal."""
        stem = _stem(self.gallery)
        if self.image_dir is not None:
            what = f"{self.n_images} {self.export_format} images in {self.image_dir}/"
        elif self.export_format == "geojson":
            what = (
                f"{self.n_features} detections ({self.n_accepted} accepted, "
                f"{self.n_features - self.n_accepted} rejected)"
            )
        else:
            what = f"{self.n_features} candidates ({self.n_accepted} accepted)"
        written = ", ".join(str(path) for path in self.files)
        return f"{stem}: {what}; wrote {written} in {self.seconds:.1f} s"


def _stem(gallery_path: Path) -> str:
    name = gallery_path.name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def image_file_name(stem: str, index: int, x_px: float, y_px: float, extension: str, digits: int = 5) -> str:
    """File name of one exported crop: slide stem, gallery index and level-0 centre pixel.

    Parameters
    ----------
    stem
        Slide stem (the gallery's name without ``.zarr``).
    index
        Row of the crop in the gallery.
    x_px, y_px
        Level-0 centre of the crop, continuous coordinates; the name holds the pixel that contains it.
    extension
        File extension without the dot.
    digits
        Zero padding of ``index``, so names sort in gallery order.

    Returns
    -------
    str

    Examples
    --------
    >>> image_file_name("slide1", 7, 1003.9, 44.5, "png")
    'slide1_00007_x1003_y44.png'
    """
    return f"{stem}_{index:0{digits}d}_x{math.floor(x_px)}_y{math.floor(y_px)}.{extension}"


def default_image_format(gallery: Gallery) -> str:
    """The file format of the public gallery whose crop geometry this gallery matches; else png."""
    crop = (gallery.attrs.get("parameters") or {}).get("crop") or {}
    if "crop_um" in crop and "crop_px" in crop:
        preset = match_crop_preset(float(crop["crop_um"]), int(crop["crop_px"]))
        if preset is not None:
            return preset.image_format
    return "png"


def export_gallery(
    gallery_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    export_format: str | None = None,
    *,
    jpeg_quality: int = 95,
    overwrite: bool = False,
    progress: bool = True,
    by_label: bool = False,
    annotator: str | None = None,
) -> ExportResult:
    """Export one gallery (see the module docstring for the layout).

    Parameters
    ----------
    gallery_path
        ``OUT/<stem>.zarr`` written by ``run``.
    out_dir
        Output folder (created if missing).
    export_format
        One of :data:`EXPORT_FORMATS`; ``None`` picks the image format of the public gallery whose crop
        geometry the gallery was cut with (``run --preset``), png otherwise.
    jpeg_quality
        JPEG quality, 1-100.
    overwrite
        Replace files of an earlier export of this gallery; otherwise they stop the export.
    progress
        Show a progress bar (images only; the tables are quick).
    by_label
        Images only: write each labelled cell into a folder named after its label
        (``OUT/<stem>/<label>/...``, the layout torchvision's ImageFolder reads); cells without a
        label, or labelled "unsure", are left out of the folders (their ``file`` is empty in the table).
    annotator
        Whose labels fill the ``label`` column; by default the label every annotator who labelled the
        cell agrees on (empty where they disagree).

    Returns
    -------
    ExportResult

    Raises
    ------
    ParameterError
        For an unknown format or a JPEG quality out of range.
    GalleryError
        If the gallery cannot be read, or earlier export files exist and ``overwrite`` is false.
    """
    started = time.perf_counter()
    if export_format is not None and export_format not in EXPORT_FORMATS:
        raise ParameterError(
            f"unknown export format {export_format!r}; choose one of: {', '.join(EXPORT_FORMATS)}"
        )
    if not 1 <= int(jpeg_quality) <= 100:
        raise ParameterError(f"--jpeg-quality must be between 1 and 100, got {jpeg_quality}")
    gallery = open_gallery(gallery_path)
    fmt = export_format or default_image_format(gallery)
    out = Path(out_dir)
    stem = _stem(gallery.path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GalleryError(f"cannot create the export folder {out}: {exc}") from exc
    n_accepted = int(gallery.candidates["accepted"].sum()) if len(gallery.candidates) else 0
    if by_label and fmt not in IMAGE_FORMATS:
        raise ParameterError(f"--by-label needs an image format ({', '.join(IMAGE_FORMATS)}), not {fmt}")
    labels = cell_labels(gallery, annotator)
    if fmt in IMAGE_FORMATS:
        image_dir, names = export_images(
            gallery,
            out,
            fmt,
            jpeg_quality=jpeg_quality,
            overwrite=overwrite,
            progress=progress,
            labels=labels,
            by_label=by_label,
        )
        return ExportResult(
            gallery.path,
            fmt,
            [image_dir / f"{stem}.cells.csv"],
            image_dir,
            n_images=sum(bool(name) for name in names),
            n_accepted=n_accepted,
            seconds=time.perf_counter() - started,
        )
    if fmt == "geojson":
        path = out / f"{stem}.geojson"
        n_features = export_geojson(gallery, path, overwrite=overwrite)
        return ExportResult(
            gallery.path,
            fmt,
            [path],
            n_features=n_features,
            n_accepted=n_accepted,
            seconds=time.perf_counter() - started,
        )
    files = export_tables(gallery, out, overwrite=overwrite, labels=labels)
    return ExportResult(
        gallery.path,
        fmt,
        files,
        n_features=len(gallery.candidates),
        n_accepted=n_accepted,
        seconds=time.perf_counter() - started,
    )


def check_distinct_stems(gallery_paths: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse galleries that would export to the same names (the same stem from different folders).

    Every export is named after the gallery's stem (``OUT/<stem>/``, ``OUT/<stem>.geojson``, ...), so
    two galleries ``a/slide1.zarr`` and ``b/slide1.zarr`` exported into one folder would overwrite or
    refuse each other half way through.

    Parameters
    ----------
    gallery_paths
        The galleries of one export call.

    Raises
    ------
    ParameterError
        Naming the first stem given twice and its galleries.
    """
    by_stem: defaultdict[str, list[str]] = defaultdict(list)
    for path in gallery_paths:
        by_stem[_stem(Path(path))].append(str(path))
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            which = "both" if len(paths) == 2 else "all"
            raise ParameterError(
                f"{', '.join(paths[:-1])} and {paths[-1]} would {which} export as {stem!r}; export them "
                "in separate calls with different --out folders"
            )


def export_galleries(
    gallery_paths: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    export_format: str | None = None,
    *,
    jpeg_quality: int = 95,
    overwrite: bool = False,
    progress: bool = True,
    by_label: bool = False,
    annotator: str | None = None,
) -> Iterator[ExportResult]:
    """Export several galleries into one folder, one after the other.

    The stems are checked before anything is written; the results come as each export finishes.

    Parameters
    ----------
    gallery_paths
        ``OUT/<stem>.zarr`` galleries written by ``run``, with distinct stems.
    out_dir, export_format, jpeg_quality, overwrite, progress, by_label, annotator
        As for :func:`export_gallery`.

    Returns
    -------
    iterator of ExportResult
        One per gallery, in the order given.

    Raises
    ------
    ParameterError
        At once, if two galleries have the same stem (see :func:`check_distinct_stems`); later, as
        :func:`export_gallery` does.
    """
    paths = list(gallery_paths)
    check_distinct_stems(paths)
    return (
        export_gallery(
            path,
            out_dir,
            export_format,
            jpeg_quality=jpeg_quality,
            overwrite=overwrite,
            progress=progress,
            by_label=by_label,
            annotator=annotator,
        )
        for path in paths
    )


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def export_images(
    gallery: Gallery,
    out_dir: Path,
    image_format: str,
    *,
    jpeg_quality: int = 95,
    overwrite: bool = False,
    progress: bool = True,
    labels: pd.DataFrame | None = None,
    by_label: bool = False,
) -> tuple[Path, list[str]]:
    """Write every crop of ``gallery`` as one image file in ``out_dir/<stem>/``, shard by shard.

    The folder also gets ``<stem>.cells.csv``: one row per image, ``file`` (its name), ``slide``,
    ``label`` and every column of the gallery's cells table.

    Parameters
    ----------
    gallery
        An open gallery.
    out_dir
        Output folder; the images go to its sub-folder named after the slide.
    image_format
        ``png``, ``jpeg`` or ``tiff``.
    jpeg_quality
        JPEG quality, 1-100.
    overwrite
        Replace an existing image folder of this slide.
    progress
        Show a progress bar.
    labels
        :func:`cell_labels` of the gallery (default: read them).
    by_label
        Write each cell into the sub-folder of its label (ImageFolder layout); cells without a label
        or labelled "unsure" are not written.

    Returns
    -------
    tuple of (Path, list of str)
        The image folder and the file names (relative to it) in gallery order; ``""`` for a cell not
        written.
    """
    if image_format not in IMAGE_FORMATS:
        raise ParameterError(
            f"unknown image format {image_format!r}; choose one of: {', '.join(IMAGE_FORMATS)}"
        )
    stem = _stem(gallery.path)
    final = out_dir / stem
    _check_free([final], overwrite)
    # A name of our own: another export of this stem (another process, or another gallery of this
    # slide) may be writing next to us, and its folder is not ours to delete.
    partial = _own_temporary(out_dir, stem, "partial")
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise GalleryError(f"cannot write images to {out_dir}: {exc}; check the output folder") from exc
    n = len(gallery)
    digits = max(5, len(str(max(n - 1, 0))))
    extension = _EXTENSIONS[image_format]
    xs = gallery.cells["x_px"].to_numpy(float)
    ys = gallery.cells["y_px"].to_numpy(float)
    names = [image_file_name(stem, i, xs[i], ys[i], extension, digits) for i in range(n)]
    if labels is None:
        labels = cell_labels(gallery)
    if by_label:
        names = [_class_folder_name(label, name) for label, name in zip(labels["label"], names, strict=True)]
    writer = _image_writer(image_format, jpeg_quality, gallery, stem)
    try:
        for folder in sorted({name.rpartition("/")[0] for name in names if "/" in name}):
            (partial / folder).mkdir()
        with tqdm(total=n, desc=f"export {stem}", unit="cell", disable=not progress, leave=False) as bar:
            for start, images in _shards(gallery):
                for offset, image in enumerate(images):
                    index = start + offset
                    if names[index]:
                        writer(partial / names[index], image, index, xs[index], ys[index])
                bar.update(len(images))
        _write_csv(_cells_table(gallery, stem, names, labels), partial / f"{stem}.cells.csv")
        _publish(partial, final, out_dir, stem, overwrite)
    except OSError as exc:
        raise GalleryError(f"cannot write images to {out_dir}: {exc}; check the output folder") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final, names


def _own_temporary(out_dir: Path, stem: str, kind: str) -> Path:
    """A hidden path next to the export that no other export, in any process or on any host, uses."""
    return out_dir / f".{stem}.export.{os.getpid()}-{uuid.uuid4().hex[:12]}.{kind}"


def _publish(partial: Path, final: Path, out_dir: Path, stem: str, overwrite: bool) -> None:
    """Rename the finished folder to its final name, moving an earlier export aside first if allowed."""
    old = None
    if final.exists():
        if not overwrite:  # appeared while we wrote: another export of this slide finished first
            raise GalleryError(f"{final} was written by another export meanwhile; --overwrite replaces it")
        old = _own_temporary(out_dir, stem, "replaced")
        final.rename(old)
    try:
        partial.rename(final)
    except OSError as exc:
        if old is not None:
            with contextlib.suppress(OSError):
                old.rename(final)  # keep the earlier export rather than nothing
        raise GalleryError(
            f"cannot publish {final}: {exc.strerror or exc}; another export of {stem} may be running"
        ) from exc
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # a no-op once it was put back


def _shards(gallery: Gallery) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, images)`` of each of the gallery's shards, in order: one shard decoded at a time."""
    shard_cells = int(gallery.attrs.get("shard_cells") or DEFAULT_SHARD_CELLS)
    for start, stop in shard_ranges(len(gallery), shard_cells):
        yield start, np.asarray(gallery.images[start:stop])


def _image_writer(image_format: str, jpeg_quality: int, gallery: Gallery, stem: str) -> Any:
    """A function ``(path, rgb, index, x_px, y_px)`` that writes one crop."""
    if image_format == "tiff":
        import tifffile

        crop = (gallery.attrs.get("parameters") or {}).get("crop") or {}
        px_per_cm = None
        if crop.get("crop_um") and crop.get("crop_px"):
            px_per_cm = 1e4 * float(crop["crop_px"]) / float(crop["crop_um"])

        def write_tiff(path: Path, rgb: np.ndarray, index: int, x_px: float, y_px: float) -> None:
            # The scale travels in the TIFF resolution tags (as the AML gallery's 14.14 px/um does in
            # its metadata), the cell's origin in the description.
            description = json.dumps({"slide": stem, "index": index, "x_px": x_px, "y_px": y_px})
            tifffile.imwrite(
                path,
                rgb,
                photometric="rgb",
                compression="zlib",
                description=description,
                metadata=None,
                resolution=None if px_per_cm is None else (px_per_cm, px_per_cm),
                resolutionunit=None if px_per_cm is None else "CENTIMETER",
            )

        return write_tiff
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if image_format == "jpeg" else []

    def write_cv2(path: Path, rgb: np.ndarray, index: int, x_px: float, y_px: float) -> None:
        if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
            raise OSError(f"OpenCV could not write {path}")

    return write_cv2


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _class_folder_name(label: str | None, name: str) -> str:
    # "unsure" is no class to train on, and unlabelled cells have none: ImageFolder would take any
    # folder of theirs for one more class.
    return "" if label is None or label == UNSURE else f"{label}/{name}"


def cell_labels(gallery: Gallery, annotator: str | None = None) -> pd.DataFrame:
    """Labels given in the review app, one row per cell: ``label`` and ``label_<annotator>`` columns.

    Parameters
    ----------
    gallery
        An open gallery.
    annotator
        Whose labels make the ``label`` column. By default it holds the label every annotator who
        labelled the cell gave (empty when they disagree, or nobody labelled it).

    Returns
    -------
    pandas.DataFrame
        N rows; ``label`` (None where empty), then one ``label_<name>`` column per annotator.

    Raises
    ------
    ParameterError
        If ``annotator`` has labelled nothing in this gallery.
    """
    table = LabelStore(gallery.path, gallery.attrs).table()
    if annotator is not None:
        check_annotator(annotator)
        if annotator not in table.columns:
            known = ", ".join(table.columns) or "none yet"
            raise ParameterError(f"{annotator!r} has no labels for {gallery.path}; annotators: {known}")
        chosen = table[annotator].tolist()
    else:
        chosen = [_agreed(row) for row in table.itertuples(index=False)]
    out = pd.DataFrame({"label": pd.Series(chosen, dtype=object)})
    for name in table.columns:
        out[f"label_{name}"] = table[name].to_numpy(object)
    return out


def _agreed(labels: Iterable[str | None]) -> str | None:
    given = {label for label in labels if label is not None}
    return given.pop() if len(given) == 1 else None


def _cells_table(
    gallery: Gallery, stem: str, files: list[str] | None, labels: pd.DataFrame | None = None
) -> pd.DataFrame:
    table = gallery.cells.copy()
    if labels is None:
        labels = cell_labels(gallery)
    for position, name in enumerate(labels.columns):
        table.insert(position, name, labels[name].to_numpy(object))
    table.insert(0, "slide", stem)
    if files is not None:
        table.insert(0, "file", files)
    return table


def export_tables(
    gallery: Gallery, out_dir: Path, *, overwrite: bool = False, labels: pd.DataFrame | None = None
) -> list[Path]:
    """Write ``<stem>.cells.csv`` and ``<stem>.candidates.csv`` (every column, one row per object).

    The cells table starts with ``slide`` and the labels (``label``, ``label_<annotator>``; see
    :func:`cell_labels`).

    Parameters
    ----------
    gallery
        An open gallery.
    out_dir
        Output folder.
    overwrite
        Replace existing files.
    labels
        :func:`cell_labels` of the gallery (default: read them).

    Returns
    -------
    list of Path
        The two files written.
    """
    stem = _stem(gallery.path)
    cells_csv, candidates_csv = out_dir / f"{stem}.cells.csv", out_dir / f"{stem}.candidates.csv"
    _check_free([cells_csv, candidates_csv], overwrite)
    _write_csv(_cells_table(gallery, stem, None, labels), cells_csv)
    candidates = gallery.candidates.copy()
    candidates.insert(0, "slide", stem)
    candidates.insert(1, "candidate_index", np.arange(len(candidates)))
    _write_csv(candidates, candidates_csv)
    return [cells_csv, candidates_csv]


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    # An empty field, not "inf", where there is no value (gap_um of a cell with no neighbour), as in
    # the GeoJSON: spreadsheets and R read "inf" as text.
    floats = table.select_dtypes("floating").columns
    table = table.assign(**{c: table[c].where(np.isfinite(table[c])) for c in floats})
    try:
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
    except OSError as exc:
        raise GalleryError(f"cannot write {path}: {exc}") from exc


def _check_free(paths: list[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(path) for path in paths if path.exists()]
    if len(existing) == 1:
        raise GalleryError(
            f"{existing[0]} already exists from an earlier export; add --overwrite to replace it"
        )
    if existing:
        names = f"{', '.join(existing[:-1])} and {existing[-1]}"
        raise GalleryError(f"{names} already exist from an earlier export; add --overwrite to replace them")


# --------------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------------


def circle_polygon(
    x_px: float, y_px: float, area_px2: float, vertices: int = CIRCLE_VERTICES
) -> list[list[float]]:
    """Closed ring of a regular polygon centred on ``(x_px, y_px)`` whose area is ``area_px2``.

    Vertices run counter-clockwise in the coordinates' own axes (the exterior-ring orientation of
    RFC 7946), first vertex repeated at the end.

    Parameters
    ----------
    x_px, y_px
        Centre, level-0 pixels.
    area_px2
        Area of the polygon, px^2.
    vertices
        Number of distinct vertices, >= 3.

    Returns
    -------
    list of [x, y]
        ``vertices + 1`` positions rounded to 0.01 px.
    """
    if vertices < 3:
        raise ValueError(f"a polygon needs at least 3 vertices, got {vertices}")
    # Area of a regular n-gon of circumradius r is n/2 r^2 sin(2 pi / n).
    radius = math.sqrt(max(area_px2, 0.0) / (vertices / 2 * math.sin(2 * math.pi / vertices)))
    angles = 2 * math.pi * np.arange(vertices) / vertices
    ring = [[round(x_px + radius * math.cos(a), 2), round(y_px + radius * math.sin(a), 2)] for a in angles]
    ring.append(list(ring[0]))
    return ring


def _measurements(row: dict[str, Any], skip: frozenset[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in row.items():
        if name in skip or value is None or isinstance(value, str):
            continue
        number = float(value)
        # QuPath reads measurements as numbers; JSON has no NaN or infinity.
        if math.isfinite(number):
            out[name] = number
    return out


def geojson_features(gallery: Gallery) -> Iterator[dict[str, Any]]:
    """One QuPath detection feature per candidate, in candidate order (see the module docstring).

    Parameters
    ----------
    gallery
        An open gallery.

    Yields
    ------
    dict
        A GeoJSON ``Feature``.
    """
    from .qc import COLOURS

    stem = _stem(gallery.path)
    mpp = float(gallery.attrs["slide"]["mpp"])
    slide_path = str(gallery.attrs["slide"].get("path", stem))
    crop_centres = gallery.cells[["x_px", "y_px"]].to_numpy(float)
    skip = frozenset({"x_px", "y_px", "accepted", "reason", "cell_index"})
    for index, row in enumerate(gallery.candidates.to_dict("records")):
        reason = str(row.get("reason") or "")
        label = "accepted" if bool(row.get("accepted")) else (reason or "rejected")
        cell_index = int(row.get("cell_index", -1))
        measurements = _measurements(row, skip)
        if 0 <= cell_index < len(crop_centres):
            measurements["crop_x_px"] = float(crop_centres[cell_index, 0])
            measurements["crop_y_px"] = float(crop_centres[cell_index, 1])
        area_px2 = float(row["area_um2"]) / (mpp * mpp)
        name = f"{stem} cell {cell_index}" if cell_index >= 0 else f"{stem} candidate {index}"
        yield {
            "type": "Feature",
            # QuPath (0.4+) keeps a feature's UUID id as the object's ID. A fixed one per slide and
            # candidate names the same cell in every export; importing a file twice still adds the
            # objects again, but QuPath sees the repeated IDs and offers to renumber the new ones
            # (qupath-gui-fx InteractiveObjectImporter.promptToImportObjects).
            "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{slide_path}#{index}")),
            "geometry": {
                "type": "Polygon",
                "coordinates": [circle_polygon(float(row["x_px"]), float(row["y_px"]), area_px2)],
            },
            "properties": {
                "objectType": "detection",
                "name": name,
                "classification": {"name": label, "color": list(COLOURS.get(label, _GREY))},
                "measurements": measurements,
                "metadata": {
                    "slide": stem,
                    "candidate_index": str(index),
                    "cell_index": str(cell_index),
                    "reason": reason,
                },
            },
        }


def export_geojson(gallery: Gallery, path: Path, *, overwrite: bool = False) -> int:
    """Write every candidate of ``gallery`` as a GeoJSON FeatureCollection QuPath imports.

    Features are written one at a time, so memory does not grow with the number of candidates.

    Parameters
    ----------
    gallery
        An open gallery.
    path
        Output ``.geojson`` file.
    overwrite
        Replace an existing file.

    Returns
    -------
    int
        Number of features written.
    """
    _check_free([path], overwrite)
    count = 0
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            handle.write('{"type": "FeatureCollection", "features": [\n')
            for feature in geojson_features(gallery):
                handle.write((",\n" if count else "") + json.dumps(feature, allow_nan=False))
                count += 1
            handle.write("\n]}\n")
    except OSError as exc:
        raise GalleryError(f"cannot write {path}: {exc}") from exc
    return count
