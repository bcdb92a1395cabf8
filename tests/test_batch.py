"""Batch runs in this process: path expansion, resume, failure isolation, bounded memory."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.batch import drafts_removed_on_failure, expand_slides, run_batch
from pipeline.errors import ParameterError
from pipeline.gallery import is_complete, open_gallery, partial_path_for
from pipeline.runner import RunParams
from pipeline.slide import tiff_tiles

#: Fewer stain-estimate windows than the default: these tests are about the batch, not the estimate.
QUICK = RunParams(stat_samples=4)


def test_expand_files_folders_and_globs(tmp_path):
    for name in ("a.svs", "b.ndpi", "c.txt", "d.tif"):
        (tmp_path / name).write_bytes(b"x")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "e.svs").write_bytes(b"x")
    from_folder = expand_slides([str(tmp_path)])
    assert [p.name for p in from_folder] == ["a.svs", "b.ndpi", "d.tif"]
    from_glob = expand_slides([str(tmp_path / "*.svs"), str(sub / "e.svs")])
    assert [p.name for p in from_glob] == ["a.svs", "e.svs"]
    # the same slide named twice runs once
    assert len(expand_slides([str(tmp_path / "a.svs"), str(tmp_path / "*.svs")])) == 1


def test_missing_paths_are_kept_to_be_reported(tmp_path):
    missing = tmp_path / "nope.svs"
    assert expand_slides([str(missing)]) == [missing]
    assert expand_slides([str(tmp_path / "none-*.svs")]) == [tmp_path / "none-*.svs"]


def test_folder_without_slides_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ParameterError, match="holds no slide files"):
        expand_slides([str(tmp_path)])


# ------------------------------------------------------------------------------ resume and memory
@pytest.fixture(scope="module")
def tiny_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 0.4 x 0.4 mm monolayer slide: a batch of it runs in about 2 s in this process."""
    from pipeline.simulate import simulate_slide

    out = tmp_path_factory.mktemp("tiny") / "tiny.svs"
    return Path(
        simulate_slide(
            out, width_mm=0.4, height_mm=0.4, seed=3, preset="aml", placement="monolayer", workers=0,
            progress=False,
        ).slide_path
    )  # fmt: skip


def _mark_unfinished(gallery: Path) -> None:
    """What a crash between writing and finishing leaves: a gallery that does not say complete."""
    meta = gallery / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))


def test_complete_skipped_unfinished_redone_overwrite_redoes(tiny_slide, tmp_path):
    out = tmp_path / "out"
    (first,) = run_batch([tiny_slide], out, params=QUICK, workers=0, progress=False)
    assert first.status == "done" and first.cells > 0
    gallery = out / "tiny.zarr"
    clean = open_gallery(gallery)
    clean_images, clean_cells = np.asarray(clean.images[:]), clean.cells

    inode = gallery.stat().st_ino
    (again,) = run_batch([tiny_slide], out, params=QUICK, workers=0, progress=False)
    assert (again.status, again.cells) == ("skipped", first.cells)
    assert gallery.stat().st_ino == inode

    # a crash left a draft with junk next to the gallery, and a gallery that does not say complete
    partial = partial_path_for(gallery)
    partial.mkdir()
    (partial / "junk").write_bytes(b"half a shard")
    _mark_unfinished(gallery)
    assert not is_complete(gallery)
    (redone,) = run_batch([tiny_slide], out, params=QUICK, workers=0, progress=False)
    assert redone.status == "done"
    assert is_complete(gallery) and not partial.exists()
    assert np.array_equal(np.asarray(open_gallery(gallery).images[:]), clean_images)
    pd.testing.assert_frame_equal(open_gallery(gallery).cells, clean_cells)

    inode = gallery.stat().st_ino
    (forced,) = run_batch([tiny_slide], out, params=QUICK, workers=0, progress=False, overwrite=True)
    assert forced.status == "done"
    assert gallery.stat().st_ino != inode  # a new gallery was swapped in
    log = (out / "logs" / "tiny.log").read_text()
    assert log.count("end done") == 3 and log.count("end skipped") == 1
    assert "stage timings (s): plan" in log


