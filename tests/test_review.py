"""The review app without a browser: labels, agreement, export of labels, safety rules, QC pictures.

The browser tests are in test_review_browser.py.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import GalleryError, ParameterError
from pipeline.review.labels import LABEL_KEYS, LABELS, LabelStore, labels_dir

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "sample_mll23.svs"


@pytest.fixture(scope="session")
def review_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder of `run` on the shipped sample slide (about 65 cells from 465 candidates)."""
    from pipeline.cli import main

    folder = tmp_path_factory.mktemp("review")
    broken = folder / "broken.svs"
    broken.write_text("not a slide")
    out = folder / "out"
    # the broken slide fails (exit code 1) and is recorded with its one-line error
    assert main(["run", str(SAMPLE), str(broken), "--out", str(out), "--workers", "0", "--quiet"]) == 1
    return out


@pytest.fixture()
def out_copy(review_out: Path, tmp_path: Path) -> Path:
    """A private copy of the output folder, for tests that write labels."""
    copy = tmp_path / "out"
    shutil.copytree(review_out, copy)
    return copy


def _store(out: Path) -> tuple[LabelStore, object]:
    from pipeline.gallery import open_gallery

    gallery = open_gallery(out / "sample_mll23.zarr")
    return LabelStore(gallery.path, gallery.attrs), gallery


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


def test_every_label_has_its_own_key():
    assert len(LABELS) == 20 and set(LABEL_KEYS) == set(LABELS)
    assert len(set(LABEL_KEYS.values())) == 20


def test_labels_are_kept_beside_the_gallery_and_never_touch_it(out_copy):
    store, gallery = _store(out_copy)
    before = _tree_digest(gallery.path)
    store.set("anna", 3, "myeloblast", x_px=1.0, y_px=2.0)
    store.set("anna", 5, "monocyte")
    store.set("anna", 3, "promyelocyte")  # a second answer replaces the first
    store.set("anna", 5, None)  # undo
    assert store.read("anna") == {3: "promyelocyte"}
    assert store.annotators() == ["anna"]
    assert (labels_dir(gallery.path) / "anna.json").is_file()
    assert _tree_digest(gallery.path) == before
    content = json.loads((labels_dir(gallery.path) / "anna.json").read_text())
    assert content["gallery"]["created_utc"] == gallery.attrs["created_utc"]
    assert content["labels"]["3"]["label"] == "promyelocyte"


@pytest.mark.parametrize("name", ["", "../x", "a/b", "..", "a b", ".hidden", "x" * 65])
def test_annotator_names_cannot_be_paths(out_copy, name):
    store, _ = _store(out_copy)
    with pytest.raises(ParameterError, match="annotator name"):
        store.set(name, 0, "myeloblast")


def test_bad_label_or_row_is_a_user_error(out_copy):
    store, gallery = _store(out_copy)
    with pytest.raises(ParameterError, match="unknown label"):
        store.set("anna", 0, "lymphoblast")
    with pytest.raises(ParameterError, match="out of range"):
        store.set("anna", len(gallery), "myeloblast")


def test_labels_of_an_earlier_run_of_the_gallery_are_refused(out_copy):
    store, gallery = _store(out_copy)
    store.set("anna", 0, "myeloblast")
    other = LabelStore(gallery.path, {**gallery.attrs, "created_utc": "2000-01-01T00:00:00+00:00"})
    with pytest.raises(GalleryError, match="another run"):
        other.read("anna")


def _label_many(gallery_path: str, attrs: dict, annotator: str, rows: list[int], label: str, barrier) -> None:
    store = LabelStore(gallery_path, attrs)
    barrier.wait(60)  # every process starts labelling at once (spawn takes a while each)
    for row in rows:
        store.set(annotator, row, label)


