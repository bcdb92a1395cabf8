"""Helpers every reader shares: short error reasons, quiet tifffile probing, the reader protocol."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np

_MAX_REASON_CHARS = 90


def _reason(exc: BaseException) -> str:
    """One short line describing ``exc`` for embedding in a user-facing message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


class _Unsupported(Exception):
    """A TIFF page layout the segment reader does not handle (internal; becomes a fallback)."""


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's warnings about broken IFDs while we probe a file; we report our own."""
    logger = logging.getLogger("tifffile")

    def drop(_record: logging.LogRecord) -> bool:
        return False

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class _Reader(Protocol):
    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray: ...

    def close(self) -> None: ...
