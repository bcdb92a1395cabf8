"""The simulator: file format, truth, determinism, tile invariance, physical plausibility, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.simulate import TRUTH_COLUMNS, simulate_slide
from pipeline.simulate.presets import get_preset
from pipeline.simulate.render import SlideModel, render_region
from pipeline.simulate.scene import SceneSpec


def _od_sum(rgb: np.ndarray, white: np.ndarray) -> np.ndarray:
    rgb = np.maximum(rgb.astype(np.float32), 1.0)
    return -np.log10(rgb / white).sum(axis=-1)


def test_slide_opens_as_aperio_with_pyramid(mll23_slide):
    with openslide.OpenSlide(str(mll23_slide.slide_path)) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "aperio"
        assert float(props["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(props["openslide.mpp-y"]) == pytest.approx(0.25)
        assert float(props["openslide.objective-power"]) == pytest.approx(40)
        assert slide.dimensions == (12000, 12000)
        downsamples = slide.level_downsamples
        assert downsamples[:3] == pytest.approx((1, 4, 16), rel=1e-3)
        # a level near 1 um/px for the detection overview
        assert min(abs(0.25 * d - 1.0) for d in downsamples) < 0.05
        assert "thumbnail" in slide.associated_images


def test_truth_has_columns_and_many_classes(mll23_slide):
    truth = pd.read_csv(mll23_slide.truth_path)
    assert tuple(truth.columns) == TRUTH_COLUMNS
    assert truth["nucleated"].all()
    assert truth["cell_class"].nunique() >= 8
    assert set(truth["zone"]) == {"thick", "monolayer", "feathered"}
    assert truth["cell_id"].is_unique
    assert np.allclose(truth["x_um"], truth["x_px"] * 0.25)
    # cells are larger and flatter at the feathered edge
    assert (
        truth.loc[truth.zone == "feathered", "spread"].mean()
        > truth.loc[truth.zone == "monolayer", "spread"].mean()
    )
    # out-of-focus patches leave the focus filter something to reject (measured: 0.935, 43 cells out)
    assert 0.8 < truth["in_focus"].mean() < 0.98
    assert (~truth["in_focus"]).sum() >= 15


def _stained_ring_fraction(
    slide: openslide.OpenSlide, cell: pd.Series, mpp: float, white: np.ndarray
) -> float:
    """Share of stained pixels in the ring 1-4 um outside a white cell's rim."""
    rim_px, ring_px = cell.diameter_um / 2 / mpp + 1 / mpp, cell.diameter_um / 2 / mpp + 4 / mpp
    half = int(ring_px) + 2
    x, y = int(cell.x_px), int(cell.y_px)
    rgb = np.asarray(slide.read_region((x - half, y - half), 0, (2 * half, 2 * half)).convert("RGB"))
    od = _od_sum(rgb, white)
    yy, xx = np.mgrid[-half:half, -half:half]
    distance = np.hypot(xx, yy)
    return float((od[(distance > rim_px) & (distance < ring_px)] > 0.15).mean())


def test_red_cells_overlap_white_cells_in_the_thick_zone_only(mll23_slide):
    """Read from the pixels, not from the truth's ``touching`` (which the thick zone sets by definition).
    Measured on 40 cells per zone against the slide's tinted glass: thick 0.67-0.99 (median 0.85),
    monolayer 0-0.53 (median 0.08: as on real smears, a red cell touches a white cell now and then)."""
    truth = pd.read_csv(mll23_slide.truth_path)
    with openslide.OpenSlide(str(mll23_slide.slide_path)) as slide:
        # the slide's glass (tinted): the brightest pixels of the monolayer band
        strip = np.asarray(slide.read_region((4000, 0), 0, (4000, 12000)).convert("RGB"))
        white = np.percentile(strip.reshape(-1, 3), 99, axis=0).astype(np.float32)
        ring = {
            zone: np.array(
                [_stained_ring_fraction(slide, c, 0.25, white) for _, c in cells.head(40).iterrows()]
            )
            for zone, cells in truth.groupby("zone")
        }
    assert np.median(ring["thick"]) > 0.65 and ring["thick"].min() > 0.4
    assert np.median(ring["monolayer"]) < 0.2 and np.percentile(ring["monolayer"], 90) < 0.45


