"""The batch record when several commands write into one output folder: one after the other, or at once
(the tasks of a SLURM job array finishing together)."""

from __future__ import annotations

import csv
import json
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import batch
from pipeline.batch import SlideOutcome, _Record
from pipeline.errors import GalleryError, LockHeldError
from pipeline.lock import lock_path_for

#: Updates per slide and process: enough that unguarded read-modify-writes lose rows every time.
ROUNDS = 40
TASKS = 4


def _hammer(out: str, slides: list[str], barrier: Any) -> None:
    """One command's record: every slide set ROUNDS times, the last time ``done`` with cells = ROUNDS."""
    record = _Record(Path(out), [Path(s) for s in slides])
    barrier.wait()
    for i in range(1, ROUNDS + 1):
        for slide in slides:
            status = "done" if i == ROUNDS else "failed"
            record.set(SlideOutcome(slide, status, i, 2 * i, 0.5, "" if i == ROUNDS else "again"))


def _rows(out: Path) -> dict[str, dict]:
    return {Path(row["slide"]).name: row for row in json.loads((out / "batch.json").read_text())["slides"]}


def test_commands_writing_at_once_keep_every_row(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(TASKS)
    slides = [[f"/scans/task{t}/s{t}{k}.svs" for k in range(2)] for t in range(TASKS)]
    procs = [context.Process(target=_hammer, args=(str(tmp_path), s, barrier)) for s in slides]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    rows = _rows(tmp_path)
    assert sorted(rows) == sorted(Path(s).name for task in slides for s in task)
    assert all(row["status"] == "done" and row["cells"] == ROUNDS for row in rows.values()), rows
    summary = json.loads((tmp_path / "batch.json").read_text())["summary"]
    assert summary == {"slides": 8, "done": 8, "skipped": 0, "failed": 0, "cells": 8 * ROUNDS}
    with open(tmp_path / "batch.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert sorted(Path(r["slide"]).name for r in table) == sorted(rows)
    assert not list(tmp_path.glob(".*lock*")) and not list(tmp_path.glob(".*.partial"))


def test_a_later_command_keeps_earlier_rows_and_replaces_its_own(tmp_path):
    first = _Record(tmp_path, [Path("a/one.svs"), Path("a/two.svs")])
    first.set(SlideOutcome("a/one.svs", "done", 5, 9, 1.0, ""))
    first.set(SlideOutcome("a/two.svs", "failed", 0, 0, 0.1, "truncated"))
    second = _Record(tmp_path, [Path("b/two.svs"), Path("b/three.svs")])
    second.set(SlideOutcome("b/two.svs", "done", 7, 8, 1.0, ""))
    rows = _rows(tmp_path)
    # one row per gallery: two.zarr's row is the latest, three.svs is still running
    assert {name: row["status"] for name, row in rows.items()} == {
        "one.svs": "done",
        "two.svs": "done",
        "three.svs": "pending",
    }
    assert rows["two.svs"]["slide"] == "b/two.svs"
    assert json.loads((tmp_path / "batch.json").read_text())["summary"]["cells"] == 12


def _hold_record_lock(out: Path) -> Path:
    """A fresh lock on the record, as another live command on another node would leave it."""
    lock = lock_path_for(out / batch.RECORD_LOCK_NAME)
    lock.write_text(json.dumps({"host": "other-node", "pid": 7, "started_utc": "now", "token": "t" * 32}))
    return lock


def test_the_record_waits_while_another_command_holds_its_lock(tmp_path, monkeypatch):
    lock = _hold_record_lock(tmp_path)
    threading.Timer(0.3, lock.unlink).start()  # the other command finishes its update
    started = time.monotonic()
    _Record(tmp_path, [Path("a/one.svs")]).set(SlideOutcome("a/one.svs", "done", 1, 2, 0.5, ""))
    assert time.monotonic() - started >= 0.3 and _rows(tmp_path)["one.svs"]["status"] == "done"
    _hold_record_lock(tmp_path)
    monkeypatch.setattr(batch, "RECORD_LOCK_WAIT_S", 0.2)
    with pytest.raises(LockHeldError, match="other-node"):
        _Record(tmp_path, [Path("a/one.svs")]).set(SlideOutcome("a/one.svs", "failed", 0, 0, 0.1, "x"))


def test_a_record_lock_that_cannot_be_made_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "RECORD_LOCK_WAIT_S", 5.0)
    started = time.monotonic()
    with pytest.raises(GalleryError, match="cannot create the lock file") as error:
        _Record(tmp_path / "gone", [Path("a/one.svs")]).set(SlideOutcome("a/one.svs", "done", 1, 2, 0.5, ""))
    assert not isinstance(error.value, LockHeldError) and time.monotonic() - started < 2.0
