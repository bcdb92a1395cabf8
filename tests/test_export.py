"""Gallery API (pipeline.open_gallery), export to images / CSV / GeoJSON, and crop presets."""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import pandas as pd
import pytest
import tifffile

from pipeline.crop_presets import CROP_PRESETS, match_crop_preset, resolve_crop
from pipeline.errors import GalleryError, ParameterError
from pipeline.export import circle_polygon, export_galleries, export_gallery, export_images, image_file_name
from pipeline.gallery import Gallery, create_gallery, finalize_gallery, open_gallery, write_shard
from pipeline.quality import REASONS

MPP = 0.25
NAME_RE = re.compile(r"^(?P<stem>.+)_(?P<index>\d{5,})_x(?P<x>\d+)_y(?P<y>\d+)\.(?P<ext>png|jpg|tiff)$")

# RFC 7946 FeatureCollection of Polygon features, with the properties QuPath reads on import
# (qupath.lib.io.PathObjectTypeAdapters): objectType, classification {name, color}, measurements as a
# name -> number map, metadata as name -> string.
_POSITION = {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}}
GEOJSON_SCHEMA = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "id", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "id": {"type": "string"},
                    "geometry": {
                        "type": "object",
                        "required": ["type", "coordinates"],
                        "properties": {
                            "type": {"const": "Polygon"},
                            "coordinates": {
                                "type": "array",
                                "minItems": 1,
                                "items": {"type": "array", "minItems": 4, "items": _POSITION},
                            },
                        },
                    },
                    "properties": {
                        "type": "object",
                        "required": ["objectType", "classification", "measurements"],
                        "properties": {
                            "objectType": {"const": "detection"},
                            "name": {"type": "string"},
                            "classification": {
                                "type": "object",
                                "required": ["name", "color"],
                                "properties": {
                                    "name": {"type": "string", "minLength": 1},
                                    "color": {
                                        "type": "array",
                                        "minItems": 3,
                                        "maxItems": 3,
                                        "items": {"type": "integer", "minimum": 0, "maximum": 255},
                                    },
                                },
                            },
                            "measurements": {"type": "object", "additionalProperties": {"type": "number"}},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}


def _smooth_crops(n: int, crop_px: int, seed: int) -> np.ndarray:
    """Crops with smooth content (JPEG-friendly) that differ from one another."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:crop_px, 0:crop_px] / crop_px
    crops = np.empty((n, crop_px, crop_px, 3), dtype=np.uint8)
    for i in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        for c in range(3):
            base = rng.uniform(150, 240)
            crops[i, :, :, c] = np.clip(base - rng.uniform(60, 140) * blob + 10 * xx, 0, 255)
    return crops


def make_gallery(
    out_dir: Path,
    stem: str = "slide1",
    n_cells: int = 70,
    n_rejected: int = 30,
    crop_px: int = 32,
    crop_um: float = 25.0,
    shard_cells: int = 64,
    seed: int = 0,
) -> tuple[Path, np.ndarray]:
    """A finished gallery written with the gallery module alone (no slide): fast and fully known."""
    rng = np.random.default_rng(seed)
    n_candidates = n_cells + n_rejected
    x_px = rng.uniform(0, 4000, n_candidates)
    y_px = rng.uniform(0, 3000, n_candidates)
    accepted = np.zeros(n_candidates, dtype=bool)
    accepted[rng.permutation(n_candidates)[:n_cells]] = True
    reason = np.where(accepted, "", np.array(REASONS)[rng.integers(0, len(REASONS), n_candidates)])
    cell_index = np.full(n_candidates, -1)
    cell_index[accepted] = np.arange(n_cells)
    gap_um = rng.uniform(0, 20, n_candidates)
    gap_um[0] = np.inf  # a lone cell: no neighbour
    candidates = {
        "x_px": x_px,
        "y_px": y_px,
        "area_um2": rng.uniform(40, 400, n_candidates),
        "quality": rng.uniform(0, 1, n_candidates),
        "gap_um": gap_um,
        "accepted": accepted,
        "reason": reason.astype(str),
        "cell_index": cell_index,
    }
    which = np.flatnonzero(accepted)
    # Cells are re-centred: their crop centre is near, not at, the candidate centroid.
    cells = {
        "cell_id": np.arange(n_cells),
        "candidate_index": which,
        "x_px": x_px[which] + rng.normal(0, 2, n_cells),
        "y_px": y_px[which] + rng.normal(0, 2, n_cells),
        "area_um2": candidates["area_um2"][which],
        "quality": candidates["quality"][which],
        "padded": rng.uniform(size=n_cells) < 0.1,
        "gap_um": gap_um[which],
        "blur_um": np.where(rng.uniform(size=n_cells) < 0.1, np.nan, rng.uniform(0.2, 0.8, n_cells)),
    }
    attrs = {
        "slide": {"path": f"/data/{stem}.svs", "mpp": MPP, "dimensions": [4000, 3000], "vendor": "aperio"},
        "parameters": {"crop": {"crop_um": crop_um, "crop_px": crop_px}},
    }
    final = out_dir / f"{stem}.zarr"
    draft = create_gallery(final, n_cells, cells, candidates, attrs, crop_px=crop_px, shard_cells=shard_cells)
    crops = _smooth_crops(n_cells, crop_px, seed)
    receipts = [
        write_shard(draft.partial_path, i, crops[start:stop])
        for i, (start, stop) in enumerate(draft.shard_ranges())
    ]
    finalize_gallery(draft, receipts=receipts)
    return final, crops


@pytest.fixture(scope="module")
def gallery_and_crops(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    return make_gallery(tmp_path_factory.mktemp("gallery"))


# ------------------------------------------------------------------------------------------ gallery API


def test_import_pipeline_does_not_load_zarr_and_serves_open_gallery(gallery_and_crops):
    path, _ = gallery_and_crops
    code = (
        "import sys, pipeline\n"
        "assert 'zarr' not in sys.modules and 'pandas' not in sys.modules, 'import pipeline is not light'\n"
        f"g = pipeline.open_gallery({str(path)!r})\n"
        "print(len(g), type(g).__name__, 'open_gallery' in dir(pipeline))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["70", "Gallery", "True"]


HEAVY_MODULES = ("zarr", "pandas", "cv2", "pipeline.export")


def _modules_loaded_by(code: str) -> list[str]:
    """Which of :data:`HEAVY_MODULES` a fresh interpreter has imported after running ``code``."""
    check = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60
    )
    return proc.stdout.split()


def test_the_command_line_parser_does_not_import_export_libraries():
    """``python -m pipeline ...`` builds every subcommand's parser first: export's must not cost the
    second that importing OpenCV, pandas and zarr takes."""
    assert _modules_loaded_by("import pipeline.cli") == []
    build = (
        "import argparse, pipeline.cli as cli\n"
        "sub = argparse.ArgumentParser().add_subparsers()\n"
        "cli._add_run(sub); cli._add_evaluate(sub); cli._add_export(sub)"
    )
    assert _modules_loaded_by(build) == []


def test_building_the_whole_parser_imports_no_heavy_library():
    assert _modules_loaded_by("import pipeline.cli as cli\ncli.build_parser()") == []


def test_open_gallery_is_a_map_style_dataset(gallery_and_crops):
    import pipeline

    path, crops = gallery_and_crops
    gallery = pipeline.open_gallery(path)
    assert isinstance(gallery, pipeline.Gallery)
    assert len(gallery) == len(gallery.cells) == gallery.images.shape[0] == len(crops)
    assert gallery.images.shape[1:] == (32, 32, 3) and gallery.images.dtype == np.uint8
    assert not isinstance(gallery.images, np.ndarray)  # lazy: read on slicing
    assert len(gallery.candidates) == 100
    assert gallery.attrs["slide"]["mpp"] == MPP
    for index in (0, 63, 64, 69, -1):  # both sides of the shard boundary, and from the end
        image, row = gallery[index]
        assert isinstance(image, np.ndarray)
        np.testing.assert_array_equal(image, crops[index])
        expected = gallery.cells.iloc[index].to_dict()
        assert row.keys() == expected.keys()
        assert row["cell_id"] == expected["cell_id"] and row["x_px"] == expected["x_px"]
    with pytest.raises(IndexError):
        gallery[70]
    with pytest.raises(TypeError):
        gallery["0"]


def _checksum(args: tuple[Gallery, int]) -> int:
    gallery, index = args
    image, row = gallery[index]
    return int(image.astype(np.int64).sum()) + int(row["cell_id"])


def test_gallery_is_read_from_forked_workers_like_a_dataloader(gallery_and_crops):
    """PyTorch's DataLoader forks workers that index a Dataset opened in the parent (Linux default)."""
    path, crops = gallery_and_crops
    gallery = open_gallery(path)
    gallery[0]  # the parent has read before forking, as a Dataset that was inspected first
    indices = [3, 64, 69]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        # a timeout: a worker that hangs on a handle inherited from the parent must fail, not block CI
        sums = pool.map_async(_checksum, [(gallery, i) for i in indices], chunksize=1).get(timeout=60)
    assert sums == [int(crops[i].astype(np.int64).sum()) + i for i in indices]


# ------------------------------------------------------------------------------------------ images


def test_png_export_writes_exactly_one_lossless_file_per_cell(gallery_and_crops, tmp_path):
    path, crops = gallery_and_crops
    result = export_gallery(path, tmp_path, "png", progress=False)
    gallery = open_gallery(path)
    files = sorted((tmp_path / "slide1").glob("*.png"))
    assert result.n_images == len(files) == len(gallery) == 70
    assert result.image_dir == tmp_path / "slide1"
    table = pd.read_csv(tmp_path / "slide1" / "slide1.cells.csv")
    assert table["file"].tolist() == [f.name for f in files]  # zero-padded: name order is gallery order
    for i, name in enumerate(table["file"]):
        match = NAME_RE.match(name)
        assert match, name
        assert match["stem"] == "slide1" and int(match["index"]) == i
        assert int(match["x"]) == math.floor(gallery.cells["x_px"][i])
        assert int(match["y"]) == math.floor(gallery.cells["y_px"][i])
        rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "slide1" / name)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(rgb, crops[i])
    assert (table["slide"] == "slide1").all()
    for column in gallery.cells.columns:
        values = gallery.cells[column].to_numpy(float)
        expected = np.where(np.isinf(values), np.nan, values)  # no value: an empty field, as in GeoJSON
        np.testing.assert_allclose(table[column].to_numpy(float), expected, rtol=1e-12)
    assert not list(tmp_path.glob(".*partial"))