def test_nucleated_centres_are_stained_and_glass_is_bright(mll23_slide):
    truth = pd.read_csv(mll23_slide.truth_path)
    cells = truth[(truth.zone == "monolayer") & truth.in_focus & ~truth.touching]
    assert len(cells) >= 20
    with openslide.OpenSlide(str(mll23_slide.slide_path)) as slide:
        # the monolayer band of an 'across' slide: read a strip and estimate the glass white
        strip = np.asarray(slide.read_region((4000, 0), 0, (4000, 12000)).convert("RGB"))
        white = np.percentile(strip.reshape(-1, 3), 99, axis=0).astype(np.float32)
        assert (white > 200).all(), f"glass should be bright, got {white}"
        od = _od_sum(strip, white)
        near_cell = np.zeros(od.shape, dtype=bool)
        peaks = []
        for x, y in zip(cells.x_px, cells.y_px, strict=True):
            xi, yi = int(x) - 4000, int(y)
            if not (40 <= xi < 4000 - 40 and 40 <= yi < 12000 - 40):
                continue
            near_cell[yi - 40 : yi + 40, xi - 40 : xi + 40] = True
            peaks.append(od[yi - 8 : yi + 9, xi - 8 : xi + 9].max())  # within 2 um of the centre
        red_cell_level = np.percentile(od[~near_cell], 99.5)
    assert len(peaks) >= 15
    assert np.median(peaks) > 2.0 * red_cell_level
    assert np.mean(np.asarray(peaks) > 1.5 * red_cell_level) > 0.95


def test_same_seed_same_slide_whatever_workers_and_chunks(tmp_path):
    kwargs = dict(width_mm=0.6, height_mm=0.5, seed=7, preset="normal", placement="across", progress=False)
    a = simulate_slide(tmp_path / "a.svs", workers=0, chunk_px=1024, **kwargs)
    b = simulate_slide(tmp_path / "b.svs", workers=2, chunk_px=256, **kwargs)
    c = simulate_slide(tmp_path / "c.svs", workers=0, chunk_px=512, **{**kwargs, "seed": 8})
    pa, pb, pc = (tifffile.imread(r.slide_path, level=0) for r in (a, b, c))
    assert np.array_equal(pa, pb)
    assert not np.array_equal(pa, pc)
    for level in (1, 2):
        assert np.array_equal(
            tifffile.imread(a.slide_path, level=level), tifffile.imread(b.slide_path, level=level)
        )
    pd.testing.assert_frame_equal(pd.read_csv(a.truth_path), pd.read_csv(b.truth_path))


@settings(max_examples=12, deadline=None)
@given(
    x=st.integers(0, 700),
    y=st.integers(0, 700),
    w=st.integers(1, 300),
    h=st.integers(1, 300),
)
def test_rendering_is_tile_invariant(x, y, w, h):
    model = _invariance_model()
    whole = _invariance_whole()
    part = render_region(model, 1000 + x, 1000 + y, w, h).rgb
    assert np.array_equal(part, whole[y : y + h, x : x + w])


_CACHE: dict[str, object] = {}


def _invariance_model() -> SlideModel:
    if "model" not in _CACHE:
        _CACHE["model"] = SlideModel(SceneSpec(8000, 8000, 0.25, 11, get_preset("mll23"), "across"))
    return _CACHE["model"]  # type: ignore[return-value]


def _invariance_whole() -> np.ndarray:
    if "whole" not in _CACHE:
        _CACHE["whole"] = render_region(_invariance_model(), 1000, 1000, 1000, 1000).rgb
    return _CACHE["whole"]  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width-mm", "0"], "--width-mm"),
        (["--height-mm", "100"], "--height-mm"),
        (["--mpp", "5"], "--mpp"),
        (["--chunk-px", "300"], "multiple of 256"),
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path, args, message):
    out = tmp_path / "x.svs"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "simulate", str(out), "--workers", "0", "--quiet", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_output_paths(tmp_path):
    with pytest.raises(Exception, match=r"\.svs"):
        simulate_slide(tmp_path / "x.tif", width_mm=0.3, height_mm=0.3, workers=0, progress=False)
    with pytest.raises(Exception, match="does not exist"):
        simulate_slide(tmp_path / "missing" / "x.svs", width_mm=0.3, height_mm=0.3, workers=0, progress=False)


