"""Many slides in one run: expand paths, run slides concurrently on one cluster, record every outcome.

Slides run in driver threads that share one Dask client, so tile tasks of several slides interleave on
the workers: a big slide does not hold up the batch and many small ones keep every worker busy. A slide
that fails (a corrupt file, no MPP, ...) is recorded with its one-line reason and the others go on.
``OUT/batch.json`` and ``OUT/batch.csv`` are rewritten (atomically) after every slide, keeping the rows
of other commands that write into the same folder (one after the other, or at once), each slide
logs to ``OUT/logs/<stem>.log`` and the batch to ``OUT/batch.log``.

The driver's memory is bounded by the slides in flight, not by the batch: a finished slide leaves only
its row of the record behind (its tables live in its gallery), and workers keep at most a few slide
handles with a capped cache of decoded tiles each (:mod:`pipeline.slide`).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zarr
from tqdm import tqdm

from ._files import atomic_path
from .engine import compute_client, worker_count
from .errors import GalleryError, LockHeldError, ParameterError, PipelineError, is_interrupt
from .gallery import partial_path_for, remove_partial
from .lock import gallery_lock
from .runner import RunParams, gallery_path, run_slide

#: File endings taken as slides when a folder is given (OpenSlide's formats and TIFF).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm", ".qptiff"}
)
BATCH_FIELDS = ("slide", "status", "cells", "candidates", "seconds", "error", "warnings")
#: Most slides in flight at once: each holds a thumbnail and its tables on the driver.
MAX_SLIDES_IN_FLIGHT = 8


@dataclass(frozen=True)
class SlideOutcome:
    """One row of the batch record."""

    slide: str
    status: str  # done, skipped (already complete) or failed
    cells: int
    candidates: int
    seconds: float
    error: str
    warnings: str = ""  # what the run found unusual, "; "-separated


def expand_slides(specs: Iterable[str]) -> list[Path]:
    """Slide paths from files, folders (their slide files, not recursive) and glob patterns.

    A path that does not exist and matches nothing is kept, so that it is reported as a failed slide
    with its reason instead of silently disappearing from the batch.

    Raises
    ------
    ParameterError
        If a folder holds no slide files, or nothing at all was given.
    """
    slides: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                endings = ", ".join(sorted(SLIDE_SUFFIXES))
                raise ParameterError(f"{path} holds no slide files (looked for {endings})")
            slides.extend(found)
        elif any(ch in spec for ch in "*?[") and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(spec))
            slides.extend(matches if matches else [path])
        else:
            slides.append(path)
    if not slides:
        raise ParameterError("no slides given")
    unique: dict[str, Path] = {}
    for slide in slides:
        unique.setdefault(str(slide.resolve()), slide)
    return list(unique.values())


class _Record:
    """The batch record on disk, one row per gallery of the output folder (thread- and process-safe).

    Several commands may write into one folder, one after the other or at once (the tasks of a SLURM job
    array): every update re-reads ``batch.json`` and merges this command's rows into it under
    :data:`RECORD_LOCK_NAME` (the gallery lock of :mod:`pipeline.lock`, which also works on NFS), so the
    record keeps every slide's latest row, whichever command wrote it. Rows are keyed by the gallery they
    describe (``<stem>.zarr``): a slide run again replaces its row. Both files are replaced atomically.
    """

    def __init__(self, out_dir: Path, slides: list[Path]):
        self.out_dir = out_dir
        self.rows: dict[str, SlideOutcome] = {
            _row_key(str(s)): SlideOutcome(str(s), "pending", 0, 0, 0.0, "") for s in slides
        }
        self.lock = threading.Lock()

    def set(self, outcome: SlideOutcome) -> None:
        with self.lock:
            self.rows[_row_key(outcome.slide)] = outcome
            with _record_lock(self.out_dir):
                rows = _read_rows(self.out_dir / "batch.json")
                rows.update((key, asdict(row)) for key, row in self.rows.items())
                self._write(list(rows.values()))

    def _write(self, rows: list[dict[str, Any]]) -> None:
        summary = {
            "slides": len(rows),
            "done": sum(r.get("status") == "done" for r in rows),
            "skipped": sum(r.get("status") == "skipped" for r in rows),
            "failed": sum(r.get("status") == "failed" for r in rows),
            "cells": sum(int(r.get("cells") or 0) for r in rows),
        }
        with atomic_path(self.out_dir / "batch.json") as tmp:
            tmp.write_text(json.dumps({"summary": summary, "slides": rows}, indent=2))
        with atomic_path(self.out_dir / "batch.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=BATCH_FIELDS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


#: The lock file name that guards read-modify-writes of the batch record (``OUT/.batch.json.lock``).
RECORD_LOCK_NAME = "batch.json"
#: How long to wait for another command's update of the record (each holds it for milliseconds), s.
RECORD_LOCK_WAIT_S = 60.0


def _row_key(slide: str) -> str:
    return gallery_path(slide, ".").name


@contextmanager
def _record_lock(out_dir: Path) -> Iterator[None]:
    """Hold the record's lock, waiting while another command updates the record."""
    deadline = time.monotonic() + RECORD_LOCK_WAIT_S
    lock = out_dir / RECORD_LOCK_NAME
    with ExitStack() as held:
        while True:
            try:
                held.enter_context(gallery_lock(lock))
                break
            except LockHeldError:
                # Held by another command: wait. A holder keeping it far longer than an update takes is
                # an error, as is any other GalleryError (a lock file that cannot be made or written).
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        yield


