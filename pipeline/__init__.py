"""Metafer-style white-cell galleries from whole-slide blood-smear scans, and a simulator of such scans.

Command line: ``python -m pipeline run SLIDE ...`` and ``python -m pipeline simulate OUT.svs ...``
(see ``--help``). The same steps are plain functions here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from .errors import GalleryError, LockHeldError, MppError, ParameterError, PipelineError, SlideError

if TYPE_CHECKING:
    from .gallery import Gallery, open_gallery

__all__ = [
    "Gallery",
    "GalleryError",
    "LockHeldError",
    "MppError",
    "ParameterError",
    "PipelineError",
    "SlideError",
    "__version__",
    "open_gallery",
]

# Names served on first use: importing them here would pull in zarr, pandas and numpy (~0.5 s) for
# every ``import pipeline``, the command line's --help included.
_LAZY = {"Gallery": "gallery", "open_gallery": "gallery"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