def test_same_stem_in_two_folders_is_refused(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "slide.svs").write_bytes(b"x")
    slides = expand_slides([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(ParameterError, match="would both write"):
        run_batch(slides, tmp_path / "out", params=QUICK, workers=0, progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_failed_slides_are_recorded_and_the_others_finish(tiny_slide, tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    outcomes = run_batch(
        [empty, tiny_slide, tmp_path / "missing.svs"],
        tmp_path / "out",
        params=QUICK,
        workers=0,
        progress=False,
    )
    assert [o.status for o in outcomes] == ["failed", "done", "failed"]
    assert "empty" in outcomes[0].error and "no such file" in outcomes[2].error
    record = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert record["summary"] == {
        "slides": 3,
        "done": 1,
        "skipped": 0,
        "failed": 2,
        "cells": outcomes[1].cells,
    }
    assert [row["error"] for row in record["slides"]] == [o.error for o in outcomes]


#: Traced memory a batch of slides in this process may leave behind once the slide-handle cache is
#: emptied: lazily built module state and the batch record. One leaked 1 MB array per slide exceeds it.
LEFT_BEHIND_MAX_BYTES = 2**20


def _live_tables() -> int:
    """Live pandas tables in this process (DataFrames are tracked by the garbage collector)."""
    gc.collect()
    return sum(isinstance(o, pd.DataFrame) for o in gc.get_objects())


def _traced_without_slide_handles(slide_module: Any) -> tracemalloc.Snapshot:
    """What tracemalloc sees (Python objects and numpy buffers) once the open-slide cache is dropped."""
    slide_module._cache.clear()  # its capped tile caches are allowed to stay; they are checked separately
    gc.collect()
    return tracemalloc.take_snapshot()


def _growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> tuple[int, str]:
    """Bytes allocated between the snapshots and still alive, and the three largest sources."""
    changes = after.compare_to(before, "lineno")
    top = "; ".join(
        f"{c.traceback[0].filename}:{c.traceback[0].lineno} {c.size_diff:+d} B" for c in changes[:3]
    )
    return sum(c.size_diff for c in changes), top


def _assert_reader_caches_capped(slide_module: Any, n_slides: int) -> None:
    """At most a few slide handles per process, each with a capped cache of decoded tiles.

    A function of its own so that no handle stays referenced from the test's frame afterwards.
    """
    assert len(slide_module._cache) <= slide_module._CACHE_MAX_HANDLES < n_slides
    for handle in slide_module._cache.values():
        reader = handle._reader
        if hasattr(reader, "_cache_bytes"):
            assert 0 < reader._cache_bytes <= tiff_tiles.TILE_CACHE_BYTES


def test_driver_keeps_nothing_per_slide_and_reader_caches_are_capped(tiny_slide, tmp_path, monkeypatch):
    import pipeline.slide.cache as slide_module

    # A small tile budget so that a tiny slide overflows it.
    monkeypatch.setattr(tiff_tiles, "TILE_CACHE_BYTES", 2**20)
    names = []
    for i in range(slide_module._CACHE_MAX_HANDLES + 1):
        names.append(tmp_path / f"copy{i}.svs")
        names[-1].symlink_to(tiny_slide)
    run_batch(
        names[:1], tmp_path / "warm", params=QUICK, workers=0, progress=False
    )  # imports, lazy module state
    tables = _live_tables()
    # numpy reports its array buffers to tracemalloc, so leaked pixels count here; gc.get_objects()
    # would not list them (arrays are not tracked by the garbage collector).
    tracemalloc.start()
    try:
        before = _traced_without_slide_handles(slide_module)
        outcomes = run_batch(names[1:], tmp_path / "out", params=QUICK, workers=0, progress=False)
        assert [o.status for o in outcomes] == ["done"] * (len(names) - 1)
        _assert_reader_caches_capped(slide_module, len(names))
        left_behind, sources = _growth(before, _traced_without_slide_handles(slide_module))
    finally:
        tracemalloc.stop()
    # in-process, the driver is also the worker: neither keeps a finished slide's tables or pixels
    assert _live_tables() == tables
    assert left_behind < LEFT_BEHIND_MAX_BYTES, (
        f"{left_behind / 2**20:.2f} MB left behind by {len(outcomes)} slides, mostly: {sources}"
    )


def test_drafts_are_removed_after_a_failure_unless_another_run_holds_them(tmp_path: Path) -> None:
    """Workers may write into a slide's draft until the cluster closes, after the slide deleted it."""
    from pipeline.lock import gallery_lock

    out = tmp_path / "out"
    mine, theirs = partial_path_for(out / "mine.zarr"), partial_path_for(out / "theirs.zarr")
    for draft in (mine, theirs):
        (draft / "images" / "c").mkdir(parents=True)
    slides = [tmp_path / "mine.svs", tmp_path / "theirs.svs", tmp_path / "never_started.svs"]
    with gallery_lock(out / "theirs.zarr"), pytest.raises(KeyboardInterrupt):
        with drafts_removed_on_failure(slides, out):
            raise KeyboardInterrupt
    assert not mine.exists()
    assert theirs.exists()  # its lock is held by a live run
    assert sorted(p.name for p in out.iterdir()) == [".theirs.zarr.partial"]  # and no lock left behind
    with drafts_removed_on_failure(slides, out):
        pass  # no failure: nothing is touched
    assert theirs.exists()