def test_two_annotators_at_once_lose_nothing(out_copy):
    """Two annotators, each in two processes at once (two browser tabs): every label is kept."""
    _, gallery = _store(out_copy)
    n = len(gallery)
    context = multiprocessing.get_context("spawn")
    jobs = []
    barrier = context.Barrier(4)
    for annotator, label in (("anna", "myeloblast"), ("ben", "monocyte")):
        for rows in (list(range(0, n, 2)), list(range(1, n, 2))):  # each tab labels half the cells
            args = (str(gallery.path), dict(gallery.attrs), annotator, rows, label, barrier)
            jobs.append(context.Process(target=_label_many, args=args))
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    store, _ = _store(out_copy)
    assert store.read("anna") == dict.fromkeys(range(n), "myeloblast")
    assert store.read("ben") == dict.fromkeys(range(n), "monocyte")


# --------------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------------


def test_kappa_matches_scikit_learn():
    from sklearn.metrics import cohen_kappa_score

    from pipeline.review.agreement import cohen_kappa

    rng = np.random.default_rng(15)
    for trial in range(50):
        n = int(rng.integers(2, 200))
        k = int(rng.integers(2, 8))
        a = [LABELS[i] for i in rng.integers(0, k, n)]
        # b agrees with a often, but not always
        b = [x if rng.random() < 0.6 else LABELS[int(rng.integers(0, k + 2))] for x in a]
        expected = cohen_kappa_score(a, b)
        assert cohen_kappa(a, b) == pytest.approx(expected, abs=1e-12), trial


def test_agreement_command_reports_counts_matrix_and_kappa(out_copy, capsys):
    from sklearn.metrics import cohen_kappa_score

    from pipeline.cli import main

    store, gallery = _store(out_copy)
    anna = ["myeloblast", "monocyte", "myeloblast", "segmented_neutrophil", "unsure", "myeloblast"]
    ben = ["myeloblast", "monocyte", "monocyte", "segmented_neutrophil", "myeloblast", "myeloblast"]
    for row, (a, b) in enumerate(zip(anna, ben, strict=True)):
        store.set("anna", row, a)
        store.set("ben", row, b)
    store.set("carl", 0, "myeloblast")
    store.set("ben", 10, "eosinophil")  # labelled by one only: not compared
    assert main(["agreement", str(gallery.path)]) == 0
    out = capsys.readouterr().out
    kappa = cohen_kappa_score(anna, ben)
    assert f"anna vs ben: 6 cells labelled by both, 66.7% agree, Cohen's kappa {kappa:.3f}" in out
    assert "anna vs carl: 1 cells labelled by both" in out
    assert "ben vs carl" in out
    counts = out.split("cells per label:")[1].split("\n\n")[0]
    assert re.search(r"myeloblast\s+3\s+3\s+1", counts)
    assert re.search(r"eosinophil\s+0\s+1\s+0", counts)
    # the matrix row of anna's myeloblast (columns in label order: segmented_neutrophil, monocyte,
    # myeloblast, unsure): ben said monocyte once, myeloblast twice
    matrix = out.split("anna vs ben")[1].split("anna vs carl")[0]
    assert re.search(r"^myeloblast\s+0\s+1\s+2\s+0$", matrix, re.MULTILINE)


def test_agreement_without_labels_says_how_to_make_them(out_copy, capsys):
    from pipeline.cli import main

    assert main(["agreement", str(out_copy / "sample_mll23.zarr")]) == 0
    assert "no labels yet" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Export of labels
# --------------------------------------------------------------------------------------------------


