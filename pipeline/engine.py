"""Where work runs: a Dask cluster (local, existing, or SLURM jobs) or, with ``workers=0``, this process.

Stages hand the engine small picklable descriptions of work (paths, coordinates, parameters); tasks
read pixels themselves, so pixels never travel through the driver. Results come back in submission
order with a bounded number of tasks in flight, which keeps the driver's memory flat on any slide.

Three places to run, all behind :func:`compute_client`:

- a local cluster of single-threaded worker processes (the default);
- an existing Dask cluster, joined by address (``tcp://HOST:PORT``) or scheduler file;
- SLURM jobs started through dask-jobqueue (:class:`SlurmOptions`, mapped to ``SLURMCluster`` keyword
  arguments by :func:`slurm_cluster_kwargs`; whatever is not given comes from dask's configuration,
  ``jobqueue.slurm.*``).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ParameterError, PipelineError, interrupt_noted, raise_if_interrupted

T = TypeVar("T")
R = TypeVar("R")

#: Task retries after an exception in a task (e.g. a hiccup of a network file system). A worker that
#: dies is handled separately by the scheduler, which reruns its tasks on another worker.
TASK_RETRIES = 2
#: How long to wait for an existing cluster to have at least one worker before giving up, s.
WORKER_WAIT_S = 120.0
#: How often to say that SLURM jobs have not started yet, s.
SLURM_NOTICE_S = 120.0
#: How long to wait for an existing scheduler to answer, s.
CONNECT_TIMEOUT_S = 30.0
#: Task arguments of this size or more are sent to the cluster once, not with every task, bytes.
SHARED_ARG_BYTES = 1 << 20

_SLURM_INSTALL_HINT = "pip install 'bloodsmear-pipeline[slurm]' (or pip install dask-jobqueue)"
# SLURM time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes and days-hours:minutes:seconds.
_WALLTIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


# ------------------------------------------------------------------------------------------- SLURM
@dataclass(frozen=True)
class SlurmOptions:
    """Resources of the SLURM jobs that run Dask workers (``run --cluster slurm``).

    Every field left as ``None`` comes from dask's configuration (``jobqueue.slurm.*`` in
    ``~/.config/dask/jobqueue.yaml`` or ``DASK_JOBQUEUE__SLURM__*`` environment variables).

    Attributes
    ----------
    jobs
        SLURM jobs kept running; a job that ends (walltime) is replaced while the batch lasts.
    cores
        CPU cores per job (``--cpus-per-task``); each core runs one single-threaded worker process.
    memory
        Memory per job (``--mem``), e.g. ``"16GB"``; shared evenly by its worker processes.
    walltime
        Time limit per job (``-t``) in a SLURM format, e.g. ``"02:00:00"`` or ``"1-00:00:00"``.
    queue
        Partition (``-p``).
    account
        Account charged (``-A``).
    local_directory
        Node-local scratch folder for the workers' spill files, e.g. ``"$TMPDIR"`` or ``/scratch``.
    log_directory
        Where SLURM writes the jobs' stdout and stderr.
    start_timeout_s
        How long to wait for the first worker before giving up (a wrong partition or account, or an
        ``sbatch`` that fails, would otherwise keep the driver waiting until its own walltime).
    """

    jobs: int = 1
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    start_timeout_s: float = 4 * 3600.0


def walltime_seconds(walltime: str) -> int:
    """Seconds in a SLURM time limit.

    Parameters
    ----------
    walltime
        ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` or ``D-H:M:S`` (SLURM's ``--time`` formats).

    Returns
    -------
    int

    Raises
    ------
    ParameterError
        If ``walltime`` is in none of these formats.

    Examples
    --------
    >>> walltime_seconds("02:00:00"), walltime_seconds("90"), walltime_seconds("1-12")
    (7200, 5400, 129600)
    """
    match = _WALLTIME.match(walltime.strip())
    if match is None:
        raise ParameterError(
            f"--walltime {walltime!r} is not a SLURM time (e.g. 02:00:00, 1-00:00:00 or minutes)"
        )
    days, a, b, c = (None if v is None else int(v) for v in match.group("days", "a", "b", "c"))
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return a * 3600 + (b or 0) * 60 + c
    if b is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


def slurm_cluster_kwargs(
    options: SlurmOptions,
    config: Mapping[str, Any] | None = None,
    default_log_directory: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for ``options``.

    Options given win over dask's configuration; options left as ``None`` are not passed, so
    ``SLURMCluster`` takes them from ``jobqueue.slurm.*``. On top of that:

    - one single-threaded worker process per core (``processes = cores``), like the local cluster,
      unless the configuration sets ``processes``;
    - workers retire gracefully a few minutes before the job's walltime (``--lifetime``, staggered),
      so their tasks move to other workers instead of dying with the job, unless the configuration
      already passes ``--lifetime``;
    - the jobs' logs go to ``default_log_directory`` when neither the options nor the
      configuration name a log directory.

    Parameters
    ----------
    options
        What the user asked for.
    config
        The ``jobqueue.slurm`` section of dask's configuration (default: the current one).
    default_log_directory
        Fallback folder for the jobs' stdout and stderr.

    Returns
    -------
    dict

    Raises
    ------
    ParameterError
        If a value is invalid, or cores or memory are given neither as options nor in the configuration.
    """
    if config is None:
        import dask.config

        config = dask.config.get("jobqueue.slurm", default={}) or {}
    from dask.utils import parse_bytes

    if options.jobs < 1:
        raise ParameterError(f"--jobs must be 1 or more, got {options.jobs}")
    kwargs: dict[str, Any] = {}
    cores = options.cores if options.cores is not None else config.get("cores")
    if cores is None:
        raise ParameterError("--cluster slurm needs --cores (or jobqueue.slurm.cores in dask's config)")
    if int(cores) < 1:
        raise ParameterError(f"--cores must be 1 or more, got {cores}")
    if options.cores is not None:
        kwargs["cores"] = int(options.cores)
    if config.get("processes") is None:
        kwargs["processes"] = int(cores)
    memory = options.memory if options.memory is not None else config.get("memory")
    if memory is None:
        raise ParameterError(
            "--cluster slurm needs --memory per job, e.g. 16GB (or jobqueue.slurm.memory in dask's config)"
        )
    try:
        memory_bytes = parse_bytes(str(memory))
    except (ValueError, TypeError) as exc:
        raise ParameterError(f"--memory {memory!r} is not a size (e.g. 16GB, 4GiB)") from exc
    if memory_bytes <= 0:
        raise ParameterError(f"--memory must be positive, got {memory!r}")
    if options.memory is not None:
        kwargs["memory"] = options.memory
    walltime = options.walltime if options.walltime is not None else config.get("walltime")
    wall_s = walltime_seconds(str(walltime)) if walltime is not None else None
    if options.walltime is not None:
        kwargs["walltime"] = options.walltime
    for name in ("queue", "account", "local_directory"):
        value = getattr(options, name)
        if value is not None:
            if not str(value).strip():
                raise ParameterError(f"--{name.replace('_', '-')} must not be empty")
            kwargs[name] = str(value)
    if options.log_directory is not None:
        kwargs["log_directory"] = options.log_directory
    elif config.get("log-directory") is None and default_log_directory is not None:
        kwargs["log_directory"] = default_log_directory
    extra = list(config.get("worker-extra-args") or [])
    if wall_s is not None and not any(str(arg).startswith("--lifetime") for arg in extra):
        lifetime = _worker_lifetime(wall_s)
        if lifetime is not None:
            kwargs["worker_extra_args"] = [
                *extra,
                "--lifetime",
                f"{lifetime[0]}s",
                "--lifetime-stagger",
                f"{lifetime[1]}s",
            ]
    return kwargs


def _worker_lifetime(wall_s: int) -> tuple[int, int] | None:
    """Worker lifetime and stagger, s, that end every worker before the job's walltime."""
    # Leave a margin for a graceful retirement (tasks hand over, data moves); stagger so the jobs'
    # workers do not all leave at once. Short jobs (a debug partition's few minutes) keep half their
    # walltime as margin, so they still work half of it. A time limit of 0 is none at all in SLURM.
    if wall_s <= 0:
        return None
    if wall_s < 300:
        margin = wall_s // 2
    else:
        margin = int(min(600, max(60, wall_s // 10)))
    return wall_s - margin, margin // 2


def _slurm_cluster(options: SlurmOptions, default_log_directory: str | None) -> Any:
    # dask-jobqueue (0.9) sets SIGINT to sys.exit() when first imported: Ctrl-C of a SLURM run then ended
    # it with exit code 0 and no message, as if it had finished. The caller's handler is put back.
    sigint = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise PipelineError(f"--cluster slurm needs dask-jobqueue: {_SLURM_INSTALL_HINT}") from exc
    finally:
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    kwargs = slurm_cluster_kwargs(options, default_log_directory=default_log_directory)
    if kwargs.get("log_directory") is not None:
        # absolute: the jobs start in the submission folder, which need not be the driver's
        kwargs["log_directory"] = os.path.abspath(kwargs["log_directory"])
        os.makedirs(kwargs["log_directory"], exist_ok=True)
    try:
        return SLURMCluster(**kwargs)
    except ValueError as exc:  # dask-jobqueue's own checks of the configuration
        raise ParameterError(f"--cluster slurm: {exc}") from exc


# ------------------------------------------------------------------------------------------ client
@contextmanager
def compute_client(
    workers: int,
    scheduler: str | None = None,
    *,
    slurm: SlurmOptions | None = None,
    slurm_log_directory: str | None = None,
    say: Callable[[str], None] | None = None,
    preload: Sequence[str] = (),
) -> Iterator[Any]:
    """A Dask client, or ``None`` for in-process execution.

    Parameters
    ----------
    workers
        Number of local worker processes (one thread each); 0 runs every task in this process
        without Dask (for debugging and small jobs). Ignored with ``scheduler`` or ``slurm``.
    scheduler
        Address of an existing Dask scheduler (``tcp://host:port``) or its scheduler file; no
        cluster is started and the cluster is left running afterwards.
    slurm
        Start workers as SLURM jobs (needs dask-jobqueue); the jobs are cancelled afterwards.
    slurm_log_directory
        Where the SLURM jobs' logs go unless ``slurm`` or dask's configuration say otherwise.
    say
        Where to send one-line status messages (waiting for workers, dashboard address).
    preload
        Modules local workers import as they start, before their first task arrives (besides
        ``pipeline._local_worker``, which leaves Ctrl-C to the driver).

    Yields
    ------
    distributed.Client or None

    Raises
    ------
    ParameterError
        For invalid options (negative workers, both ``scheduler`` and ``slurm``, an unknown scheduler file).
    PipelineError
        If the scheduler cannot be reached, or has no workers within :data:`WORKER_WAIT_S`.
    """
    tell = say or (lambda _msg: None)
    if scheduler is not None and slurm is not None:
        raise ParameterError("--scheduler and --cluster slurm exclude each other: pick one")
    if scheduler is None and slurm is None and workers == 0:
        yield None
        return
    if workers < 0:
        raise ParameterError(f"--workers must be 0 or more, got {workers}")
    from distributed import Client, LocalCluster

    if scheduler is not None:
        client = _connect(scheduler)
        try:
            _wait_for_a_worker(client, scheduler, tell)
            _one_opencv_thread_per_worker(client)
            yield client
        finally:
            client.close()
        return
    if slurm is not None:
        cluster = _slurm_cluster(slurm, slurm_log_directory)
        client = None
        try:
            # adapt (not scale): jobs that end at their walltime are replaced while the batch runs.
            cluster.adapt(minimum_jobs=slurm.jobs, maximum_jobs=slurm.jobs)
            client = Client(cluster)
            _one_opencv_thread_per_worker(client)
            tell(
                f"submitted {slurm.jobs} SLURM job(s); waiting for the first worker "
                f"(dashboard: {cluster.dashboard_link})"
            )
            _wait_for_slurm_jobs(client, tell, slurm.start_timeout_s)
            yield client
        finally:
            if client is not None:
                client.close()
            cluster.close()  # cancels the jobs
        return
    import dask.config

    # Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in their workers, so that freed memory goes back to
    # the system at once; with the large short-lived arrays of image tasks, every allocation then
    # faults its pages in again (measured: 1.3 s of 10 s on a 3 x 3 mm slide, a quarter of the run).
    # The tasks' memory is bounded by the window of tasks in flight, not by fragmentation.
    environ = {
        k: v
        for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
        if k != "MALLOC_TRIM_THRESHOLD_"
    }
    local_config = {
        "distributed.nanny.pre-spawn-environ": environ,
        # Dask's statistical profiler samples every worker thread 100 times a second; nobody reads it
        # in a local run (measured: about 3 % of the workers' CPU).
        "distributed.worker.profile.enabled": False,
        # Every process checks 50 times a second whether its event loop is blocked, only to log a
        # warning: once a second is enough (measured on an idle 2-worker cluster: 0.07 -> 0.03 CPU-s
        # per second, driver and workers together).
        "distributed.admin.tick.interval": "1s",
    }
    with dask.config.set(local_config):
        cluster = LocalCluster(
            n_workers=0,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
            preload=["pipeline._local_worker", *preload],
        )
        # Not LocalCluster(n_workers=N), nor scale() before Client(), which both wait for every worker:
        # this way the workers start (and import the pipeline) while the driver plans the first slide,
        # and tasks wait for them (measured: 1.5 s less before the first slide starts).
        client = None
        failed = False
        try:
            client = Client(cluster)
            _one_opencv_thread_per_worker(client)
            cluster.scale(workers)
            yield client
        except BaseException:
            failed = True
            raise
        finally:
            # After a failure or Ctrl-C the cluster closes under workers that may still be starting;
            # Dask and Tornado log each of those as an error with a traceback, which would bury the
            # one-line message that matters.
            with _dask_logs_silenced(failed):
                if client is not None:
                    client.close()
                cluster.close()


def _one_opencv_thread_per_worker(client: Any) -> None:
    """Run OpenCV on one thread in every worker, present and future.

    A worker is one process on one core; OpenCV would otherwise start a thread per core of the machine
    in each of them, which only adds hand-offs between threads competing for the same cores (measured:
    +20 % CPU time of detection with 2 workers on 2 cores, ``benchmarks/bench_detect_tile.py``).
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class OneOpenCVThread(WorkerPlugin):
        name = "pipeline-one-opencv-thread"

        def setup(self, worker: Any) -> None:
            import cv2

            cv2.setNumThreads(1)

    client.register_plugin(OneOpenCVThread())


@contextmanager
def _dask_logs_silenced(silence: bool) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("distributed", "tornado", "tornado.application")]
    levels = [logger.level for logger in loggers]
    if silence:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        # After Ctrl-C the command is ending, and some of those errors are logged only after close()
        # returns: the logs stay quiet. Otherwise (a library caller's exception) they are restored.
        if not interrupt_noted():
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _connect(scheduler: str) -> Any:
    from distributed import Client

    is_address = "://" in scheduler or re.match(r"^[\w.\-\[\]:]+:\d+$", scheduler) is not None
    if not is_address and not os.path.isfile(scheduler):
        raise ParameterError(
            f"--scheduler {scheduler}: no such scheduler file, and not an address such as tcp://HOST:PORT"
        )
    try:
        if is_address:
            return Client(scheduler, timeout=CONNECT_TIMEOUT_S)
        return Client(scheduler_file=scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, KeyError) as exc:  # refused, unreachable, bad file
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PipelineError(
            f"cannot reach the Dask scheduler at {scheduler} ({reason}); is `dask scheduler` running?"
        ) from exc


def _wait_for_a_worker(client: Any, scheduler: str, tell: Callable[[str], None]) -> None:
    if scheduler_workers(client):
        return
    tell(f"waiting up to {WORKER_WAIT_S:.0f} s for a worker to join {scheduler}")
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError as exc:
        raise PipelineError(
            f"the Dask scheduler at {scheduler} has no workers (waited {WORKER_WAIT_S:.0f} s); "
            f"start some with `dask worker {scheduler}`"
        ) from exc


def _wait_for_slurm_jobs(client: Any, tell: Callable[[str], None], timeout_s: float) -> None:
    """Wait as long as the queue takes, up to ``timeout_s``, saying so now and then (a job that cannot
    start says why in its log, and dask-jobqueue logs sbatch errors)."""
    waited_s = 0.0
    while True:
        step_s = min(SLURM_NOTICE_S, max(timeout_s - waited_s, 0.0))
        try:
            client.wait_for_workers(1, timeout=step_s)
            return
        except TimeoutError:
            waited_s += step_s
            if waited_s >= timeout_s:
                raise PipelineError(
                    f"no SLURM job started a worker within {waited_s / 60:.0f} min; check `squeue --me`, "
                    "the job logs, and --queue/--account"
                ) from None
            tell(f"no worker after {waited_s:.0f} s: jobs still queued? check `squeue --me` and the job logs")


def scheduler_workers(client: Any) -> dict[str, Any]:
    """Every worker connected to ``client``'s scheduler, by address.

    ``Client.scheduler_info()`` lists at most 5 workers by default in distributed 2025.4-2026.6
    (dask/distributed#9045); asking for all of them needs ``n_workers=-1``, which older versions lack.
    """
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:
        info = client.scheduler_info()
    return dict(info.get("workers", {}))


def worker_count(client: Any) -> int:
    """Workers of ``client``'s cluster: connected ones, or more when a cluster has asked for more.

    Parameters
    ----------
    client
        A ``distributed.Client`` or ``None`` (in-process: 0).

    Returns
    -------
    int
    """
    if client is None:
        return 0
    connected = len(scheduler_workers(client))
    # A SLURM cluster's workers arrive as its jobs start; its plan already names them all.
    planned = len(getattr(getattr(client, "cluster", None), "plan", None) or ())
    return max(connected, planned)


# --------------------------------------------------------------------------------------------- map
def ordered_map(
    client: Any,
    fn: Callable[..., R],
    items: Iterable[T],
    *args: Any,
    window: int = 8,
) -> Iterator[R]:
    """Apply ``fn(item, *args)`` to every item, yielding results in the order of ``items``.

    At most ``window`` tasks are in flight, so results never pile up on the driver. With a Dask
    client, a task whose worker dies is run again on another worker, and a task that raises is
    retried :data:`TASK_RETRIES` times. Small ``args`` travel with every task; large ones
    (:data:`SHARED_ARG_BYTES` or more) are sent once, as a task of their own.
    """
    if client is None:
        for item in items:
            raise_if_interrupted()  # a slide thread of an interrupted batch stops here
            yield fn(item, *args)
        return
    for result, _ in _in_order(client, fn, items, args, window, hold=False):
        yield result


def ordered_map_holding(
    client: Any,
    fn: Callable[..., tuple[R, Any]],
    items: Iterable[T],
    *args: Any,
    window: int = 8,
) -> Iterator[tuple[R, Any]]:
    """:func:`ordered_map` for a ``fn`` returning ``(result, held)``, where ``held`` stays on the cluster.

    ``result`` comes back to the driver, in the order of ``items``. ``held`` (an array of pixels, say)
    stays in the worker that computed it; the driver gets a handle, and :func:`held_rows` cuts rows of
    it for the arguments of later tasks (:class:`TaskQueue`). It is freed once the driver drops every
    handle and cut, and recomputed if its worker dies before that. Without a client, the handle is
    ``held`` itself.
    """
    if client is None:
        yield from ordered_map(None, fn, items, *args)
        return
    yield from _in_order(client, fn, items, args, window, hold=True)


def _in_order(
    client: Any, fn: Callable[..., Any], items: Iterable[T], args: tuple[Any, ...], window: int, hold: bool
) -> Iterator[tuple[Any, Any]]:
    """``(result, handle)`` of ``fn(item, *args)`` on the cluster, in order, ``window`` in flight; the
    handle (``hold``) is the task's own future, whose value is ``(result, held)``."""
    # Not client.scatter: scattered data whose worker dies is lost for good (the scheduler cannot
    # recompute it) and its dependents are cancelled; the active memory manager also drops the extra
    # replicas of broadcast data within seconds. A task returning the value is recomputed instead.
    shared = [
        client.submit(_identity, a, pure=False, retries=TASK_RETRIES) if _is_large(a) else a for a in args
    ]
    pending: deque[tuple[Any, Any]] = deque()
    name = getattr(fn, "__name__", "task")
    try:
        for item in items:
            key = f"{name}-{uuid.uuid4().hex}"  # the dashboard shows the stage, not the wrapper
            task = client.submit(_guarded, fn, item, *shared, key=key, pure=False, retries=TASK_RETRIES)
            # A held value's handle is the task's own future: a task more per item to split the value
            # would cost the scheduler as much as a small task's work.
            if hold:
                result = client.submit(_first, task, key=f"{key}-result", pure=False, retries=TASK_RETRIES)
                pending.append((result, task))
            else:
                pending.append((task, None))
            if len(pending) >= window:
                result, handle = pending.popleft()
                yield _unwrap(result.result()), handle
        while pending:
            result, handle = pending.popleft()
            yield _unwrap(result.result()), handle
    finally:
        # An abandoned or failed map must not leave tasks running on the cluster.
        for result, handle in pending:
            result.cancel()
            if handle is not None:
                handle.cancel()


def held_rows(client: Any, held: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of an array held by :func:`ordered_map_holding`, held where it is.

    Pass the result in a later task's arguments: Dask hands the task the rows, and moves only them, not
    the whole array, if the task runs on another worker. The cut runs before tasks submitted without a
    priority, so that the tasks waiting for it are not held up behind them.
    """
    if client is None:
        return held[start:stop]
    return client.submit(_rows, held, start, stop, pure=False, retries=TASK_RETRIES, priority=1)


def _rows(both: tuple[Any, Any], start: int, stop: int) -> Any:
    return both[1][start:stop]


def _first(both: tuple[Any, Any] | _Raised) -> Any:
    return both if isinstance(both, _Raised) else both[0]


class TaskQueue:
    """Tasks submitted one by one, at most ``window`` in flight; their results in submission order.

    Arguments may hold handles from :func:`ordered_map_holding`. Without a client, each task runs at
    once, in this process. Use as a context manager: leaving it early cancels what is still queued.
    The tasks run before any task submitted without a priority (Dask runs higher ``priority`` first):
    they free what the held results keep in memory.
    """

    def __init__(self, client: Any, window: int = 8, priority: int = 1) -> None:
        self._client = client
        self._window = window
        self._priority = priority
        self._pending: deque[Any] = deque()
        self._results: list[Any] = []

    def __enter__(self) -> TaskQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()

    def submit(self, fn: Callable[..., R], item: Any, *args: Any) -> None:
        """Run ``fn(item, *args)``; waits for the oldest task while ``window`` are in flight."""
        if self._client is None:
            raise_if_interrupted()
            self._results.append(fn(item, *args))
            return
        key = f"{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex}"
        self._pending.append(
            self._client.submit(
                _guarded, fn, item, *args, key=key, pure=False, retries=TASK_RETRIES, priority=self._priority
            )
        )
        while len(self._pending) > self._window:
            self._results.append(_unwrap(self._pending.popleft().result()))

    def results(self) -> list[Any]:
        """Wait for every task; their results in submission order."""
        while self._pending:
            self._results.append(_unwrap(self._pending[0].result()))
            self._pending.popleft()
        return self._results


def _identity(value: T) -> T:
    return value


@dataclass(frozen=True)
class _Raised:
    """A task's own error (a corrupt tile, a bad parameter), carried back as a result."""

    error: PipelineError


def _guarded(fn: Callable[..., R], item: Any, *args: Any) -> R | _Raised:
    # The pipeline's own errors are deterministic: retrying them would only repeat the work (three
    # decodes of a corrupt tile) before the slide fails. Other exceptions propagate and are retried.
    try:
        return fn(item, *args)
    except PipelineError as exc:
        return _Raised(exc)


def _unwrap(result: Any) -> Any:
    if isinstance(result, _Raised):
        raise result.error
    return result


def _is_large(value: Any) -> bool:
    if isinstance(value, str | int | float | bool | type(None)):
        return False
    # The pickled size (once per map): dask's sizeof does not look inside dataclasses.
    try:
        return len(pickle.dumps(value, protocol=5)) >= SHARED_ARG_BYTES
    except Exception:  # not picklable by pickle: let Dask's own serialisation decide or complain
        return False


def default_workers() -> int:
    """Local worker processes to use by default: the machine's cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