def test_tiff_export_is_lossless_and_carries_the_crop_scale(gallery_and_crops, tmp_path):
    path, crops = gallery_and_crops
    export_gallery(path, tmp_path, "tiff", progress=False)
    files = sorted((tmp_path / "slide1").glob("*.tiff"))
    assert len(files) == 70
    with tifffile.TiffFile(files[5]) as tif:
        page = tif.pages[0]
        np.testing.assert_array_equal(page.asarray(), crops[5])
        numerator, denominator = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        # 32 px over 25 um, per cm
        assert numerator / denominator == pytest.approx(32 / 25.0 * 1e4, rel=1e-6)
        assert json.loads(page.description)["index"] == 5


def test_jpeg_export_is_close_to_the_crops(gallery_and_crops, tmp_path):
    path, crops = gallery_and_crops
    export_gallery(path, tmp_path, "jpeg", jpeg_quality=95, progress=False)
    files = sorted((tmp_path / "slide1").glob("*.jpg"))
    assert len(files) == 70
    rgb = cv2.cvtColor(cv2.imread(str(files[10])), cv2.COLOR_BGR2RGB).astype(float)
    assert np.abs(rgb - crops[10]).mean() < 3.0
    assert np.abs(rgb - crops[11]).mean() > 3.0  # and it is that crop, not another


