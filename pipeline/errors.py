"""The project's exception hierarchy.

Every error a user can cause (a bad file, a bad option, an unwritable output) is a
:class:`PipelineError`; the CLI prints its message on one line and exits non-zero, and only shows a
traceback with ``--debug``.
"""

from __future__ import annotations

import threading

# Set by the CLI's signal handlers. Ctrl-C raises KeyboardInterrupt wherever Python is, and some callees
# turn it into their own error (ctypes, used by OpenSlide, raises ``ArgumentError: argument 1:
# KeyboardInterrupt``), which would then be reported as a failed slide instead of an interrupted run.
_INTERRUPTED = threading.Event()


class PipelineError(Exception):
    """Base class of every error the pipeline reports to users as a one-line message."""


class SlideError(PipelineError):
    """A slide cannot be opened or read (missing, not a slide, truncated, undecodable)."""


class MppError(SlideError):
    """The slide's pixel size is missing or implausible; pass ``--mpp`` to set it."""


class GalleryError(PipelineError):
    """A gallery cannot be written or read."""


class LockHeldError(GalleryError):
    """Another live run holds the gallery's lock (``OUT/.<stem>.zarr.lock``): wait, or run elsewhere.

    Nothing is wrong with the gallery or the folder; callers that can wait (the batch record) retry on
    this error alone, and report every other :class:`GalleryError` at once.
    """


class ParameterError(PipelineError, ValueError):
    """A parameter is out of its valid range."""


def note_interrupt() -> None:
    """Record that the user interrupted the run (Ctrl-C, SIGTERM, SIGHUP)."""
    _INTERRUPTED.set()


def interrupt_noted() -> bool:
    """Whether :func:`note_interrupt` was called (since the last :func:`clear_interrupt`)."""
    return _INTERRUPTED.is_set()


def clear_interrupt() -> None:
    """Forget an earlier interrupt (at the start of a command)."""
    _INTERRUPTED.clear()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if the run was interrupted, even if the interrupt was swallowed.

    Called before a gallery is marked complete: an interrupt that some callee turned into a caught error
    (or that arrived in a finalizer, where Python drops it) must still stop the run there.
    """
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt("interrupted")


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, the user interrupting the run.

    True for a :class:`KeyboardInterrupt` anywhere in the exception's cause/context chain, and for any
    exception raised after :func:`note_interrupt`: an error that follows Ctrl-C is its consequence.
    """
    if _INTERRUPTED.is_set():
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
