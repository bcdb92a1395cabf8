"""One writer per gallery: an exclusive lock file next to the gallery, with stale-lock recovery.

Two runs that write the same ``OUT/<stem>.zarr`` at once would delete each other's draft
(:func:`~pipeline.gallery.create_gallery` removes leftovers of crashed runs) and could publish a mix of
both. :func:`gallery_lock` therefore holds ``OUT/.<stem>.zarr.lock`` for the whole run of a slide.

The lock is a file created with ``O_CREAT | O_EXCL``, which is atomic on local file systems and on
NFS v3+ (unlike ``flock``, which some cluster file systems do not implement). It holds JSON naming the
holder: host, pid, the process's start time (so a recycled pid is not mistaken for the holder), when
the lock was taken, and a random token. A run that finds the lock refuses with a message naming the
holder, unless the holder is provably gone: same host and the pid is dead (or is another process now),
or, from any host, the lock's lease has run out. The holder refreshes the lock file's modification time
every :data:`LEASE_REFRESH_S`; a lock not refreshed for :data:`LEASE_STALE_S` belongs to a run that was
killed without cleaning up (SIGKILL, a node lost, a SLURM job at its walltime), even on another host
whose processes cannot be checked from here. Such a stale lock is broken under a short-lived second lock
(``.lock.break``), after checking that the stale content is still there, so two runs that find the
same stale lock cannot both take over.

Examples
--------
>>> with gallery_lock("OUT/slide1.zarr"):  # doctest: +SKIP
...     ...  # create, write and finalize the gallery
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import GalleryError, LockHeldError

__all__ = ["LockInfo", "gallery_lock", "lock_path_for", "read_lock"]

_LOCK_SUFFIX = ".lock"
_BREAK_SUFFIX = ".break"
# A lock file without readable content is a run caught between creating and writing it (microseconds);
# after this long its creator must have died in between.
_UNWRITTEN_STALE_S = 30.0
# The break lock is held only while one stale lock file is re-read and deleted.
_BREAK_STALE_S = 30.0
_BREAK_WAIT_S = 2.0
_ATTEMPTS = 4
#: The holder touches its lock file this often, s.
LEASE_REFRESH_S = 60.0
#: A lock file untouched for this long is stale whoever holds it, s: many refresh periods, and more
#: than the clock skew between hosts sharing a file system.
LEASE_STALE_S = 15 * 60.0


@dataclass(frozen=True)
class LockInfo:
    """Who holds a gallery lock (the lock file's content).

    Attributes
    ----------
    host : str
        Host name of the holder.
    pid : int
        Process id of the holder on ``host``.
    pid_start : str or None
        The holder's start time as the kernel reports it (Linux), to tell a recycled pid apart.
    started_utc : str
        When the lock was taken (ISO 8601, UTC).
    token : str
        Random; only the holder that wrote it removes the lock.
    """

    host: str
    pid: int
    pid_start: str | None
    started_utc: str
    token: str

    def describe(self) -> str:
        """``pid N on HOST since TIME`` (``this process`` when it is us)."""
        who = "this process" if self._is_this_process() else f"pid {self.pid} on {self.host}"
        return f"{who}, since {self.started_utc}"

    def _is_this_process(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()


def lock_path_for(final_path: str | os.PathLike[str]) -> Path:
    """The lock file that guards the gallery at ``final_path``.

    Examples
    --------
    >>> lock_path_for("OUT/slide1.zarr").as_posix()
    'OUT/.slide1.zarr.lock'
    """
    final = Path(final_path)
    return final.with_name(f".{final.name}{_LOCK_SUFFIX}")


def read_lock(lock_path: str | os.PathLike[str]) -> LockInfo | None:
    """The holder recorded in a lock file, or None if it is missing or not (yet) readable."""
    try:
        raw = Path(lock_path).read_bytes()
    except OSError:
        return None
    return _parse(raw)


@contextlib.contextmanager
def gallery_lock(final_path: str | os.PathLike[str]) -> Iterator[LockInfo]:
    """Hold the lock of the gallery at ``final_path`` for the duration of the ``with`` block.

    Parameters
    ----------
    final_path : str or PathLike
        The gallery's final path, e.g. ``OUT/<slide stem>.zarr``; its folder must exist.

    Yields
    ------
    LockInfo
        What this run wrote into the lock file.

    Raises
    ------
    LockHeldError
        Another live run holds the lock (the message names it and the lock file), or other runs kept
        taking it while we tried.
    GalleryError
        The lock file cannot be created or written (e.g. the folder is not writable, the disk is full).
    """
    lock = lock_path_for(final_path)
    stop = threading.Event()
    heartbeat: threading.Thread | None = None
    mine = _acquire(lock, Path(final_path))
    # Everything after the lock exists is inside ``try``: Ctrl-C while the heartbeat thread starts
    # (``start()`` waits for it) must still release the lock.
    try:
        heartbeat = threading.Thread(
            target=_refresh, args=(lock, mine, stop), daemon=True, name="gallery-lock"
        )
        heartbeat.start()
        yield mine
    finally:
        stop.set()
        if heartbeat is not None and heartbeat.ident is not None:
            heartbeat.join()
        _release(lock, mine)


def _refresh(lock: Path, mine: LockInfo, stop: threading.Event) -> None:
    """Keep the lease of our lock alive until ``stop`` is set."""
    while not stop.wait(LEASE_REFRESH_S):
        holder = read_lock(lock)
        if holder is None or holder.token != mine.token:
            return  # broken and retaken: not ours any more
        with contextlib.suppress(OSError):
            os.utime(lock)


# --------------------------------------------------------------------------------------------------
# Acquire and release
# --------------------------------------------------------------------------------------------------


def _acquire(lock: Path, final: Path) -> LockInfo:
    mine = LockInfo(
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_start=_process_start(os.getpid()),
        started_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        token=uuid.uuid4().hex,
    )
    payload = json.dumps(mine.__dict__).encode()
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raw = _read_raw(lock)
            if raw is None:
                continue  # released between our attempt and the read: try again
            if not _is_stale(lock, raw):
                raise LockHeldError(_held_message(final, lock, _parse(raw))) from None
            _break_stale(lock, raw)
            continue
        except OSError as exc:
            raise GalleryError(
                f"cannot create the lock file {lock} ({exc.strerror}); make {lock.parent} writable "
                "or choose another --out"
            ) from exc
        try:
            try:
                os.write(fd, payload)
            finally:
                os.close(fd)
        except BaseException as exc:  # a full disk, or Ctrl-C: do not leave a lock behind
            with contextlib.suppress(OSError):
                lock.unlink()
            if not isinstance(exc, OSError):
                raise
            raise GalleryError(
                f"cannot write the lock file {lock} ({exc.strerror}); free space on {lock.parent} "
                "or choose another --out"
            ) from exc
        return mine
    raise LockHeldError(
        f"{final}: could not take the lock {lock} after {_ATTEMPTS} attempts (other runs keep taking "
        "it); run one job per output folder at a time"
    )


def _release(lock: Path, mine: LockInfo) -> None:
    # Only our own lock is removed: if it was wrongly broken and retaken, the new holder keeps it.
    holder = read_lock(lock)
    if holder is not None and holder.token == mine.token:
        with contextlib.suppress(OSError):
            lock.unlink()


def _held_message(final: Path, lock: Path, holder: LockInfo | None) -> str:
    if holder is None:
        who = "another run (its lock file is being written)"
    elif holder._is_this_process():
        who = f"another slide of this run ({holder.describe()})"
    else:
        who = f"another run ({holder.describe()})"
    return (
        f"{final} is being written by {who}; wait for it to finish, or delete {lock} if that run is gone "
        f"(a lock left by a killed run is taken over {LEASE_STALE_S / 60:.0f} min after its last refresh)"
    )


# --------------------------------------------------------------------------------------------------
# Stale locks
# --------------------------------------------------------------------------------------------------


def _is_stale(lock: Path, raw: bytes) -> bool:
    holder = _parse(raw)
    if holder is None:
        return _age_s(lock) > _UNWRITTEN_STALE_S
    if _age_s(lock) > LEASE_STALE_S:
        return True  # its holder stopped refreshing it: killed, or its host is gone
    if holder.host != socket.gethostname():
        return False  # cannot see another host's processes; the lease decides
    return not _process_matches(holder.pid, holder.pid_start)


def _break_stale(lock: Path, stale: bytes) -> None:
    """Delete ``lock`` if it still holds ``stale``, under a break lock so only one run does so."""
    breaker = lock.with_name(lock.name + _BREAK_SUFFIX)
    deadline = time.monotonic() + _BREAK_WAIT_S
    while True:
        try:
            fd = os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            if _age_s(breaker) > _BREAK_STALE_S:
                with contextlib.suppress(OSError):
                    breaker.unlink()
            elif time.monotonic() > deadline:
                return  # someone else is breaking it; the caller retries and sees the result
            else:
                time.sleep(0.02)
    try:
        os.close(fd)
        if _read_raw(lock) == stale:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    finally:
        with contextlib.suppress(OSError):
            breaker.unlink()


def _process_matches(pid: int, pid_start: str | None) -> bool:
    """True if ``pid`` runs on this host and, when known, started when the lock holder did."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return pid_start is None or pid_start == _process_start(pid)
    if sys.platform == "win32":
        return True  # no cheap probe; never break a lock we cannot judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    current = _process_start(pid)
    return pid_start is None or current is None or current == pid_start


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields are counted after its ")".
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _read_raw(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _parse(raw: bytes) -> LockInfo | None:
    try:
        data: Any = json.loads(raw.decode())
        return LockInfo(
            host=str(data["host"]),
            pid=int(data["pid"]),
            pid_start=None if data.get("pid_start") is None else str(data["pid_start"]),
            started_utc=str(data.get("started_utc", "?")),
            token=str(data["token"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
