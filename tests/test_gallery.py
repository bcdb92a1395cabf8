"""Tests of the on-disk gallery format (pipeline/gallery.py)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
import shutil
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.gallery as gallery_module
from pipeline.errors import GalleryError, ParameterError
from pipeline.gallery import (
    GALLERY_FORMAT,
    GALLERY_FORMAT_VERSION,
    REQUIRED_CANDIDATE_COLUMNS,
    REQUIRED_CELL_COLUMNS,
    GalleryDraft,
    ShardReceipt,
    create_gallery,
    create_gallery_draft,
    finalize_gallery,
    images_checksum,
    is_complete,
    open_gallery,
    partial_path_for,
    remove_partial,
    shard_ranges,
    to_json_safe,
    write_shard,
)

CROP_PX = 16  # small crops keep the tests fast; the format does not depend on the size
SHARD = 64


def make_images(n_cells: int, crop_px: int = CROP_PX, seed: int = 0) -> np.ndarray:
    """Random crops: every byte differs between cells, so a lost or swapped crop shows."""
    return np.random.default_rng(seed).integers(0, 256, (n_cells, crop_px, crop_px, 3), dtype=np.uint8)


def make_cells(n_cells: int) -> dict[str, np.ndarray]:
    return {
        "x_px": np.arange(n_cells) * 10.5,
        "y_px": np.arange(n_cells) * 3.25,
        "area_um2": np.linspace(40, 800, n_cells),
        "quality": np.linspace(0, 1, n_cells).astype(np.float32),
        "padded": np.arange(n_cells) % 7 == 0,
        "candidate_index": np.arange(n_cells, dtype=np.int64) * 2,
        "cell_class": np.array([["lymphocyte", "neutrophil", "éosinophile"][i % 3] for i in range(n_cells)]),
    }


def make_candidates(n_candidates: int) -> dict[str, np.ndarray]:
    accepted = np.arange(n_candidates) % 2 == 0
    return {
        "x_px": np.arange(n_candidates, dtype=float),
        "y_px": np.arange(n_candidates, dtype=float) + 0.5,
        "area_um2": np.full(n_candidates, 55.0),
        "accepted": accepted,
        # object dtype, as a list of Python strings would give
        "reason": np.array(["" if ok else "low quality" for ok in accepted], dtype=object),
    }


def write_gallery(
    final: Path,
    n_cells: int,
    *,
    crop_px: int = CROP_PX,
    overwrite: bool = False,
    attrs: dict | None = None,
    seed: int = 0,
) -> tuple[Path, np.ndarray]:
    """Create, fill and finalize a gallery serially; return its path and the images written."""
    images = make_images(n_cells, crop_px, seed)
    draft = create_gallery(
        final,
        n_cells,
        make_cells(n_cells),
        make_candidates(2 * n_cells + 1),
        attrs if attrs is not None else {"slide_path": "/data/slide.svs"},
        crop_px=crop_px,
        shard_cells=SHARD,
        overwrite=overwrite,
    )
    receipts = [
        write_shard(draft.partial_path, i, images[a:b]) for i, (a, b) in enumerate(draft.shard_ranges())
    ]
    finalize_gallery(draft, {"n_accepted": n_cells}, receipts, verify_data=True)
    return final, images


def write_shard_task(
    partial_path: str, shard_index: int, start: int, stop: int, crop_px: int
) -> ShardReceipt:
    """A task as the runner would submit it: only a path and indices cross the process boundary."""
    return write_shard(partial_path, shard_index, make_images(stop, crop_px, seed=1)[start:stop])


# ----------------------------------------------------------------------------------------------
# Round trip and layout
# ----------------------------------------------------------------------------------------------


def test_round_trip_images_tables_and_attrs(tmp_path: Path) -> None:
    n = 150  # three shards, the last one short
    final, images = write_gallery(tmp_path / "slide.zarr", n)
    gallery = open_gallery(final)

    assert len(gallery) == n
    np.testing.assert_array_equal(gallery.images[:], images)
    expected_cells = make_cells(n)
    assert list(gallery.cells.columns) == list(expected_cells)  # writer's column order kept
    for name, values in expected_cells.items():
        np.testing.assert_array_equal(gallery.cells[name].to_numpy(), values)
    expected_candidates = make_candidates(2 * n + 1)
    assert list(gallery.candidates.columns) == list(expected_candidates)
    np.testing.assert_array_equal(gallery.candidates["accepted"].to_numpy(), expected_candidates["accepted"])
    assert gallery.candidates["reason"].tolist() == list(expected_candidates["reason"])
    assert gallery.attrs["complete"] is True
    assert gallery.attrs["n_cells"] == n
    assert gallery.attrs["n_candidates"] == 2 * n + 1
    assert gallery.attrs["slide_path"] == "/data/slide.svs"
    assert gallery.attrs["n_accepted"] == n  # from attrs_update
    assert not partial_path_for(final).exists()


def test_getitem_returns_crop_and_row_dict(tmp_path: Path) -> None:
    final, images = write_gallery(tmp_path / "s.zarr", 70)
    gallery = open_gallery(final)
    image, row = gallery[65]
    np.testing.assert_array_equal(image, images[65])
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert row["x_px"] == pytest.approx(65 * 10.5)
    assert row["cell_class"] == "éosinophile"
    assert row["candidate_index"] == 130
    np.testing.assert_array_equal(gallery[-1][0], images[-1])
    with pytest.raises(IndexError):
        gallery[70]
    # A Dataset is iterated until IndexError; iteration must yield every cell once.
    assert sum(1 for _ in gallery) == 70


def test_gallery_pickles_for_dataloader_workers(tmp_path: Path) -> None:
    final, images = write_gallery(tmp_path / "s.zarr", 5)
    clone = pickle.loads(pickle.dumps(open_gallery(final)))
    np.testing.assert_array_equal(clone[4][0], images[4])


def test_layout_matches_format_v1_at_default_crop_size(tmp_path: Path) -> None:
    final = tmp_path / "s.zarr"
    draft = create_gallery(final, 3, make_cells(3), make_candidates(4), {})
    write_shard(draft.partial_path, 0, make_images(3, 288))
    finalize_gallery(draft)

    group = zarr.open_group(final, mode="r")
    images = group["images"]
    assert images.shape == (3, 288, 288, 3)
    assert images.dtype == np.uint8
    assert images.metadata.dimension_names == ("cell", "y", "x", "c")
    assert images.chunks == (1, 288, 288, 3)
    assert images.shards == (128, 288, 288, 3)
    assert [type(c).__name__ for c in images.compressors] == ["ZstdCodec"]
    assert images.compressors[0].level == 1
    assert group.attrs["format"] == GALLERY_FORMAT
    assert group.attrs["format_version"] == GALLERY_FORMAT_VERSION
    assert group.metadata.consolidated_metadata is not None
    for table, required in (("cells", REQUIRED_CELL_COLUMNS), ("candidates", REQUIRED_CANDIDATE_COLUMNS)):
        for name in required:
            assert group[f"{table}/{name}"].ndim == 1
    assert group["cells/x_px"].shape == (3,)
    assert group["candidates/reason"].shape == (4,)


def test_uncompressed_option(tmp_path: Path) -> None:
    draft = create_gallery(
        tmp_path / "s.zarr", 2, make_cells(2), make_candidates(2), {}, crop_px=CROP_PX, compression="none"
    )
    write_shard(draft.partial_path, 0, make_images(2))
    finalize_gallery(draft)
    gallery = open_gallery(tmp_path / "s.zarr")
    assert len(gallery.images.compressors) == 0
    assert gallery.attrs["compression"] == "none"


def test_empty_gallery_is_complete(tmp_path: Path) -> None:
    draft = create_gallery(
        tmp_path / "s.zarr", 0, make_cells(0), make_candidates(5), {}, crop_px=CROP_PX, shard_cells=SHARD
    )
    assert draft.n_shards == 0
    finalize_gallery(draft, receipts=[], verify_data=True)

    assert is_complete(tmp_path / "s.zarr")
    gallery = open_gallery(tmp_path / "s.zarr")
    assert len(gallery) == 0
    assert gallery.images.shape == (0, CROP_PX, CROP_PX, 3)
    assert list(gallery.cells.columns) == list(make_cells(0))
    assert len(gallery.cells) == 0
    assert len(gallery.candidates) == 5
    with pytest.raises(IndexError):
        gallery[0]


def test_empty_gallery_without_candidates(tmp_path: Path) -> None:
    draft = create_gallery(
        tmp_path / "s.zarr", 0, make_cells(0), make_candidates(0), {}, crop_px=CROP_PX, shard_cells=SHARD
    )
    finalize_gallery(draft)
    gallery = open_gallery(tmp_path / "s.zarr")
    assert len(gallery.candidates) == 0
    assert gallery.candidates["reason"].tolist() == []


# ----------------------------------------------------------------------------------------------
# A draft made before its tables (rows decided while crops are cut)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_cells", [150, 128, 0], ids=["last-shard-short", "whole-shards", "no-cells"])
def test_draft_with_room_is_cut_to_the_tables_at_finalization(tmp_path: Path, n_cells: int) -> None:
    final = tmp_path / "s.zarr"
    room = 200  # more than will be kept: some shards are never written
    draft = create_gallery_draft(
        final, room, {"slide_path": "/data/slide.svs"}, crop_px=CROP_PX, shard_cells=SHARD
    )
    assert not draft.has_tables and draft.n_cells == room
    images = make_images(n_cells)
    ranges = shard_ranges(n_cells, SHARD)
    receipts = [
        # Only the last shard needs the final count: the others are whole either way.
        write_shard(draft.partial_path, i, images[a:b], n_cells=n_cells if i == len(ranges) - 1 else None)
        for i, (a, b) in enumerate(ranges)
    ]
    finalize_gallery(
        draft,
        {"n_accepted": n_cells},
        receipts,
        verify_data=True,
        cells=make_cells(n_cells),
        candidates=make_candidates(room),
    )
    gallery = open_gallery(final)
    assert gallery.images.shape == (n_cells, CROP_PX, CROP_PX, 3)
    np.testing.assert_array_equal(gallery.images[:], images)
    np.testing.assert_array_equal(gallery.cells["x_px"].to_numpy(), make_cells(n_cells)["x_px"])
    assert len(gallery.candidates) == room
    assert gallery.attrs["n_cells"] == n_cells and gallery.attrs["n_candidates"] == room
    assert gallery.attrs["slide_path"] == "/data/slide.svs" and gallery.attrs["n_accepted"] == n_cells
    shard_files = sorted(p.name for p in (final / "images" / "c").iterdir()) if n_cells else []
    assert shard_files == [str(i) for i in range(len(ranges))]


def test_draft_tables_are_given_once_and_must_fit(tmp_path: Path) -> None:
    draft = create_gallery_draft(tmp_path / "a.zarr", 10, {}, crop_px=CROP_PX, shard_cells=SHARD)
    with pytest.raises(ValueError, match="no tables yet"):
        finalize_gallery(draft)
    with pytest.raises(ValueError, match="11 cells do not fit"):
        finalize_gallery(draft, cells=make_cells(11), candidates=make_candidates(11))
    assert not is_complete(tmp_path / "a.zarr") and draft.partial_path.exists()
    with pytest.raises(ValueError, match="n_cells must be in"):
        write_shard(draft.partial_path, 0, make_images(11), n_cells=11)
    with pytest.raises(ValueError, match="shape"):
        write_shard(draft.partial_path, 0, make_images(10), n_cells=9)  # the last shard has 9 rows

    full = create_gallery(tmp_path / "b.zarr", 1, make_cells(1), make_candidates(1), {}, crop_px=CROP_PX)
    write_shard(full.partial_path, 0, make_images(1))
    with pytest.raises(ValueError, match="has its tables"):
        finalize_gallery(full, cells=make_cells(1), candidates=make_candidates(1))


def test_draft_whose_last_shard_was_never_written_is_refused(tmp_path: Path) -> None:
    draft = create_gallery_draft(tmp_path / "s.zarr", 200, {}, crop_px=CROP_PX, shard_cells=SHARD)
    write_shard(draft.partial_path, 0, make_images(SHARD))
    with pytest.raises(GalleryError, match="1 of 2 shards were never written"):
        finalize_gallery(draft, cells=make_cells(SHARD + 1), candidates=make_candidates(3))
    assert not is_complete(tmp_path / "s.zarr")


# ----------------------------------------------------------------------------------------------
# Shard files written in one pass (pipeline/_zarr_shard.py): zarr's bytes exactly
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("rows", [SHARD, 37], ids=["whole-shard", "short-last-shard"])
def test_shard_files_are_byte_for_byte_what_zarr_writes(tmp_path: Path, compression: str, rows: int) -> None:
    # Crops with structure (smooth gradients and flat patches), as zstd sees real ones.
    yy, xx = np.mgrid[:CROP_PX, :CROP_PX]
    images = np.stack([(yy * 7 + xx * (i % 5) + i) % 256 for i in range(rows)]).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    images[::3, :4] = 255
    written = []
    for by_zarr in (False, True):
        draft = create_gallery_draft(
            tmp_path / f"{by_zarr}.zarr",
            SHARD + rows,
            {},
            crop_px=CROP_PX,
            shard_cells=SHARD,
            compression=compression,
        )
        if by_zarr:
            zarr.open_array(draft.partial_path / "images", mode="r+")[SHARD : SHARD + rows] = images
        else:
            assert (
                gallery_module._zarr_shard.shard_layout(zarr.open_array(draft.partial_path / "images"))
                is not None
            )
            write_shard(draft.partial_path, 1, images, n_cells=SHARD + rows)
        written.append((draft.partial_path / "images" / "c" / "1" / "0" / "0" / "0").read_bytes())
        np.testing.assert_array_equal(zarr.open_array(draft.partial_path / "images")[SHARD:], images)
    assert written[0] == written[1]


def test_shard_files_fall_back_to_zarr_for_a_layout_they_do_not_know(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    other = group.create_array(
        "images", shape=(4, CROP_PX, CROP_PX, 3), dtype="uint8", chunks=(2, CROP_PX, CROP_PX, 3),
        shards=(4, CROP_PX, CROP_PX, 3),
    )  # fmt: skip
    assert gallery_module._zarr_shard.shard_layout(other) is None
    unsharded = group.create_array("plain", shape=(4, CROP_PX, CROP_PX, 3), dtype="uint8")
    assert gallery_module._zarr_shard.shard_layout(unsharded) is None


# ----------------------------------------------------------------------------------------------
# Parallel writers
# ----------------------------------------------------------------------------------------------


def test_parallel_whole_shard_writes_lose_nothing(tmp_path: Path) -> None:
    n = 8 * SHARD - 5  # eight shards, the last short
    draft = create_gallery(
        tmp_path / "s.zarr", n, make_cells(n), make_candidates(3), {}, crop_px=CROP_PX, shard_cells=SHARD
    )
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        futures = [
            pool.submit(write_shard_task, str(draft.partial_path), i, a, b, CROP_PX)
            for i, (a, b) in enumerate(draft.shard_ranges())
        ]
        receipts = [future.result() for future in futures]
    finalize_gallery(draft, receipts=receipts, verify_data=True)

    expected = make_images(n, seed=1)
    stored = open_gallery(tmp_path / "s.zarr").images[:]
    lost = [i for i in range(n) if zlib.crc32(stored[i].tobytes()) != zlib.crc32(expected[i].tobytes())]
    assert lost == []
    assert stored.shape == expected.shape


# ----------------------------------------------------------------------------------------------
# Completeness, failures and clean-up
# ----------------------------------------------------------------------------------------------


def test_unfinalized_draft_is_not_complete_and_is_refused(tmp_path: Path) -> None:
    final = tmp_path / "s.zarr"
    draft = create_gallery(
        final, 10, make_cells(10), make_candidates(10), {}, crop_px=CROP_PX, shard_cells=SHARD
    )
    write_shard(draft.partial_path, 0, make_images(10))  # all shards written, never finalized

    assert not final.exists()
    assert not is_complete(final)
    assert not is_complete(draft.partial_path)
    with pytest.raises(GalleryError, match=r"incomplete.*re-run"):
        open_gallery(draft.partial_path)
    # Even under the final name (e.g. copied by hand), an unfinished gallery is refused.
    shutil.copytree(draft.partial_path, final)
    assert not is_complete(final)
    with pytest.raises(GalleryError, match="incomplete"):
        open_gallery(final)


def test_finalize_fails_clearly_when_a_shard_is_missing(tmp_path: Path) -> None:
    n = 3 * SHARD
    final = tmp_path / "s.zarr"
    draft = create_gallery(
        final, n, make_cells(n), make_candidates(1), {}, crop_px=CROP_PX, shard_cells=SHARD
    )
    images = make_images(n)
    for i in (0, 2):
        write_shard(draft.partial_path, i, images[i * SHARD : (i + 1) * SHARD])

    with pytest.raises(GalleryError, match=r"1 of 3 shards.*shard 1 \(cells 64-127\)"):
        finalize_gallery(draft)
    assert not final.exists()
    assert not is_complete(draft.partial_path)


def test_finalize_rejects_incomplete_or_mismatched_receipts(tmp_path: Path) -> None:
    n = 2 * SHARD
    draft = create_gallery(
        tmp_path / "s.zarr", n, make_cells(n), make_candidates(1), {}, crop_px=CROP_PX, shard_cells=SHARD
    )
    images = make_images(n)
    receipts = [
        write_shard(draft.partial_path, i, images[a:b]) for i, (a, b) in enumerate(draft.shard_ranges())
    ]

    with pytest.raises(GalleryError, match="receipts cover shards"):
        finalize_gallery(draft, receipts=receipts[:1])
    # Shard 1 rewritten with other crops after its receipt was issued: only the data check sees it.
    write_shard(draft.partial_path, 1, images[:SHARD])
    with pytest.raises(GalleryError, match=r"shard 1 .* differs"):
        finalize_gallery(draft, receipts=receipts, verify_data=True)
    assert not is_complete(draft.partial_path)


def _empty_draft(final: Path, n_cells: int) -> tuple[GalleryDraft, np.ndarray]:
    """A draft of ``n_cells`` cells with nothing written yet, and the images to write into it."""
    draft = create_gallery(
        final, n_cells, make_cells(n_cells), make_candidates(1), {}, crop_px=CROP_PX, shard_cells=SHARD
    )
    return draft, make_images(n_cells)


def test_receipts_without_checksums_finalize_but_cannot_be_verified(tmp_path: Path) -> None:
    final = tmp_path / "s.zarr"
    draft, images = _empty_draft(final, 2 * SHARD)
    ranges = draft.shard_ranges()
    assert write_shard(draft.partial_path, 0, images[:SHARD]).crc32 == images_checksum(images[:SHARD])
    receipts = [
        write_shard(draft.partial_path, i, images[a:b], checksum=False) for i, (a, b) in enumerate(ranges)
    ]
    assert [r.crc32 for r in receipts] == [None, None]
    with pytest.raises(ValueError, match="checksums"):
        finalize_gallery(draft, receipts=receipts, verify_data=True)
    assert not is_complete(draft.partial_path)
    finalize_gallery(draft, receipts=receipts)  # the rows are still checked
    np.testing.assert_array_equal(open_gallery(final).images[:], images)


def test_the_runner_does_not_compute_checksums_nobody_verifies(tmp_path: Path, monkeypatch) -> None:
    from pipeline import runner

    def no_checksum(images: np.ndarray) -> int:
        raise AssertionError("the runner's finalize never verifies data: no checksum is needed")

    monkeypatch.setattr(gallery_module, "images_checksum", no_checksum)
    draft, images = _empty_draft(tmp_path / "s.zarr", SHARD)
    receipt = runner._shard_task((0, [images[:10], images[10:]], None), str(draft.partial_path))
    assert (receipt.start, receipt.stop, receipt.crc32) == (0, SHARD, None)
    finalize_gallery(draft, receipts=[receipt])
    np.testing.assert_array_equal(open_gallery(draft.final_path).images[:], images)


def test_remove_partial_cleans_leftovers_only(tmp_path: Path) -> None:
    final, _ = write_gallery(tmp_path / "s.zarr", 3)
    draft = create_gallery(final, 2, make_cells(2), make_candidates(2), {}, crop_px=CROP_PX, overwrite=True)
    assert draft.partial_path.exists()

    assert remove_partial(final) == [draft.partial_path]
    assert not draft.partial_path.exists()
    assert is_complete(final)
    assert remove_partial(final) == []


def test_create_removes_stale_partial(tmp_path: Path) -> None:
    final = tmp_path / "s.zarr"
    stale = create_gallery(
        final, 5, make_cells(5), make_candidates(5), {"run": "crashed"}, crop_px=CROP_PX, shard_cells=SHARD
    )
    write_shard(stale.partial_path, 0, make_images(5))
    draft = create_gallery(
        final, 2, make_cells(2), make_candidates(2), {"run": "new"}, crop_px=CROP_PX, shard_cells=SHARD
    )
    write_shard(draft.partial_path, 0, make_images(2))
    finalize_gallery(draft)
    gallery = open_gallery(final)
    assert gallery.attrs["run"] == "new"
    assert len(gallery) == 2


def test_write_shard_validates_its_input(tmp_path: Path) -> None:
    draft = create_gallery(
        tmp_path / "s.zarr", 70, make_cells(70), make_candidates(1), {}, crop_px=CROP_PX, shard_cells=SHARD
    )
    images = make_images(70)
    with pytest.raises(ValueError, match="shape"):
        write_shard(draft.partial_path, 1, images[:SHARD])  # shard 1 holds 6 rows
    with pytest.raises(TypeError, match="uint8"):
        write_shard(draft.partial_path, 0, images[:SHARD].astype(np.uint16))
    with pytest.raises(ValueError, match="shard_index"):
        write_shard(draft.partial_path, 2, images[:6])
    with pytest.raises(GalleryError, match="no gallery draft"):
        write_shard(tmp_path / "missing.zarr", 0, images[:SHARD])


def test_write_shard_refuses_a_finished_gallery(tmp_path: Path) -> None:
    final, images = write_gallery(tmp_path / "s.zarr", 3)
    with pytest.raises(GalleryError, match="already complete"):
        write_shard(final, 0, images[::-1].copy())
    np.testing.assert_array_equal(open_gallery(final).images[:], images)


def test_open_gallery_errors(tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="no gallery at"):
        open_gallery(tmp_path / "missing.zarr")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(GalleryError, match="not a gallery"):
        open_gallery(tmp_path / "plain_dir")
    zarr.open_group(tmp_path / "other.zarr", mode="w", attributes={"format": "something-else"})
    with pytest.raises(GalleryError, match="not a bloodsmear-gallery"):
        open_gallery(tmp_path / "other.zarr")
    assert not is_complete(tmp_path / "missing.zarr")
    assert not is_complete(tmp_path / "plain_dir")


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    final, _ = write_gallery(tmp_path / "s.zarr", 2)
    group = zarr.open_group(final, mode="r+")
    group.attrs["format_version"] = GALLERY_FORMAT_VERSION + 1
    assert not is_complete(final)
    with pytest.raises(GalleryError, match="format version 2"):
        open_gallery(final)


def test_create_argument_checks(tmp_path: Path) -> None:
    final, _ = write_gallery(tmp_path / "s.zarr", 2)
    with pytest.raises(GalleryError, match=r"already exists.*overwrite"):
        create_gallery(final, 2, make_cells(2), make_candidates(2), {}, crop_px=CROP_PX, shard_cells=SHARD)
    with pytest.raises(ParameterError, match="shard_cells"):
        create_gallery(tmp_path / "a.zarr", 2, make_cells(2), make_candidates(2), {}, shard_cells=32)
    with pytest.raises(ParameterError, match="crop_px"):
        create_gallery(tmp_path / "a.zarr", 2, make_cells(2), make_candidates(2), {}, crop_px=0)
    with pytest.raises(ParameterError, match="crop_px"):
        create_gallery(tmp_path / "a.zarr", 2, make_cells(2), make_candidates(2), {}, crop_px=16.0)
    with pytest.raises(ParameterError, match="n_cells"):
        create_gallery(tmp_path / "a.zarr", -1, make_cells(2), make_candidates(2), {}, crop_px=CROP_PX)
    cells = make_cells(2)
    del cells["padded"]
    with pytest.raises(ValueError, match="padded"):
        create_gallery(
            tmp_path / "a.zarr", 2, cells, make_candidates(2), {}, crop_px=CROP_PX, shard_cells=SHARD
        )
    with pytest.raises(ValueError, match="3 rows"):
        create_gallery(
            tmp_path / "a.zarr", 3, make_cells(2), make_candidates(2), {}, crop_px=CROP_PX, shard_cells=SHARD
        )
    bad_strings = make_cells(2) | {"note": np.array(["a", None], dtype=object)}
    with pytest.raises(TypeError, match="cells/note"):
        create_gallery(
            tmp_path / "a.zarr", 2, bad_strings, make_candidates(2), {}, crop_px=CROP_PX, shard_cells=SHARD
        )
    with pytest.raises(ValueError, match="reserved"):
        create_gallery(tmp_path / "a.zarr", 2, make_cells(2), make_candidates(2), {"complete": True})
    assert not (tmp_path / "a.zarr").exists()
    # numpy integers are accepted and stored as JSON integers
    draft = create_gallery(tmp_path / "a.zarr", np.int64(2), make_cells(2), make_candidates(2), {}, crop_px=8)
    assert draft.n_cells == 2 and type(draft.n_cells) is int
    assert zarr.open_group(draft.partial_path, mode="r").attrs["n_cells"] == 2


def test_overwrite_refuses_to_delete_a_non_gallery(tmp_path: Path) -> None:
    precious = tmp_path / "s.zarr"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(GalleryError, match="not a gallery"):
        create_gallery(precious, 2, make_cells(2), make_candidates(2), {}, crop_px=CROP_PX, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "do not delete"


# ----------------------------------------------------------------------------------------------
# Overwrite: the final name always holds a whole gallery
# ----------------------------------------------------------------------------------------------


def _run_label(final: Path) -> str | None:
    """The ``run`` attribute of a complete gallery at ``final``; None if there is none."""
    return open_gallery(final).attrs["run"] if is_complete(final) else None


def _watch_renames(monkeypatch: pytest.MonkeyPatch, final: Path, seen: list[str | None]) -> None:
    """Record what the final name holds before and after every rename the module makes."""
    real_rename, real_exchange = os.rename, gallery_module._exchange_paths

    def rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        seen.append(_run_label(final))
        real_rename(src, dst)
        seen.append(_run_label(final))

    def exchange(a: Path, b: Path) -> bool:
        seen.append(_run_label(final))
        swapped = real_exchange(a, b)
        seen.append(_run_label(final))
        return swapped

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(gallery_module, "_exchange_paths", exchange)


def _overwrite(final: Path) -> None:
    draft = create_gallery(
        final, 3, make_cells(3), make_candidates(3), {"run": "new"}, overwrite=True, crop_px=8
    )
    write_shard(draft.partial_path, 0, make_images(3, 8))
    finalize_gallery(draft)


def test_overwrite_swaps_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe_a, probe_b = tmp_path / "probe_a", tmp_path / "probe_b"
    probe_a.mkdir()
    probe_b.mkdir()
    if not gallery_module._exchange_paths(probe_a, probe_b):
        pytest.skip("this file system cannot exchange directories atomically")
    final, _ = write_gallery(tmp_path / "s.zarr", 2, attrs={"run": "old"})
    seen: list[str | None] = []
    _watch_renames(monkeypatch, final, seen)

    _overwrite(final)

    assert seen and set(seen) <= {"old", "new"}  # never empty, never half written
    assert seen[0] == "old" and seen[-1] == "new"
    assert _run_label(final) == "new"
    assert len(open_gallery(final)) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_overwrite_fallback_never_exposes_a_partial_gallery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final, _ = write_gallery(tmp_path / "s.zarr", 2, attrs={"run": "old"})
    monkeypatch.setattr(gallery_module, "_exchange_paths", lambda a, b: False)  # e.g. NFS
    seen: list[str | None] = []
    real_rename = os.rename

    def rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        assert not os.path.lexists(final) or is_complete(final)
        real_rename(src, dst)
        assert not os.path.lexists(final) or is_complete(final)
        seen.append(_run_label(final))

    monkeypatch.setattr(os, "rename", rename)

    _overwrite(final)

    assert seen == [None, "new"]  # aside, then in: briefly absent, never half written
    assert _run_label(final) == "new"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ----------------------------------------------------------------------------------------------
# Strings, attributes and shard arithmetic
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        np.array(["", "a", "ünïcødé ✓", "x" * 300]),
        np.array(["", "a", "ünïcødé ✓", "x" * 300], dtype=object),
        np.array(["", "a", "ünïcødé ✓", "x" * 300], dtype=np.dtypes.StringDType()),
    ],
    ids=["unicode", "object", "stringdtype"],
)
def test_string_columns_round_trip_without_warnings(tmp_path: Path, values: np.ndarray) -> None:
    candidates = make_candidates(4) | {"reason": values, "note": values[::-1]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draft = create_gallery(
            tmp_path / "s.zarr", 0, make_cells(0), candidates, {}, crop_px=CROP_PX, shard_cells=SHARD
        )
        finalize_gallery(draft)
        table = open_gallery(tmp_path / "s.zarr").candidates
    assert table["reason"].tolist() == [str(v) for v in values]
    assert table["note"].tolist() == [str(v) for v in values[::-1]]


def test_attrs_are_json_safe(tmp_path: Path) -> None:
    attrs = {
        "mpp": np.float32(0.1),
        "level": np.int64(2),
        "flag": np.bool_(True),
        "slide_path": tmp_path / "slide.svs",
        "parameters": {"min_area_um2": np.float64(40.0), "sizes": np.array([1, 2]), "pair": (1, 2.5)},
        "timings_s": {"detect": np.float64("nan"), "crop": float("inf")},
        "vendor": np.str_("aperio"),
    }
    final, _ = write_gallery(tmp_path / "s.zarr", 2, attrs=attrs)

    def no_constants(name: str) -> float:
        raise AssertionError(f"zarr.json holds the non-JSON constant {name}")

    stored = json.loads((final / "zarr.json").read_text(), parse_constant=no_constants)["attributes"]
    assert stored["mpp"] == 0.1
    assert stored["level"] == 2 and stored["flag"] is True
    assert stored["slide_path"] == str(tmp_path / "slide.svs")
    assert stored["parameters"] == {"min_area_um2": 40.0, "sizes": [1, 2], "pair": [1, 2.5]}
    assert stored["timings_s"] == {"detect": None, "crop": None}
    assert stored["vendor"] == "aperio"
    assert open_gallery(final).attrs == stored
    json.dumps(stored, allow_nan=False)


def test_to_json_safe_rejects_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError, match=r"attrs\['blob'\] is a bytes"):
        to_json_safe({"blob": b"\x00"})
    with pytest.raises(TypeError, match="key"):
        to_json_safe({1: "one"})
    assert to_json_safe({"x": [np.uint8(3), None, math.pi]}) == {"x": [3, None, math.pi]}


@settings(deadline=None)  # pure arithmetic: a slow CI machine must not make it "flaky"
@given(st.integers(0, 5000), st.integers(1, 300))
def test_shard_ranges_tile_the_rows(n_cells: int, shard_cells: int) -> None:
    ranges = shard_ranges(n_cells, shard_cells)
    covered = [i for start, stop in ranges for i in range(start, stop)]
    assert covered == list(range(n_cells))
    assert all(stop - start == shard_cells for start, stop in ranges[:-1])
    assert all(0 < stop - start <= shard_cells for start, stop in ranges)


def test_images_checksum_matches_zlib() -> None:
    images = make_images(2)
    assert images_checksum(images) == zlib.crc32(images.tobytes())
    assert images_checksum(images[:, ::2]) == zlib.crc32(images[:, ::2].tobytes())  # non-contiguous
