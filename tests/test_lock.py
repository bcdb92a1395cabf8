"""The gallery lock's lease: the holder keeps it fresh, and a lock nobody refreshes is taken over."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline import lock as gallery_locks
from pipeline.errors import GalleryError, LockHeldError
from pipeline.lock import gallery_lock, lock_path_for, read_lock


def _foreign_lock(path: Path, age_s: float) -> None:
    """A lock file written by a run on another host (whose processes cannot be checked from here)."""
    holder = {
        "host": "another-node.cluster",
        "pid": 4242,
        "pid_start": "1",
        "started_utc": "2026-01-01T00:00:00+00:00",
        "token": "f" * 32,
    }
    path.write_text(json.dumps(holder))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_a_fresh_lock_from_another_host_is_respected(tmp_path: Path) -> None:
    final = tmp_path / "slide.zarr"
    _foreign_lock(lock_path_for(final), age_s=60.0)
    with pytest.raises(LockHeldError, match=r"another-node\.cluster.*delete .*slide\.zarr\.lock"):
        with gallery_lock(final):
            pass
    assert read_lock(lock_path_for(final)).host == "another-node.cluster"


def test_a_held_lock_is_told_apart_from_a_lock_that_cannot_be_made(tmp_path: Path) -> None:
    final = tmp_path / "slide.zarr"
    _foreign_lock(lock_path_for(final), age_s=60.0)
    with pytest.raises(GalleryError) as held:
        with gallery_lock(final):
            pass
    assert isinstance(held.value, LockHeldError)  # still a GalleryError for callers that catch those
    with pytest.raises(GalleryError, match="cannot create the lock file") as broken:
        with gallery_lock(tmp_path / "no such folder" / "slide.zarr"):
            pass
    assert not isinstance(broken.value, LockHeldError)


def test_a_lock_whose_lease_ran_out_is_taken_over_from_any_host(tmp_path: Path) -> None:
    final = tmp_path / "slide.zarr"
    _foreign_lock(lock_path_for(final), age_s=gallery_locks.LEASE_STALE_S + 60.0)
    with gallery_lock(final) as mine:
        assert read_lock(lock_path_for(final)).token == mine.token
    assert not lock_path_for(final).exists()


def test_the_holder_keeps_its_lease_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gallery_locks, "LEASE_REFRESH_S", 0.05)
    final = tmp_path / "slide.zarr"
    lock = lock_path_for(final)
    with gallery_lock(final):
        old = time.time() - 3600.0
        os.utime(lock, (old, old))
        deadline = time.monotonic() + 10.0
        while lock.stat().st_mtime < time.time() - 60.0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.stat().st_mtime > time.time() - 60.0, "the lease was not refreshed"
    assert not lock.exists()
