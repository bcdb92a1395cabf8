"""Cell labels per annotator, beside a gallery: ``OUT/<stem>.labels/<annotator>.json``.

Labels live beside the gallery, not inside it: a finished gallery is never written to, and a re-run
with ``--overwrite`` swaps the whole ``.zarr`` directory, which would take labels stored inside with it.
Each annotator has a file of their own; every change is a read-modify-write of that file under a lock
file (``.<annotator>.json.lock``, :mod:`filelock`), and the new content is written under a temporary
name and renamed into place, so a reader never sees half a file and two writers (two browser tabs, two
app processes, two people) never lose each other's labels.

File format ``bloodsmear-labels`` version 1 (JSON)::

    {"format": "bloodsmear-labels", "format_version": 1, "annotator": "anna",
     "gallery": {"name": "slide1.zarr", "created_utc": "...", "n_cells": 412},
     "labels": {"17": {"label": "myeloblast", "x_px": 10233.5, "y_px": 4410.0, "time_utc": "..."}}}

Keys of ``labels`` are gallery rows (``images[i]``, ``cells/`` row i). ``gallery`` names the gallery the
rows belong to: a gallery re-run since (another ``created_utc``) may hold other cells in those rows, so
its old labels are refused rather than silently attached to the wrong cells.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock, Timeout

from .._files import atomic_path
from ..errors import GalleryError, ParameterError
from ..simulate.cells import MLL23_CLASSES

__all__ = [
    "LABELS",
    "LABELS_FORMAT",
    "LABEL_KEYS",
    "NOT_A_CELL",
    "UNSURE",
    "LabelStore",
    "check_annotator",
    "labels_dir",
]

LABELS_FORMAT = "bloodsmear-labels"
LABELS_FORMAT_VERSION = 1
NOT_A_CELL = "not_a_cell"
UNSURE = "unsure"
#: Every label a cell can get: the 18 MLL23 classes, then "not a cell" and "unsure".
LABELS: tuple[str, ...] = (*MLL23_CLASSES, NOT_A_CELL, UNSURE)
#: Keyboard shortcut of each label in the review app (mnemonic where the name allows).
LABEL_KEYS: dict[str, str] = {
    "typical_lymphocyte": "l",
    "plasma_cell": "p",
    "large_granular_lymphocyte": "g",
    "reactive_lymphocyte": "r",
    "hairy_cell": "h",
    "neoplastic_lymphocyte": "n",
    "smudge_cell": "x",
    "band_neutrophil": "b",
    "segmented_neutrophil": "s",
    "eosinophil": "e",
    "basophil": "a",
    "monocyte": "o",
    "myeloblast": "m",
    "metamyelocyte": "t",
    "promyelocyte": "y",
    "myelocyte": "c",
    "atypical_promyelocyte": "u",
    "normoblast": "q",
    NOT_A_CELL: "0",
    UNSURE: "/",
}
_ANNOTATOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LOCK_TIMEOUT_S = 30.0


def labels_dir(gallery_path: str | os.PathLike[str]) -> Path:
    """Folder holding the label files of the gallery at ``gallery_path``.

    Examples
    --------
    >>> labels_dir("OUT/slide1.zarr").as_posix()
    'OUT/slide1.labels'
    """
    path = Path(gallery_path)
    stem = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.name
    return path.with_name(f"{stem}.labels")


def check_annotator(name: str) -> str:
    """Return ``name`` if it can name an annotator (and their file); else raise.

    Parameters
    ----------
    name
        1-64 letters, digits, ``_``, ``.`` or ``-``, starting with a letter or digit.

    Raises
    ------
    ParameterError
        For anything else (spaces, slashes, ``..``, empty).
    """
    if not isinstance(name, str) or not _ANNOTATOR.match(name) or ".." in name:
        raise ParameterError(
            f"annotator name {name!r} is not allowed; use 1-64 letters, digits, '_', '.' or '-' "
            "(e.g. 'anna' or 'dr.lee')"
        )
    return name


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class LabelStore:
    """The labels of one gallery, one file per annotator.

    Parameters
    ----------
    gallery_path
        The gallery, ``OUT/<stem>.zarr``.
    gallery_attrs
        Its root attributes (``open_gallery(...).attrs``); ``created_utc`` and ``n_cells`` tie the
        labels to this version of the gallery.

    Examples
    --------
    >>> g = open_gallery("OUT/slide1.zarr")  # doctest: +SKIP
    >>> store = LabelStore(g.path, g.attrs)  # doctest: +SKIP
    >>> store.set("anna", 3, "myeloblast", x_px=g.cells.x_px[3], y_px=g.cells.y_px[3])  # doctest: +SKIP
    >>> store.read("anna")  # doctest: +SKIP
    {3: 'myeloblast'}
    """

    def __init__(self, gallery_path: str | os.PathLike[str], gallery_attrs: Mapping[str, Any]) -> None:
        self.gallery_path = Path(gallery_path)
        self.folder = labels_dir(self.gallery_path)
        self.n_cells = int(gallery_attrs.get("n_cells") or 0)
        self.identity = {
            "name": self.gallery_path.name,
            "created_utc": gallery_attrs.get("created_utc"),
            "n_cells": self.n_cells,
        }

    def path(self, annotator: str) -> Path:
        """The label file of ``annotator``."""
        return self.folder / f"{check_annotator(annotator)}.json"

    def annotators(self) -> list[str]:
        """Annotators who have a label file for this gallery, sorted."""
        if not self.folder.is_dir():
            return []
        names = (p.stem for p in self.folder.glob("*.json") if not p.name.startswith("."))
        return sorted(name for name in names if _ANNOTATOR.match(name))

    def read(self, annotator: str) -> dict[int, str]:
        """``{cell row: label}`` of one annotator (empty if they have labelled nothing).

        Raises
        ------
        GalleryError
            If the file is not a label file, or belongs to another version of the gallery.
        """
        return {row: entry["label"] for row, entry in self._load(self.path(annotator))["labels"].items()}

    def set(
        self,
        annotator: str,
        cell_index: int,
        label: str | None,
        *,
        x_px: float | None = None,
        y_px: float | None = None,
    ) -> dict[int, str]:
        """Give cell ``cell_index`` the label ``label`` (``None`` removes its label); returns all labels.

        Parameters
        ----------
        annotator
            Who labels (see :func:`check_annotator`).
        cell_index
            Gallery row, 0 <= cell_index < N.
        label
            One of :data:`LABELS`, or ``None`` to undo.
        x_px, y_px
            The cell's level-0 centre, kept beside the label so that it can be traced without the row.

        Returns
        -------
        dict of int to str
            The annotator's labels after the change.

        Raises
        ------
        ParameterError
            For an unknown label, a row out of range or a bad annotator name.
        GalleryError
            If the label file cannot be locked or written, or belongs to another version of the gallery.
        """
        path = self.path(annotator)
        if label is not None and label not in LABELS:
            raise ParameterError(f"unknown label {label!r}; valid labels: {', '.join(LABELS)}")
        if not 0 <= int(cell_index) < self.n_cells:
            raise ParameterError(f"cell {cell_index} out of range for a gallery of {self.n_cells} cells")
        try:
            self.folder.mkdir(exist_ok=True)
            with FileLock(path.with_name(f".{path.name}.lock"), timeout=_LOCK_TIMEOUT_S):
                content = self._load(path)
                entries: dict[int, dict[str, Any]] = content["labels"]
                if label is None:
                    entries.pop(int(cell_index), None)
                else:
                    entries[int(cell_index)] = {
                        "label": label,
                        "x_px": None if x_px is None else float(x_px),
                        "y_px": None if y_px is None else float(y_px),
                        "time_utc": _utc_now(),
                    }
                self._save(path, annotator, entries)
        except Timeout as exc:
            raise GalleryError(
                f"{path} stayed locked for {_LOCK_TIMEOUT_S:.0f} s; another process is stuck writing it"
            ) from exc
        except OSError as exc:
            raise GalleryError(f"cannot write labels {path}: {exc}; check the folder's permissions") from exc
        return {row: entry["label"] for row, entry in entries.items()}

    def table(self) -> pd.DataFrame:
        """Every label of every annotator: one row per cell, one column per annotator (None: unlabelled)."""
        columns = {name: self.read(name) for name in self.annotators()}
        frame = pd.DataFrame(index=pd.RangeIndex(self.n_cells, name="cell_index"))
        for name, labels in columns.items():
            values: list[str | None] = [None] * self.n_cells
            for row, label in labels.items():
                if row < self.n_cells:
                    values[row] = label
            frame[name] = pd.Series(values, index=frame.index, dtype=object)
        return frame

    def _load(self, path: Path) -> dict[str, Any]:
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"labels": {}}
        except OSError as exc:
            raise GalleryError(f"cannot read labels {path}: {exc}") from exc
        try:
            content = json.loads(raw)
            if (
                content.get("format") != LABELS_FORMAT
                or content.get("format_version") != LABELS_FORMAT_VERSION
            ):
                raise ValueError("not a label file")
            labels = {int(row): dict(entry) for row, entry in content["labels"].items()}
            if any(entry.get("label") not in LABELS for entry in labels.values()):
                raise ValueError("unknown label")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise GalleryError(
                f"{path} is not a {LABELS_FORMAT} v{LABELS_FORMAT_VERSION} file ({exc}); move it aside"
            ) from exc
        stored = content.get("gallery") or {}
        if stored.get("created_utc") != self.identity["created_utc"]:
            raise GalleryError(
                f"{path} holds labels of another run of {self.gallery_path.name} (created "
                f"{stored.get('created_utc')}, the gallery now {self.identity['created_utc']}); its rows may "
                "be other cells now: move the file aside to label again, or restore that gallery"
            )
        return {"labels": labels}

    def _save(self, path: Path, annotator: str, entries: Mapping[int, Mapping[str, Any]]) -> None:
        content = {
            "format": LABELS_FORMAT,
            "format_version": LABELS_FORMAT_VERSION,
            "annotator": annotator,
            "gallery": self.identity,
            "labels": {str(row): dict(entries[row]) for row in sorted(entries)},
        }
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(content, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
