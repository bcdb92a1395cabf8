"""Where work runs: a Dask cluster (local by default) or, with ``workers=0``, this process.

Stages hand the engine small picklable descriptions of work (paths, coordinates, parameters); tasks
read pixels themselves, so pixels never travel through the driver. Results come back in submission
order with a bounded number of tasks in flight, which keeps the driver's memory flat on any slide.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import ParameterError

T = TypeVar("T")
R = TypeVar("R")

#: Task retries after a lost worker (a killed process is retried on another worker).
TASK_RETRIES = 2


@contextmanager
def compute_client(workers: int, scheduler: str | None = None) -> Iterator[Any]:
    """A Dask client for ``workers`` local worker processes, or ``None`` for in-process execution.

    Parameters
    ----------
    workers
        Number of local worker processes (one thread each); 0 runs every task in this process
        without Dask (for debugging and small jobs).
    scheduler
        Address of an existing Dask scheduler (``tcp://host:port``) or a scheduler file; when given,
        ``workers`` is ignored and no local cluster is started.

    Yields
    ------
    distributed.Client or None
    """
    if scheduler is None and workers == 0:
        yield None
        return
    if workers < 0:
        raise ParameterError(f"--workers must be 0 or more, got {workers}")
    from distributed import Client, LocalCluster

    if scheduler is not None:
        if os.path.exists(scheduler):
            client = Client(scheduler_file=scheduler)
        else:
            client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def ordered_map(
    client: Any,
    fn: Callable[..., R],
    items: Iterable[T],
    *args: Any,
    window: int = 8,
) -> Iterator[R]:
    """Apply ``fn(item, *args)`` to every item, yielding results in the order of ``items``.

    At most ``window`` tasks are in flight, so results never pile up on the driver. With a Dask
    client, ``args`` are scattered once to every worker (not sent with each task) and lost workers'
    tasks are retried.
    """
    if client is None:
        for item in items:
            yield fn(item, *args)
        return
    # hash=False: a unique key per map, so releasing one map's copy cannot race with the next map
    # scattering the same object under the same content-hash key.
    shared = [client.scatter(a, broadcast=True, hash=False) if _worth_scattering(a) else a for a in args]
    pending: deque[Any] = deque()
    try:
        for item in items:
            pending.append(client.submit(fn, item, *shared, pure=False, retries=TASK_RETRIES))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # An abandoned or failed map must not leave tasks running on the cluster.
        for future in pending:
            future.cancel()


def _worth_scattering(value: Any) -> bool:
    return not isinstance(value, str | int | float | bool | type(None))


def default_workers() -> int:
    """Local worker processes to use by default: the machine's cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