class _CountingImages:
    """Stands in for the zarr array and records every read."""

    def __init__(self, images: np.ndarray) -> None:
        self._images = images
        self.shape = images.shape
        self.reads: list[int] = []

    def __getitem__(self, key: slice) -> np.ndarray:
        block = self._images[key]
        self.reads.append(len(block) if block.ndim == 4 else 1)
        return block


def test_export_streams_one_shard_at_a_time(gallery_and_crops, tmp_path):
    path, crops = gallery_and_crops
    opened = open_gallery(path)
    counting = _CountingImages(crops)
    gallery = Gallery(opened.path, counting, opened.cells, opened.candidates, opened.attrs)  # type: ignore[arg-type]
    _, names = export_images(gallery, tmp_path, "png", progress=False)
    assert len(names) == 70
    assert counting.reads == [64, 6]  # never more than one shard in memory, each crop read once


def test_a_second_export_needs_overwrite_which_replaces_it(gallery_and_crops, tmp_path):
    path, _ = gallery_and_crops
    export_gallery(path, tmp_path, "png", progress=False)
    (tmp_path / "slide1" / "stale.png").write_bytes(b"")
    with pytest.raises(GalleryError) as refused:
        export_gallery(path, tmp_path, "jpeg", progress=False)
    folder = tmp_path / "slide1"
    assert (
        str(refused.value) == f"{folder} already exists from an earlier export; add --overwrite to replace it"
    )
    export_gallery(path, tmp_path, "jpeg", overwrite=True, progress=False)
    names = sorted(p.name for p in (tmp_path / "slide1").iterdir())
    assert "stale.png" not in names and "slide1.cells.csv" in names
    assert sum(n.endswith(".jpg") for n in names) == 70 and len(names) == 71


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_an_export_leaves_other_exports_temporary_folders_alone(gallery_and_crops, tmp_path):
    path, _ = gallery_and_crops
    # another export of this slide at work: under the old fixed name, and under a name of the new form
    others = [tmp_path / ".slide1.export.partial", tmp_path / ".slide1.export.999999-0123456789ab.partial"]
    for other in others:
        other.mkdir()
        (other / "slide1_00000_x1_y1.png").write_bytes(b"theirs")
    export_gallery(path, tmp_path, "png", progress=False)
    assert len(list((tmp_path / "slide1").glob("*.png"))) == 70
    for other in others:
        assert (other / "slide1_00000_x1_y1.png").read_bytes() == b"theirs"
    assert _hidden(tmp_path) == sorted(other.name for other in others)  # ours is gone


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_exports_of_one_slide_at_once_do_not_mix(gallery_and_crops, tmp_path, monkeypatch, overwrite):
    import pipeline.export as export_module

    path, crops = gallery_and_crops
    publish = export_module._publish
    both_written = threading.Barrier(2, timeout=60)
    publishing = threading.Lock()

    def publish_after_the_other_wrote(*args: Any) -> None:
        both_written.wait()  # both exports have written every image: they overlap for sure
        with publishing:  # then one after the other, so the outcome does not depend on timing
            publish(*args)

    monkeypatch.setattr(export_module, "_publish", publish_after_the_other_wrote)
    outcomes: list[str] = []

    def one(fmt: str) -> None:
        try:
            export_gallery(path, tmp_path, fmt, overwrite=overwrite, progress=False)
            outcomes.append(fmt)
        except GalleryError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=one, args=(fmt,)) for fmt in ("png", "tiff")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 2
    written = sorted(p.name for p in (tmp_path / "slide1").iterdir())
    if overwrite:  # both finish; the later one replaced the earlier one as a whole
        assert sorted(outcomes) == ["png", "tiff"]
    else:  # the later one finds the folder taken and says so
        assert sum(o in ("png", "tiff") for o in outcomes) == 1
        assert any("another export" in o and "--overwrite" in o for o in outcomes), outcomes
    images = [name for name in written if not name.endswith(".csv")]
    extensions = {name.rsplit(".", 1)[1] for name in images}
    assert len(extensions) == 1 and len(images) == 70 and len(written) == 71  # one export's, not a mix
    for index in (0, 69):  # whole files (both formats are lossless), in gallery order
        image = tmp_path / "slide1" / images[index]
        if image.suffix == ".png":
            rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
        else:
            rgb = tifffile.imread(image)
        np.testing.assert_array_equal(rgb, crops[index])
    assert _hidden(tmp_path) == []  # each removed its own temporary folder, and only that


