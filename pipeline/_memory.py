"""Keep the memory of freed tile-sized arrays in the process instead of handing it back to the system.

Detecting one overview tile allocates and frees some tens of MB of arrays (1228 x 1228 px: a few MB
each). By default glibc serves such blocks with ``mmap`` and unmaps them on free, or trims the heap
(Dask's nanny even asks for trimming above 64 kB), so every tile touches fresh pages: measured, 3,000-5,000
page faults and 8-11 ms of kernel time a tile, a third of the CPU time of detection. Serving blocks
of up to 32 MB from the heap and keeping up to :data:`RETAIN_BYTES` of free heap lets the next tile
reuse the same pages. Peak memory does not grow (what is kept was in use a moment before); the
process's resident size simply stays near its peak between tiles.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: Free heap kept in the process (bytes): more than one tile's arrays at 1 um/px.
RETAIN_BYTES = 256 * 1024 * 1024
#: Blocks up to this size come from the heap (glibc's largest allowed mmap threshold on 64-bit).
HEAP_BLOCK_BYTES = 32 * 1024 * 1024

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def retain_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed tile-sized blocks for reuse (once per process).

    Returns
    -------
    bool
        Whether the setting applies (glibc on Linux); elsewhere nothing changes.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    heap_blocks = mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)
    kept = mallopt(_M_TRIM_THRESHOLD, RETAIN_BYTES)
    _done = bool(heap_blocks and kept)
    return _done