def test_unknown_preset_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "simulate", str(tmp_path / "x.svs"), "--preset", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_presets_shift_the_differential(tmp_path):
    aml = simulate_slide(
        tmp_path / "aml.svs", width_mm=1.0, height_mm=1.0, seed=1, preset="aml", workers=0, progress=False
    )
    normal = simulate_slide(
        tmp_path / "normal.svs",
        width_mm=1.0,
        height_mm=1.0,
        seed=1,
        preset="normal",
        workers=0,
        progress=False,
    )
    aml_truth = pd.read_csv(aml.truth_path)
    normal_truth = pd.read_csv(normal.truth_path)
    assert len(aml_truth) > 3 * len(normal_truth)  # leukaemic white count
    assert (aml_truth.cell_class == "myeloblast").mean() > 0.4
    assert (normal_truth.cell_class == "myeloblast").sum() == 0


def test_level1_pieces_read_back_as_rows(tmp_path):
    from pipeline.simulate._level1 import Level1Store

    store = Level1Store.create(tmp_path / "l1", width=300, height=200, chunk_px=512)  # pieces of 128
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 255, (256, 384, 3), dtype=np.uint8)
    for y in range(0, 256, 128):
        for x in range(0, 384, 128):
            if (y, x) != (128, 256):  # one piece never written: it reads as white
                store.write(y, x, whole[y : y + 128, x : x + 128])
    rows = store.rows(100, 220)
    assert rows.shape == (100, 300, 3)  # clipped to the level's height and width
    assert np.array_equal(rows[:, :256], whole[100:200, :256])
    assert np.array_equal(rows[:28, 256:], whole[100:128, 256:300])
    assert (rows[28:, 256:] == 255).all()


