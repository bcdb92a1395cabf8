"""What an output folder holds: its batch record and its galleries, keyed by slide stem.

The review app serves slides and galleries only through this catalogue: a browser names a slide by its
stem, never by a path, and the slide file is the one the gallery's attributes name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GalleryError
from ..gallery import Gallery, open_gallery

__all__ = ["Catalog", "SlideEntry"]

_GALLERY_SUFFIX = ".zarr"


@dataclass
class SlideEntry:
    """One slide of the output folder: its batch-record row and, when finished, its gallery."""

    stem: str
    status: str
    cells: int = 0
    candidates: int = 0
    seconds: float | None = None
    error: str = ""
    slide: str = ""
    gallery_path: Path | None = None
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    padded: int = 0
    pictures: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The row as the batch page shows it."""
        return {
            "stem": self.stem,
            "status": self.status,
            "cells": self.cells,
            "candidates": self.candidates,
            "seconds": self.seconds,
            "error": self.error,
            "slide": self.slide,
            "has_gallery": self.gallery_path is not None,
            "rejected_by_reason": self.rejected_by_reason,
            "padded": self.padded,
            "pictures": self.pictures,
        }


class Catalog:
    """The slides and galleries of one output folder, re-read when the folder changes.

    Parameters
    ----------
    out_dir
        The folder ``run --out`` wrote.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir).resolve()
        if not self.out_dir.is_dir():
            raise GalleryError(f"{out_dir} is not a folder; pass the folder `run --out` wrote")
        self._galleries: dict[str, Gallery] = {}

    def entries(self) -> list[SlideEntry]:
        """Every slide of the batch record and every finished gallery in the folder, by stem."""
        rows: dict[str, SlideEntry] = {}
        for row in self._batch_rows():
            stem = Path(str(row.get("slide", ""))).stem
            if stem:
                rows[stem] = SlideEntry(
                    stem=stem,
                    status=str(row.get("status", "")),
                    cells=int(row.get("cells") or 0),
                    candidates=int(row.get("candidates") or 0),
                    seconds=row.get("seconds"),
                    error=str(row.get("error") or ""),
                    slide=str(row.get("slide", "")),
                )
        for path in sorted(self.out_dir.glob(f"*{_GALLERY_SUFFIX}")):
            stem = path.name[: -len(_GALLERY_SUFFIX)]
            if not path.is_dir() or stem.startswith("."):
                continue
            entry = rows.setdefault(stem, SlideEntry(stem=stem, status="done"))
            try:
                gallery = self.gallery(stem)
            except GalleryError as exc:
                entry.error = entry.error or str(exc)
                continue
            counts = gallery.attrs.get("counts") or {}
            entry.gallery_path = gallery.path
            entry.cells = len(gallery)
            entry.candidates = len(gallery.candidates)
            entry.rejected_by_reason = dict(counts.get("rejected_by_reason") or {})
            entry.padded = int(counts.get("padded") or 0)
            entry.slide = entry.slide or str((gallery.attrs.get("slide") or {}).get("path", ""))
            if entry.seconds is None:
                entry.seconds = (gallery.attrs.get("timings_s") or {}).get("total_before_finalize")
        for stem, entry in rows.items():
            entry.pictures = [name for name in self.pictures() if name.startswith(f"{stem}.")]
        return sorted(rows.values(), key=lambda entry: entry.stem)

    def gallery(self, stem: str) -> Gallery:
        """The finished gallery ``OUT/<stem>.zarr`` (opened once, re-opened if it was re-run).

        Raises
        ------
        GalleryError
            If ``stem`` names no finished gallery of this folder.
        """
        path = self.out_dir / f"{stem}{_GALLERY_SUFFIX}"
        if "/" in stem or "\\" in stem or stem.startswith(".") or not path.is_dir():
            raise GalleryError(f"no gallery {stem!r} in {self.out_dir}")
        cached = self._galleries.get(stem)
        if cached is not None and _created(path) == cached.attrs.get("created_utc"):
            return cached
        gallery = open_gallery(path)
        self._galleries[stem] = gallery
        return gallery

    def slide(self, stem: str) -> tuple[Path, float | None]:
        """The slide file the gallery ``stem`` was cut from, as its attributes name it, and the pixel
        size (um/px) the run used (None if the gallery does not say).

        Raises
        ------
        GalleryError
            If the gallery names no slide, or the file is not there any more.
        """
        gallery = self.gallery(stem)
        slide = gallery.attrs.get("slide") or {}
        named = str(slide.get("path") or "")
        if not named:
            raise GalleryError(f"gallery {stem} names no slide file")
        path = Path(named)
        if not path.is_absolute():  # written relative to where run was started: try there, then OUT's parent
            candidates = [Path.cwd() / path, self.out_dir.parent / path]
            path = next((p for p in candidates if p.is_file()), candidates[0])
        if not path.is_file():
            raise GalleryError(
                f"slide {named} of gallery {stem} is not there any more; move it back to view it"
            )
        return path, float(slide.get("mpp") or 0) or None

    def pictures(self) -> list[str]:
        """The QC pictures (``<stem>.overview.png``, ``<stem>.contact.png``) directly in the folder."""
        return sorted(
            p.name for p in self.out_dir.glob("*.png") if p.is_file() and not p.name.startswith(".")
        )

    def _batch_rows(self) -> list[dict[str, Any]]:
        path = self.out_dir / "batch.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return [row for row in record.get("slides", []) if isinstance(row, dict)]
        except (OSError, ValueError, AttributeError):
            return []  # no batch record (galleries copied here by hand): the galleries alone


def _created(path: Path) -> Any:
    try:
        return json.loads((path / "zarr.json").read_text(encoding="utf-8"))["attributes"]["created_utc"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
