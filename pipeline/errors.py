"""The project's exception hierarchy.

Every error a user can cause (a bad file, a bad option, an unwritable output) is a
:class:`PipelineError`; the CLI prints its message on one line and exits non-zero, and only shows a
traceback with ``--debug``.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error the pipeline reports to users as a one-line message."""


class SlideError(PipelineError):
    """A slide cannot be opened or read (missing, not a slide, truncated, undecodable)."""


class MppError(SlideError):
    """The slide's pixel size is missing or implausible; pass ``--mpp`` to set it."""


class GalleryError(PipelineError):
    """A gallery cannot be written or read."""


class ParameterError(PipelineError, ValueError):
    """A parameter is out of its valid range."""