def test_galleries_of_one_stem_are_refused_before_anything_is_written(tmp_path, capsys):
    from pipeline.cli import main

    first, _ = make_gallery(tmp_path / "a", "slide1", n_cells=3, n_rejected=1)
    second, _ = make_gallery(tmp_path / "b", "slide1", n_cells=4, n_rejected=1, seed=1)
    other, _ = make_gallery(tmp_path / "a", "slide2", n_cells=2, n_rejected=1, seed=2)
    out = tmp_path / "out"
    with pytest.raises(ParameterError, match="would both export as 'slide1'") as refused:
        export_galleries([other, first, second], out, "png", progress=False)
    assert str(first) in str(refused.value) and str(second) in str(refused.value)
    assert not out.exists()  # refused before the first gallery, even one with a free stem
    capsys.readouterr()
    assert main(["export", str(other), str(first), str(second), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(first) in err and "Traceback" not in err
    assert not out.exists()
    results = list(export_galleries([first, other], out, "csv", progress=False))
    assert [r.gallery for r in results] == [first, other]
    assert sorted(p.name for p in out.iterdir()) == [
        "slide1.candidates.csv", "slide1.cells.csv", "slide2.candidates.csv", "slide2.cells.csv",
    ]  # fmt: skip


def test_unknown_format_and_bad_quality_are_user_errors(gallery_and_crops, tmp_path):
    path, _ = gallery_and_crops
    with pytest.raises(ParameterError, match="bmp"):
        export_gallery(path, tmp_path, "bmp")
    with pytest.raises(ParameterError, match="jpeg-quality"):
        export_gallery(path, tmp_path, "jpeg", jpeg_quality=0)


def test_csv_export_writes_both_tables(gallery_and_crops, tmp_path):
    path, _ = gallery_and_crops
    result = export_gallery(path, tmp_path, "csv")
    cells = pd.read_csv(tmp_path / "slide1.cells.csv")
    candidates = pd.read_csv(tmp_path / "slide1.candidates.csv", keep_default_na=False)
    assert result.files == [tmp_path / "slide1.cells.csv", tmp_path / "slide1.candidates.csv"]
    assert len(cells) == 70 and len(candidates) == 100 and result.n_accepted == 70
    assert candidates["candidate_index"].tolist() == list(range(100))
    rejected = ~candidates["accepted"].astype(bool)
    assert int(rejected.sum()) == 30 and set(candidates.loc[rejected, "reason"]) <= set(REASONS)


def test_csv_export_leaves_gap_um_empty_for_a_cell_with_no_neighbour(gallery_and_crops, tmp_path):
    path, _ = gallery_and_crops
    export_gallery(path, tmp_path, "csv")
    gallery = open_gallery(path)
    lone = np.isinf(gallery.candidates["gap_um"].to_numpy(float))
    assert lone.sum() >= 1  # the fixture has one
    for name in ("slide1.cells.csv", "slide1.candidates.csv"):
        text = (tmp_path / name).read_text()
        assert "inf" not in text.lower(), name
    candidates = pd.read_csv(tmp_path / "slide1.candidates.csv", keep_default_na=False, dtype=str)
    assert (candidates.loc[lone, "gap_um"] == "").all()
    assert (candidates.loc[~lone, "gap_um"] != "").all()
    with pytest.raises(GalleryError) as refused:
        export_gallery(path, tmp_path, "csv")
    cells, table = tmp_path / "slide1.cells.csv", tmp_path / "slide1.candidates.csv"
    assert str(refused.value) == (
        f"{cells} and {table} already exist from an earlier export; add --overwrite to replace them"
    )


# ------------------------------------------------------------------------------------------ GeoJSON


def _signed_area(ring: list[list[float]]) -> float:
    xy = np.asarray(ring)
    return 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))


