"""Files that appear whole or not at all: written under a private temporary name, then renamed."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` in one rename.

    The temporary name is hidden and unique to this call (pid and a random part), so two processes, even
    on two hosts sharing a file system, writing the same file never write into each other's. On an
    exception the temporary file is removed and ``path`` is left as it was.

    Parameters
    ----------
    path
        The file to write.

    Yields
    ------
    pathlib.Path
        Where to write the content.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