def test_export_has_a_label_column_and_by_label_writes_an_image_folder(out_copy, tmp_path):
    from pipeline.cli import main

    store, gallery = _store(out_copy)
    store.set("anna", 0, "myeloblast")
    store.set("anna", 1, "myeloblast")
    store.set("anna", 2, "monocyte")
    store.set("anna", 3, "unsure")
    store.set("ben", 0, "myeloblast")
    store.set("ben", 2, "eosinophil")  # disagree: no agreed label
    export = tmp_path / "export"
    args = ["export", str(gallery.path), "--out", str(export), "--quiet"]
    assert main([*args, "--format", "csv"]) == 0
    table = pd.read_csv(export / "sample_mll23.cells.csv", keep_default_na=False)
    assert list(table.columns[:4]) == ["slide", "label", "label_anna", "label_ben"]
    assert table["label"].tolist()[:5] == ["myeloblast", "myeloblast", "", "unsure", ""]
    assert len(table) == len(gallery)

    assert main([*args, "--format", "png", "--by-label", "--annotator", "anna"]) == 0
    root = export / "sample_mll23"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["monocyte", "myeloblast"]  # unsure and unlabelled cells are no class
    assert len(list((root / "myeloblast").glob("*.png"))) == 2
    table = pd.read_csv(root / "sample_mll23.cells.csv", keep_default_na=False)
    assert table["file"][2].startswith("monocyte/sample_mll23_00002_")
    assert table["file"][3] == "" and table["label"][3] == "unsure"
    import cv2

    written = cv2.cvtColor(cv2.imread(str(root / table["file"][2])), cv2.COLOR_BGR2RGB)
    assert np.array_equal(written, np.asarray(gallery.images[2]))


def test_export_of_an_unknown_annotator_is_refused(out_copy, tmp_path):
    from pipeline.export import export_gallery

    with pytest.raises(ParameterError, match="has no labels"):
        export_gallery(out_copy / "sample_mll23.zarr", tmp_path, "csv", annotator="nobody")


# --------------------------------------------------------------------------------------------------
# The app's rules, through Flask's test client
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def client(out_copy):
    from pipeline.review.app import create_app

    return create_app(out_copy).test_client()


def test_pages_tables_and_pictures_are_served(client, review_out):
    from pipeline.gallery import open_gallery

    gallery = open_gallery(review_out / "sample_mll23.zarr")
    n_cells, n_candidates = len(gallery), len(gallery.candidates)
    rejected = gallery.candidates.loc[~gallery.candidates["accepted"], "reason"].value_counts().to_dict()
    assert b"Batch" in client.get("/").data
    batch = client.get("/api/batch").get_json()
    failed, row = batch["slides"]
    assert (row["stem"], row["status"], row["cells"], row["candidates"]) == (
        "sample_mll23", "done", n_cells, n_candidates,
    )  # fmt: skip
    assert row["rejected_by_reason"] == rejected and len(rejected) >= 2
    assert row["pictures"] == ["sample_mll23.contact.png", "sample_mll23.overview.png"]
    assert (failed["stem"], failed["status"], failed["has_gallery"]) == ("broken", "failed", False)
    assert "broken.svs is not a slide OpenSlide or tifffile can read" in failed["error"]
    assert client.get("/slide/broken").status_code == 404
    assert client.get("/slide/sample_mll23").status_code == 200
    info = client.get("/api/slide/sample_mll23").get_json()
    assert info["viewer_error"] == "" and {o["name"] for o in info["outcomes"]} >= {"accepted", "thick_zone"}
    assert b"<Image" in client.get("/dzi/sample_mll23.dzi").data
    tile = client.get("/dzi/sample_mll23_files/8/0_0.jpeg")
    assert tile.status_code == 200 and tile.data[:2] == b"\xff\xd8"
    assert client.get("/slide/sample_mll23/cell/0.jpg").data[:2] == b"\xff\xd8"
    assert client.get("/slide/sample_mll23/candidate/464.jpg").data[:2] == b"\xff\xd8"
    assert client.get("/files/sample_mll23.overview.png").data[:4] == b"\x89PNG"


def test_a_gallery_whose_slide_is_gone_is_still_shown_without_the_viewer(out_copy):
    from pipeline.review.app import create_app

    # Point the gallery at a slide that is not there (as if the slide had been moved away).
    meta = out_copy / "sample_mll23.zarr" / "zarr.json"
    content = json.loads(meta.read_text())
    content["attributes"]["slide"]["path"] = str(out_copy / "moved" / "sample_mll23.svs")
    meta.write_text(json.dumps(content))
    client = create_app(out_copy).test_client()
    info = client.get("/api/slide/sample_mll23").get_json()
    assert (
        "is not there any more" in info["viewer_error"] and "moved/sample_mll23.svs" in info["viewer_error"]
    )
    assert client.get("/dzi/sample_mll23.dzi").status_code == 404
    assert client.get("/slide/sample_mll23/cell/3.jpg").status_code == 200  # the gallery needs no slide
    assert client.get("/api/slide/sample_mll23/cells").get_json()["rows"]


