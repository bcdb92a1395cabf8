"""Many slides in one run: expand paths, run slides concurrently on one cluster, record every outcome.

Slides run in driver threads that share one Dask client, so tile tasks of several slides interleave on
the workers: a big slide does not hold up the batch and many small ones keep every worker busy. A slide
that fails (a corrupt file, no MPP, ...) is recorded with its one-line reason and the others go on.
``OUT/batch.json`` and ``OUT/batch.csv`` are rewritten (atomically) after every slide, and each slide
logs to ``OUT/logs/<stem>.log``.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import threading
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import ParameterError, PipelineError
from .runner import RunParams, run_slide

#: File endings taken as slides when a folder is given (OpenSlide's formats and TIFF).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm", ".qptiff"}
)
BATCH_FIELDS = ("slide", "status", "cells", "candidates", "seconds", "error")


@dataclass(frozen=True)
class SlideOutcome:
    """One row of the batch record."""

    slide: str
    status: str  # done, skipped (already complete) or failed
    cells: int
    candidates: int
    seconds: float
    error: str


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
    """The batch record on disk, rewritten atomically as outcomes arrive (thread-safe)."""

    def __init__(self, out_dir: Path, slides: list[Path]):
        self.out_dir = out_dir
        self.rows: dict[str, SlideOutcome] = {
            str(s): SlideOutcome(str(s), "pending", 0, 0, 0.0, "") for s in slides
        }
        self.lock = threading.Lock()

    def set(self, outcome: SlideOutcome) -> None:
        with self.lock:
            self.rows[outcome.slide] = outcome
            self._write()

    def _write(self) -> None:
        rows = [asdict(r) for r in self.rows.values()]
        summary = {
            "slides": len(rows),
            "done": sum(r["status"] == "done" for r in rows),
            "skipped": sum(r["status"] == "skipped" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "cells": sum(r["cells"] for r in rows),
        }
        _atomic_write(self.out_dir / "batch.json", json.dumps({"summary": summary, "slides": rows}, indent=2))
        tmp = self.out_dir / "batch.csv.partial"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=BATCH_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.out_dir / "batch.csv")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def one_line(exc: BaseException) -> str:
    """A user-facing one-line reason for an exception."""
    if isinstance(exc, PipelineError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


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

    Parameters
    ----------
    slides
        Slide paths (see :func:`expand_slides`).
    out_dir
        Output folder: galleries, QC pictures, ``batch.json``, ``batch.csv`` and ``logs/``.
    params, mpp, overwrite
        As for :func:`pipeline.runner.run_slide`.
    client, workers
        A shared Dask client, or the number of local workers when ``client`` is None.
    progress
        A progress bar of slides done, with cells found; per-slide bars when there is one slide.
    concurrent_slides
        Slides in flight at once (default: 2, or 1 without a cluster).
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PipelineError(
            f"output folder {out} is not writable ({exc.strerror}); choose another --out"
        ) from exc
    (out / "logs").mkdir(exist_ok=True)
    record = _Record(out, slides)
    if concurrent_slides is None:
        concurrent_slides = 1 if client is None and workers == 0 else 2
    single = len(slides) == 1

    def one(slide: Path) -> SlideOutcome:
        log_path = out / "logs" / f"{slide.stem}.log"
        started = time.perf_counter()
        with open(log_path, "a") as log:

            def say(message: str) -> None:
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
                log.flush()

            say(f"start {slide}")
            try:
                result = run_slide(
                    slide, out, params=params, mpp=mpp, workers=workers, client=client,
                    overwrite=overwrite, progress=progress and single, log=say,
                )  # fmt: skip
                outcome = SlideOutcome(
                    str(slide), result.status, result.cells, result.candidates, round(result.seconds, 2), ""
                )
            except Exception as exc:  # a failed slide must not stop the batch
                say("failed: " + one_line(exc))
                log.write(traceback.format_exc())
                outcome = SlideOutcome(
                    str(slide), "failed", 0, 0, round(time.perf_counter() - started, 2), one_line(exc)
                )
            say(f"end {outcome.status}")
        record.set(outcome)
        return outcome

    outcomes: dict[str, SlideOutcome] = {}
    bar = tqdm(total=len(slides), desc="slides", unit="slide", disable=not progress or single)
    cells = 0
    with ThreadPoolExecutor(max_workers=max(1, concurrent_slides)) as pool:
        futures = {pool.submit(one, slide): slide for slide in slides}
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[outcome.slide] = outcome
            cells += outcome.cells
            bar.set_postfix(cells=cells, failed=sum(o.status == "failed" for o in outcomes.values()))
            bar.update(1)
    bar.close()
    return [outcomes[str(s)] for s in slides]