def test_geojson_validates_and_holds_every_candidate(gallery_and_crops, tmp_path):
    path, _ = gallery_and_crops
    result = export_gallery(path, tmp_path, "geojson")
    gallery = open_gallery(path)

    def no_constants(name: str) -> None:
        raise AssertionError(f"JSON holds {name}, which is not JSON")

    document = json.loads((tmp_path / "slide1.geojson").read_text(), parse_constant=no_constants)
    jsonschema.validate(document, GEOJSON_SCHEMA)
    features = document["features"]
    assert result.n_features == len(features) == len(gallery.candidates) == 100
    ids = [uuid.UUID(feature["id"]) for feature in features]
    assert len(set(ids)) == len(ids)
    seen = set()
    for feature in features:
        props = feature["properties"]
        index = int(props["metadata"]["candidate_index"])
        seen.add(index)
        row = gallery.candidates.iloc[index]
        expected_label = "accepted" if row["accepted"] else row["reason"]
        assert props["classification"]["name"] == expected_label
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]  # closed
        area_px2 = row["area_um2"] / MPP**2
        # counter-clockwise (positive), area equal to the object's (up to the 0.01 px rounding)
        assert _signed_area(ring) == pytest.approx(area_px2, rel=2e-3)
        centre = np.asarray(ring[:-1]).mean(axis=0)
        np.testing.assert_allclose(centre, [row["x_px"], row["y_px"]], atol=0.02)
        assert props["measurements"]["area_um2"] == pytest.approx(row["area_um2"])
        if np.isfinite(row["gap_um"]):
            assert props["measurements"]["gap_um"] == pytest.approx(row["gap_um"])
        else:
            assert "gap_um" not in props["measurements"]
        if row["accepted"]:
            cell = gallery.cells.iloc[int(row["cell_index"])]
            assert props["measurements"]["crop_x_px"] == pytest.approx(cell["x_px"])
    assert seen == set(range(100))
    colours = {
        f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
        for f in features
    }
    assert len({tuple(c) for c in colours.values()}) == len(colours)  # one colour per outcome


