"""Set-up of the worker processes of the local Dask cluster (loaded by Dask as a worker preload)."""

from __future__ import annotations

import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    """Leave Ctrl-C to the driver.

    A terminal sends Ctrl-C to its whole foreground process group, local workers included. The driver
    handles it: it deletes the unfinished draft and closes the cluster, which stops the workers. A worker
    that stopped on its own would print Dask's shutdown tracebacks over the driver's one-line message.
    """
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the worker process's main thread: nothing to change there
        pass
