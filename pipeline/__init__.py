"""Metafer-style white-cell galleries from whole-slide blood-smear scans, and a simulator of such scans.

Command line: ``python -m pipeline run SLIDE ...`` and ``python -m pipeline simulate OUT.svs ...``
(see ``--help``). The same steps are plain functions here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import GalleryError, MppError, ParameterError, PipelineError, SlideError

__all__ = [
    "GalleryError",
    "MppError",
    "ParameterError",
    "PipelineError",
    "SlideError",
    "__version__",
]