def _read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of an existing record by gallery name; none if there is no readable record."""
    try:
        rows = json.loads(path.read_text())["slides"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no record yet; or a damaged one, which the rows of this command replace
    return {_row_key(str(row["slide"])): row for row in rows if isinstance(row, dict) and "slide" in row}


def one_line(exc: BaseException) -> str:
    """A user-facing one-line reason for an exception."""
    if isinstance(exc, PipelineError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def slides_in_flight(workers: int) -> int:
    """Slides to run at once on ``workers`` workers (0: in this process, one at a time).

    Each slide has steps that use one worker or none (planning and QC pictures on the driver, the
    stain estimate in one task), so with several slides in flight the others fill the workers
    meanwhile; two are enough for a few workers, more for a big cluster.
    """
    if workers <= 0:
        return 1
    return max(2, min(MAX_SLIDES_IN_FLIGHT, workers // 2))


def check_gallery_names(slides: list[Path], out_dir: str | Path) -> None:
    """Refuse slides that would write the same gallery (the same stem in different folders).

    Raises
    ------
    ParameterError
        Naming the first two slides that collide.
    """
    names = Counter(gallery_path(s, out_dir).name for s in slides)
    clashes = [name for name, count in names.items() if count > 1]
    if clashes:
        same = [str(s) for s in slides if gallery_path(s, out_dir).name == clashes[0]]
        raise ParameterError(
            f"{same[0]} and {same[1]} would both write {Path(out_dir) / clashes[0]}; "
            "rename one or run them with different --out folders"
        )


def run_batch(
    slides: list[Path],
    out_dir: str | Path,
    *,
    params: RunParams | None = None,
    mpp: float | None = None,
    client: Any = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    concurrent_slides: int | None = None,
) -> list[SlideOutcome]:
    """Run every slide, isolating failures; returns one outcome per slide (input order).

    A slide whose gallery is complete is skipped (``status`` "skipped") unless ``overwrite``; an
    unfinished one (a crash left a hidden ``.partial`` draft, or a gallery not marked complete) is
    redone from scratch. A slide that fails is recorded with its one-line reason and the others go on.

    Parameters
    ----------
    slides
        Slide paths (see :func:`expand_slides`).
    out_dir
        Output folder: galleries, QC pictures, ``batch.json``, ``batch.csv`` and ``logs/``.
    params, mpp, overwrite
        As for :func:`pipeline.runner.run_slide`.
    client, workers
        A shared Dask client; without one, a local cluster of ``workers`` processes is started for the
        whole batch (0: everything in this process).
    progress
        A progress bar of slides done, with cells found; per-slide bars when there is one slide.
    concurrent_slides
        Slides in flight at once (default: :func:`slides_in_flight` of the cluster's workers).

    Returns
    -------
    list of SlideOutcome

    Raises
    ------
    ParameterError
        If two slides would write the same gallery.
    PipelineError
        If the output folder cannot be written.
    """
    out = Path(out_dir)
    check_gallery_names(slides, out)
    if client is None and workers > 0:
        # One cluster for all slides: starting workers costs seconds, and slides share them.
        with (
            drafts_removed_on_failure(slides, out),
            compute_client(workers, preload=("pipeline.runner",)) as own,
        ):
            return run_batch(
                slides, out, params=params, mpp=mpp, client=own, workers=workers, overwrite=overwrite,
                progress=progress, concurrent_slides=concurrent_slides,
            )  # fmt: skip
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}-{threading.get_ident()}"  # concurrent runs: own name
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PipelineError(
            f"output folder {out} is not writable ({exc.strerror}); choose another --out"
        ) from exc
    (out / "logs").mkdir(exist_ok=True)
    record = _Record(out, slides)
    n_workers = worker_count(client)
    if concurrent_slides is None:
        concurrent_slides = slides_in_flight(n_workers)
    concurrent_slides = max(1, min(concurrent_slides, len(slides)))
    single = len(slides) == 1
    # Beside batch.json, not in logs/: a slide named batch.svs has its own logs/batch.log.
    batch_log = _Log(out / "batch.log")
    where = "in-process" if client is None else f"{n_workers} workers at {client.scheduler.address}"
    batch_log.say(f"batch of {len(slides)} slides, {concurrent_slides} at once, {where}")

    def one(slide: Path) -> SlideOutcome:
        started = time.perf_counter()
        with _Log(out / "logs" / f"{slide.stem}.log") as log:
            log.say(f"start {slide}")
            try:
                result = run_slide(
                    slide, out, params=params, mpp=mpp, workers=workers, client=client,
                    overwrite=overwrite, progress=progress and single, log=log.say,
                )  # fmt: skip
                outcome = SlideOutcome(
                    str(slide), result.status, result.cells, result.candidates, round(result.seconds, 2), "",
                    "; ".join(result.warnings),
                )  # fmt: skip
                if result.status == "done":
                    log.say(f"stage timings (s): {_timings(result.gallery)}")
            except Exception as exc:  # a failed slide must not stop the batch
                if is_interrupt(exc):  # Ctrl-C surfacing as another error is not the slide's failure
                    log.say("interrupted")
                    raise KeyboardInterrupt(one_line(exc)) from exc
                log.say("failed: " + one_line(exc))
                log.write(traceback.format_exc())
                outcome = SlideOutcome(
                    str(slide), "failed", 0, 0, round(time.perf_counter() - started, 2), one_line(exc)
                )
            log.say(f"end {outcome.status}")
        record.set(outcome)
        batch_log.say(
            f"{outcome.status} {slide}: {outcome.cells} cells, {outcome.seconds:.1f} s"
            + (f", {outcome.error}" if outcome.error else "")
        )
        return outcome

    outcomes: dict[str, SlideOutcome] = {}
    failed = cells = 0
    bar = tqdm(total=len(slides), desc="slides", unit="slide", disable=not progress or single)
    pool = ThreadPoolExecutor(max_workers=concurrent_slides, thread_name_prefix="slide")
    try:
        if concurrent_slides == 1:
            # In this thread, so Ctrl-C stops the slide where it is: a pool thread cannot be
            # interrupted and would run on to the end (without workers, nothing else stops it).
            finished: Iterable[SlideOutcome] = map(one, slides)
        else:
            finished = (f.result() for f in as_completed([pool.submit(one, slide) for slide in slides]))
        for outcome in finished:
            outcomes[outcome.slide] = outcome
            cells += outcome.cells
            failed += outcome.status == "failed"
            bar.set_postfix(cells=cells, failed=failed)
            bar.update(1)
    except BaseException as exc:
        # Ctrl-C: do not start the slides still queued; the running ones stop when the client closes.
        pool.shutdown(wait=False, cancel_futures=True)
        batch_log.say("interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped: " + one_line(exc))
        batch_log.close()
        raise
    finally:
        bar.close()
    pool.shutdown()
    batch_log.say(f"end: {len(slides) - failed} of {len(slides)} slides done or skipped, {failed} failed")
    batch_log.close()
    return [outcomes[str(s)] for s in slides]


@contextmanager
def drafts_removed_on_failure(slides: list[Path], out_dir: str | Path) -> Iterator[None]:
    """On a failure or Ctrl-C, delete the slides' unfinished drafts once the ``with`` block has ended.

    Enter it before the cluster: a task already running on a worker is not stopped by the interrupt
    and may write into a draft until the cluster closes, after the slide deleted it. A draft whose
    lock another live run holds is left alone: it is that run's.
    """
    try:
        yield
    except BaseException:
        for slide in slides:
            final = gallery_path(slide, out_dir)
            if not partial_path_for(final).exists():
                continue
            try:
                with gallery_lock(final):
                    remove_partial(final)
            except (GalleryError, OSError):
                pass  # another run's draft, or an unwritable folder: the next run cleans up
        raise


class _Log:
    """A per-slide (or batch) log file with timestamped lines, appended to across runs."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "a")
        self._lock = threading.Lock()

    def say(self, message: str) -> None:
        self.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def write(self, text: str) -> None:
        with self._lock:
            # A slide thread still running after an interrupt may log after the batch log closed.
            if not self._fh.closed:
                self._fh.write(text)
                self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()

    def __enter__(self) -> _Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _timings(gallery: Path) -> str:
    try:
        timings = zarr.open_group(gallery, mode="r").attrs.get("timings_s", {})
    except Exception as exc:  # only a log line: never fail a finished slide over it
        return f"unavailable ({type(exc).__name__})"
    return ", ".join(f"{k} {v}" for k, v in dict(timings).items())