def test_circle_polygon_area_and_orientation():
    ring = circle_polygon(100.0, 50.0, 1000.0, vertices=12)
    assert len(ring) == 13 and ring[0] == ring[-1]
    assert _signed_area(ring) == pytest.approx(1000.0, rel=1e-3)
    with pytest.raises(ValueError):
        circle_polygon(0, 0, 10, vertices=2)


def test_image_file_name_holds_the_pixel_of_the_centre():
    assert image_file_name("s", 3, 10.99, 0.0, "png") == "s_00003_x10_y0.png"
    assert image_file_name("s", 123456, 5.5, 7.2, "jpg", digits=6) == "s_123456_x5_y7.jpg"


# ------------------------------------------------------------------------------------------ presets


def test_presets_follow_their_sources():
    # scales quoted by the papers (MLL23 11.52 px/um, AML-LMU 14.14 px/um) and measured (PBC ~9.5)
    assert CROP_PRESETS["mll23"].px_per_um == pytest.approx(11.52, abs=1e-9)
    assert CROP_PRESETS["aml-lmu"].px_per_um == pytest.approx(14.14, abs=0.005)
    assert CROP_PRESETS["pbc"].px_per_um == pytest.approx(9.5, abs=0.01)
    assert {p.image_format for p in CROP_PRESETS.values()} == {"png", "jpeg", "tiff"}


def test_explicit_crop_values_override_the_preset():
    assert resolve_crop(None) == (25.0, 288)
    assert resolve_crop("pbc") == (37.9, 360)
    assert resolve_crop("aml-lmu", crop_px=224) == (28.29, 224)
    assert resolve_crop("aml-lmu", crop_um=30.0, crop_px=96) == (30.0, 96)
    with pytest.raises(ParameterError, match="mll23"):
        resolve_crop("cellavision")
    assert match_crop_preset(28.29, 400).name == "aml-lmu"
    assert match_crop_preset(25.0, 224) is None


def test_default_export_format_follows_the_preset_geometry(tmp_path):
    path, _ = make_gallery(tmp_path, "pbcslide", n_cells=2, n_rejected=1, crop_px=360, crop_um=37.9)
    result = export_gallery(path, tmp_path / "out", progress=False)
    assert result.export_format == "jpeg"
    assert len(list((tmp_path / "out" / "pbcslide").glob("*.jpg"))) == 2


def test_run_preset_and_export_command_on_a_simulated_slide(small_slide, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "out"
    run = ["run", str(small_slide.slide_path), "--out", str(out), "--workers", "0", "--quiet"]
    assert main([*run, "--preset", "aml-lmu"]) == 0
    gallery_path = out / f"{small_slide.slide_path.stem}.zarr"
    gallery = open_gallery(gallery_path)
    crop = gallery.attrs["parameters"]["crop"]
    assert (crop["crop_um"], crop["crop_px"]) == (28.29, 400)
    assert gallery.images.shape[1:] == (400, 400, 3) and len(gallery) > 5
    capsys.readouterr()
    export = ["export", str(gallery_path), "--out", str(tmp_path / "x")]
    assert main(export) == 0
    stem = small_slide.slide_path.stem
    files = list((tmp_path / "x" / stem).glob("*.tiff"))  # the preset's format, without --format
    assert len(files) == len(gallery)
    printed = capsys.readouterr()
    assert f"{len(gallery)} tiff images" in printed.out
    assert f"export {stem}" in printed.err  # the progress bar
    assert main([*export, "--format", "geojson", "--quiet"]) == 0
    document = json.loads((tmp_path / "x" / f"{stem}.geojson").read_text())
    jsonschema.validate(document, GEOJSON_SCHEMA)
    assert len(document["features"]) == len(gallery.candidates)
    assert capsys.readouterr().err == ""
    assert main([*export, "--format", "geojson"]) == 1
    assert capsys.readouterr().err.startswith("error:")