def test_viewer_tiles_are_openslides_deep_zoom_tiles_of_every_level():
    """Tiles read through pipeline.slide equal OpenSlide's own Deep Zoom tiles (up to JPEG)."""
    import io

    import openslide
    from openslide.deepzoom import DeepZoomGenerator
    from PIL import Image

    from pipeline.review.tiles import SlideTiles

    ours = SlideTiles(SAMPLE, 0.25)
    reference = DeepZoomGenerator(openslide.OpenSlide(str(SAMPLE)), tile_size=254, overlap=1)
    assert ours.dzi() == reference.get_dzi("jpeg")
    assert ours.deepzoom.level_tiles == reference.level_tiles
    for level in range(6, reference.level_count):  # levels made from each of the slide's 3 levels
        columns, rows = reference.level_tiles[level]
        for column, row in {(0, 0), (columns - 1, rows - 1), (columns // 2, rows // 2)}:
            got = np.asarray(ours.deepzoom.get_tile(level, (column, row)).convert("RGB"), dtype=float)
            expected = np.asarray(reference.get_tile(level, (column, row)).convert("RGB"), dtype=float)
            assert got.shape == expected.shape
            assert np.abs(got - expected).mean() < 0.5, (level, column, row)
            served = np.asarray(Image.open(io.BytesIO(ours.tile(level, column, row))), dtype=float)
            assert np.abs(served - got).mean() < 8, (level, column, row)  # JPEG quality 85 on smear noise
    assert ours.tile(reference.level_count, 0, 0) is None
    assert ours.tile(level, columns, 0) is None
    ours.close()


def test_candidate_crops_are_read_as_the_gallery_reads_its_crops(review_out):
    """A crop the app makes on the fly is the slide's one region reader at work: at the gallery's scale it
    is the gallery's own crop, bit for bit, and white beyond the slide."""
    from pipeline.gallery import open_gallery
    from pipeline.review.tiles import SlideTiles

    gallery = open_gallery(review_out / "sample_mll23.zarr")
    mpp = float(gallery.attrs["slide"]["mpp"])
    crop = gallery.attrs["parameters"]["crop"]
    crop_um, crop_px = float(crop["crop_um"]), int(crop["crop_px"])
    tiles = SlideTiles(SAMPLE, mpp)
    try:
        for index in (0, len(gallery) // 2, len(gallery) - 1):
            row = gallery.cells.iloc[index]
            got = tiles.crop(float(row["x_px"]), float(row["y_px"]), crop_um / mpp, crop_px)
            np.testing.assert_array_equal(got, np.asarray(gallery.images[index]), err_msg=f"cell {index}")
        corner = tiles.crop(0.0, 0.0, crop_um / mpp, 96)  # centred on the slide's corner
        assert corner.shape == (96, 96, 3) and (corner[:47, :47] == 255).all()
    finally:
        tiles.close()


def test_a_slide_openslide_cannot_open_is_shown_too(tmp_path):
    """A stripped TIFF (OpenSlide refuses it; the pipeline reads it with tifffile) gets tiles too."""
    import io

    import openslide
    import tifffile
    from PIL import Image

    from pipeline.cli import main
    from pipeline.review.app import create_app

    with openslide.OpenSlide(str(SAMPLE)) as slide:
        rgb = np.asarray(slide.read_region((2000, 1000), 0, (1200, 900)).convert("RGB"))
    path = tmp_path / "stripped.tif"
    tifffile.imwrite(
        path, rgb, photometric="rgb", rowsperstrip=64, resolution=(40000, 40000), resolutionunit="CENTIMETER"
    )
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(path))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    client = create_app(out).test_client()
    assert client.get("/api/slide/stripped").get_json()["viewer_error"] == ""
    assert '<Size Width="1200" Height="900"' in client.get("/dzi/stripped.dzi").text
    last = 11  # 1200 px wide: Deep Zoom levels 0-11, the last at full resolution
    tile = client.get(f"/dzi/stripped_files/{last}/0_0.jpeg")
    assert tile.status_code == 200
    got = np.asarray(Image.open(io.BytesIO(tile.data)), dtype=float)
    assert got.shape == (255, 255, 3)  # 254 + 1 px overlap at the right and bottom
    assert np.abs(got - rgb[:255, :255]).mean() < 8


@pytest.mark.parametrize(
    "path",
    [
        "/files/../batch.json",
        "/files/batch.json",  # in OUT, but not one of the pictures the app shows
        "/files/..%2f..%2fetc%2fpasswd",
        "/files/%2fetc%2fpasswd",
        "/static/../app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e/%2e%2e/errors.py",
        "/slide/..%2fsample_mll23",
        "/slide/.sample_mll23.zarr.partial",
        "/api/slide/..%2f..%2fetc/cells",
        "/dzi/..%2fsample_mll23.dzi",
        "/dzi/sample_mll23_files/99/0_0.jpeg",
        "/slide/sample_mll23/cell/100000.jpg",
        "/slide/sample_mll23/candidate/100000.jpg",
        "/etc/passwd",
    ],
)
def test_paths_outside_what_the_app_serves_are_404(client, path):
    assert client.get(path).status_code == 404


def test_labels_round_trip_and_reject_bad_requests(client, out_copy):
    url = "/api/slide/sample_mll23/labels/anna"
    assert client.post(url, json={"cell": 4, "label": "basophil"}).get_json()["labels"] == {"4": "basophil"}
    assert client.get(url).get_json()["labels"] == {"4": "basophil"}
    assert client.post(url, data="cell=4&label=basophil").status_code == 415  # a form from another site
    assert client.post(url, json={"cell": 4, "label": "cat"}).status_code == 400
    assert client.post(url, json={"cell": 999, "label": "basophil"}).status_code == 400
    escape = client.post("/api/slide/sample_mll23/labels/..%2fx", json={"cell": 1, "label": "basophil"})
    assert escape.status_code in (400, 404)
    written = sorted(
        p.name for p in (out_copy / "sample_mll23.labels").iterdir() if not p.name.startswith(".")
    )
    assert written == ["anna.json"]


def test_a_foreign_host_name_is_refused_on_loopback(client):
    assert client.get("/", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "[::1]:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "evil.example:8765"}).status_code == 403  # DNS rebinding


def test_with_a_token_every_request_needs_it(out_copy):
    from pipeline.review.app import create_app

    client = create_app(out_copy, token="s3cret").test_client()
    assert client.get("/").status_code == 403
    assert client.get("/api/batch").status_code == 403
    assert client.get("/?token=wrong").status_code == 403
    first = client.get("/?token=s3cret", headers={"Host": "127.0.0.1:8765"})
    assert first.status_code == 200 and "HttpOnly" in first.headers["Set-Cookie"]
    assert "review_token_8765=" in first.headers["Set-Cookie"]  # one cookie per port
    assert client.get("/api/batch", headers={"Host": "127.0.0.1:8765"}).status_code == 200  # the cookie
    # another app on another port of this host does not take this one's token
    assert client.get("/api/batch", headers={"Host": "127.0.0.1:8766"}).status_code == 403


def _start_server(out: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "review", str(out), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"open (http://\S+)", line)
    if not match:
        process.kill()
        raise AssertionError(f"review printed no URL: {line!r} {process.stdout.read()}")
    return process, match.group(1)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_bound_to_all_addresses_it_needs_the_token_even_through_loopback(review_out):
    process, url = _start_server(review_out, "--host", "0.0.0.0")
    try:
        token = re.search(r"token=([\w-]+)", url).group(1)
        base = url.split("?")[0]
        assert base.startswith("http://127.0.0.1:")
        assert _status(base) == 403
        assert _status(base + "api/batch") == 403
        assert _status(base + "?token=" + token[:-1]) == 403
        assert _status(url) == 200
        assert _status(base + "api/batch?token=" + token) == 200
    finally:
        process.terminate()
        process.wait(10)


def test_on_loopback_it_needs_no_token_unless_asked(review_out):
    process, url = _start_server(review_out)
    try:
        assert "token" not in url and _status(url) == 200
    finally:
        process.terminate()  # SIGTERM, as Ctrl-C: the app stops cleanly
        rest, _ = process.communicate(timeout=10)
    assert process.returncode == 0 and "review stopped" in rest and "Traceback" not in rest
    process, url = _start_server(review_out, "--token")
    try:
        assert _status(url.split("?")[0]) == 403 and _status(url) == 200
    finally:
        process.terminate()
        process.wait(10)


def test_a_port_in_use_is_a_one_line_error(review_out):
    process, url = _start_server(review_out)
    try:
        port = url.rsplit(":", 1)[1].strip("/")
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "review", str(review_out), "--port", port],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=60,
        )
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
        assert "--port" in result.stderr and "Traceback" not in result.stderr
    finally:
        process.terminate()
        process.wait(10)


def test_a_folder_that_does_not_exist_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "review", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert result.returncode == 1 and "is not a folder" in result.stderr


# --------------------------------------------------------------------------------------------------
# QC pictures
# --------------------------------------------------------------------------------------------------


def _text_rows(band: np.ndarray) -> int:
    """Height of the tallest run of rows holding dark (text) pixels."""
    dark = (band.max(axis=2) < 80).any(axis=1)
    best = run = 0
    for is_dark in dark:
        run = run + 1 if is_dark else 0
        best = max(best, run)
    return best


def test_overview_legend_text_scales_with_the_picture():
    from pipeline.qc import COLOURS, overview_picture

    image = np.full((1800, 2400, 3), 240, np.uint8)
    candidates = pd.DataFrame(
        {"x_px": [100.0], "y_px": [100.0], "area_um2": [100.0], "accepted": [True], "reason": [""]}
    )
    picture = overview_picture(image, 1.0, 1.0, candidates)
    legend = picture[1800:, :600]
    # capital letters at least 1/100 of the picture's width (24 px on 2400): readable when it is shown
    # fitted to a screen; the old legend had 12 px text.
    assert _text_rows(legend) >= 24
    assert legend.shape[0] >= len(COLOURS) * 24


def test_contact_sheet_names_each_tile_by_its_row_and_marks_padding(review_out):
    from pipeline.gallery import open_gallery
    from pipeline.qc import gallery_contact_sheet

    gallery = open_gallery(review_out / "sample_mll23.zarr")
    padded = gallery.cells["padded"].to_numpy(bool)
    assert padded.any() and not padded.all()
    sheet = gallery_contact_sheet(gallery)
    tile = 144
    first_padded, first_plain = int(np.argmax(padded)), int(np.argmax(~padded))

    def frame(i: int) -> np.ndarray:
        r, c = divmod(i, 10)
        y, x = r * (tile + 22 + 4) + 2, c * (tile + 4) + 2
        return sheet[y, x : x + tile]  # the tile's top row

    orange = np.array([255, 150, 0])
    assert (np.abs(frame(first_padded).astype(int) - orange).sum(axis=1) < 30).mean() > 0.9
    assert (np.abs(frame(first_plain).astype(int) - orange).sum(axis=1) < 30).mean() < 0.1


def test_contact_sheet_labels_hold_the_index():
    from pipeline.qc import contact_sheet

    images = np.zeros((3, 16, 16, 3), np.uint8)
    with_index = contact_sheet(images, ["#0 q=0.90", "#1 q=0.80", "#2 q=0.70"], padded=[False, True, False])
    without = contact_sheet(images, ["q=0.90", "q=0.80", "q=0.70"], padded=[False, True, False])
    assert with_index.shape == without.shape and not np.array_equal(with_index, without)


def test_the_review_command_is_in_the_parser_without_importing_flask():
    code = (
        "import sys; from pipeline.cli import build_parser; build_parser(); "
        "print('flask' in sys.modules, 'waitress' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["False", "False"]