def test_blur_of_a_region_equals_the_same_pixels_of_a_larger_one():
    """Each pixel blends its own two blur levels: a region where the index spans several levels (out of
    focus patches) gives the pixels of a larger region, whatever levels the rest of either needs."""
    from pipeline.simulate.optics import BLUR_LEVELS_UM, apply_blur, blur_halo_px

    mpp = 0.25
    rng = np.random.default_rng(3)
    halo = blur_halo_px(mpp)
    h = w = 300
    canvas = rng.random((h + 2 * halo, w + 2 * halo, 3), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    index = np.clip((xx + yy) / (h + w) * (len(BLUR_LEVELS_UM) - 0.5), 0, len(BLUR_LEVELS_UM) - 1)
    index = np.ascontiguousarray(index, dtype=np.float32)
    whole = apply_blur(canvas, halo, index, mpp).copy()
    for y0, x0, sh, sw in [(0, 0, 40, 50), (100, 120, 60, 30), (250, 200, 50, 100), (10, 280, 7, 20)]:
        sub_index = np.ascontiguousarray(index[y0 : y0 + sh, x0 : x0 + sw])
        sub_halo = blur_halo_px(mpp, sub_index)  # only the context this region's levels need
        sub = canvas[
            halo + y0 - sub_halo : halo + y0 + sh + sub_halo, halo + x0 - sub_halo : halo + x0 + sw + sub_halo
        ]
        part = apply_blur(np.ascontiguousarray(sub), sub_halo, sub_index, mpp)
        assert np.array_equal(part, whole[y0 : y0 + sh, x0 : x0 + sw]), (y0, x0)


def _raw_tiles(path, page: int) -> list[bytes]:
    """The stored (still encoded) tiles of one page of a TIFF, in order."""
    with tifffile.TiffFile(path) as tif:
        pg, fh = tif.pages[page], tif.filehandle
        tiles = []
        for offset, count in zip(pg.dataoffsets, pg.databytecounts, strict=True):
            fh.seek(offset)
            tiles.append(fh.read(count))
        return tiles


@pytest.mark.parametrize(
    ("workers", "height_px"),
    [(0, 4 * (1024 + 32)), (2, 4 * (1024 + 32)), (2, 4 * (1024 + 301) - 3)],
)
def test_reduced_levels_are_the_rendered_pixels_reduced(tmp_path, workers, height_px):
    """Level 1 is encoded a band at a time as the render goes (on the workers when there are some): its
    tiles are, to the byte, those of the whole rendered level 0 reduced 4x and cut into tiles; level 2
    is that level reduced 4x in bands of 1024 rows, and the thumbnail that reduced again. Two bands
    (1056 or 1325 level-1 rows: the last band's rows a multiple of 4 or not) and pieces of 128 px, so
    each band is read back from many chunks, some rendered by each worker."""
    import cv2

    from pipeline.simulate.presets import parse_artefacts
    from pipeline.simulate.svs import encode_tile, thumbnail_from, tiles_of

    mpp, width_px = 1.0, 300
    result = simulate_slide(
        tmp_path / "s.svs",
        width_mm=width_px * mpp / 1000,
        height_mm=height_px * mpp / 1000,
        seed=5,
        mpp=mpp,
        placement="across",
        workers=workers,
        chunk_px=512,
        progress=False,
    )
    model = SlideModel(
        SceneSpec(width_px, height_px, mpp, 5, get_preset("normal"), "across", parse_artefacts("all"))
    )
    tiled_px = -(-height_px // 256) * 256
    padded = render_region(model, 0, 0, 512, tiled_px).rgb  # whole tiles, as the chunks render them
    level1 = cv2.resize(padded, (512 // 4, tiled_px // 4), interpolation=cv2.INTER_AREA)
    level1 = level1[: -(-height_px // 4), : width_px // 4]
    assert _raw_tiles(result.slide_path, 2) == [encode_tile(t) for t in tiles_of(level1)]
    level2 = np.concatenate(
        [
            cv2.resize(band, (19, -(-band.shape[0] // 4)), interpolation=cv2.INTER_AREA)  # 19: ceil(75 / 4)
            for band in (level1[y : y + 1024] for y in range(0, level1.shape[0], 1024))
        ]
    )
    assert _raw_tiles(result.slide_path, 3) == [encode_tile(t) for t in tiles_of(level2)]
    thumbnail = tifffile.imread(result.slide_path, key=1).astype(int)
    # JPEG at quality 90, with its colour at half resolution, of an image only 19 px wide
    assert np.abs(thumbnail - thumbnail_from(level2)).mean() < 5.0


def test_local_workers_start_with_the_renderer_imported():
    """simulate_slide's local workers are forked from a server that imported Dask and the renderer once,
    rather than each importing them after the cluster is up."""
    from pipeline.simulate.run import _local_client, _start_worker_server

    def renderer_imported() -> bool:
        import sys

        return "pipeline.simulate.run" in sys.modules

    forked = _start_worker_server(0, 0.25)
    assert forked  # Linux: there is a fork server
    with _local_client(2, forked) as client:
        client.wait_for_workers(2)
        imported = client.run(renderer_imported)  # before any task could have imported it
    assert list(imported.values()) == [True, True]


_BANKS_PROBE = """
import os

import numpy as np

from pipeline.simulate.run import WARM_BANKS_ENV, _local_client, _start_worker_server


def banks_built(seed, mpp):
    from pipeline.simulate.optics import noise_bank
    from pipeline.simulate.render import _od_bank, warm_banks

    misses = _od_bank.cache_info().misses, noise_bank.cache_info().misses
    warm_banks(seed, mpp)  # a miss would build a bank here, in the worker
    return misses == (_od_bank.cache_info().misses, noise_bank.cache_info().misses)


forked = _start_worker_server(np.int64(5), np.float64(0.3))  # numpy scalars, as a caller may pass
with _local_client(2, forked) as client:
    client.wait_for_workers(2)
    print(sorted(client.run(banks_built, 5, 0.3).values()), sorted(client.run(banks_built, 6, 0.3).values()))
    print(WARM_BANKS_ENV in os.environ, sorted(client.run(lambda: WARM_BANKS_ENV in os.environ).values()))
"""


def test_local_workers_start_with_the_slides_banks_built():
    """The fork server builds the slide's sprite and noise banks once; its workers start with them
    (and build those of another slide themselves), and the variable that asked for them is gone from
    the driver, the server and the workers. In a fresh process: the server starts only once."""
    out = subprocess.run([sys.executable, "-c", _BANKS_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[True, True] [False, False]", "False [False, False]"], out.stderr
    assert "Traceback" not in out.stderr  # the fork server's start went through


def test_smooth_fields_are_their_grid_interpolated_at_pixel_centres():
    """The blur index and the glass of a region are their grid values (every FIELD_GRID_PX px, the glass
    with its camera field's terms) interpolated bilinearly at each pixel's centre, whichever block of
    the region, and however the region is cut, a pixel lies in."""
    from pipeline.simulate.optics import (
        FIELD_GRID_PX,
        SMOOTH_BLOCK_PX,
        _field_factor,
        _grid_values,
        smooth_fields,
    )

    optics = _invariance_model().optics
    y0, x0, h, w = 1037, 1511, 700, 600  # across several blocks, none aligned
    index, glass = smooth_fields(optics, y0, x0, h, w)
    rng = np.random.default_rng(5)
    fw, fh = optics.field_px
    for y, x in zip(
        rng.integers(y0, y0 + h, 300).tolist(), rng.integers(x0, x0 + w, 300).tolist(), strict=True
    ):
        gy, gx = (y + 0.5) / FIELD_GRID_PX, (x + 0.5) / FIELD_GRID_PX  # pixel centre on the grid
        ky, kx = int(gy), int(gx)
        points_y = np.array([ky, ky + 1], dtype=np.float64) * FIELD_GRID_PX
        points_x = np.array([kx, kx + 1], dtype=np.float64) * FIELD_GRID_PX
        values = _grid_values(optics, points_y, points_x).astype(np.float64)
        by, bx = y // SMOOTH_BLOCK_PX, x // SMOOTH_BLOCK_PX
        values[..., 1:] *= _field_factor(
            optics, points_y, points_x, by * SMOOTH_BLOCK_PX // fh, bx * SMOOTH_BLOCK_PX // fw
        )
        ty, tx = gy - ky, gx - kx
        expected = (
            (1 - ty) * (1 - tx) * values[0, 0]
            + (1 - ty) * tx * values[0, 1]
            + ty * (1 - tx) * values[1, 0]
            + ty * tx * values[1, 1]
        )
        assert index[y - y0, x - x0] == pytest.approx(expected[0], abs=1e-4), (y, x)
        assert glass.at(y, x, y + 1, x + 1)[0, 0] == pytest.approx(expected[1:], rel=1e-4), (y, x)


def test_noise_patterns_are_the_blocks_upright_and_upside_down():
    """Each noise block of a slide comes upright and upside down (64 patterns from 32 draws), stored
    contiguous, and another seed draws other blocks."""
    from pipeline.simulate.optics import N_NOISE_BLOCKS, noise_bank

    bank = noise_bank(12)
    assert len(bank) == 2 * N_NOISE_BLOCKS
    for k in range(N_NOISE_BLOCKS):
        assert np.array_equal(bank[2 * k + 1], bank[2 * k][::-1])
        assert bank[2 * k + 1].flags["C_CONTIGUOUS"]
    assert not np.array_equal(bank[2], bank[0])
    assert not np.array_equal(noise_bank(13)[0], bank[0])


def test_bench_in_process_digest_is_the_slides_whatever_the_chunk_size():
    """``bench_simulate --in-process`` (per-chunk render CPU, and a digest to compare checkouts by) digests
    the slide's tiles, not the chunks it cut it into."""
    digests = []
    for chunk_px in (256, 512):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_simulate",
                "--sizes",
                "0.3",
                "--in-process",
                "--chunk-px",
                str(chunk_px),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert "CPU-ms per chunk" in out.stdout
        digests.append(out.stdout.split("tiles digest ")[1].split()[0])
    assert digests[0] == digests[1]
