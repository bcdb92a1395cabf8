"""Per-process cache of open slides for Dask tasks, which carry a :class:`SlideRef`, not a handle."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from .handle import Slide, SlideRef, open_slide

_CACHE_MAX_HANDLES = 4


_cache: OrderedDict[SlideRef, Slide] = OrderedDict()
_cache_lock = threading.Lock()
_cache_pid = os.getpid()


def cached_slide(ref: SlideRef) -> Slide:
    """The open :class:`Slide` for ``ref`` in this process, opening it on first use.

    Keeps at most a few handles (least recently used dropped first). A handle that was closed or
    raised during a read is dropped and the file reopened, because OpenSlide handles stay broken after
    an error. Dropped handles are not closed here, since another thread may still be reading: they
    close when garbage-collected. Do not use the result as a context manager (that closes it for
    every other user in the process).

    Parameters
    ----------
    ref : SlideRef

    Returns
    -------
    Slide
    """
    global _cache_pid
    with _cache_lock:
        if os.getpid() != _cache_pid:  # forked child: the parent's handles are not ours
            _cache.clear()
            _cache_pid = os.getpid()
        slide = _cache.get(ref)
        if slide is not None and slide.usable:
            _cache.move_to_end(ref)
            return slide
        _cache.pop(ref, None)
        slide = open_slide(ref.path, ref.mpp_override)
        _cache[ref] = slide
        while len(_cache) > _CACHE_MAX_HANDLES:
            _cache.popitem(last=False)
        return slide
