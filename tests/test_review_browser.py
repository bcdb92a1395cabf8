"""The review app in a real headless browser: Debian's Chromium driven by Playwright.

Playwright's own browser download is not reachable from our machines, so the system's Chromium is used
through ``executable_path``. Without it (or without Playwright) these tests fail under CI=true and are
skipped elsewhere. ``REVIEW_SCREENSHOT=docs/review.png`` also saves the README's screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .test_review import _start_server, review_out  # noqa: F401  (a fixture, used by name)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


TILES_LOADED = "() => { const i = review.viewer.world.getItemAt(0); return i && i.getFullyLoaded(); }"


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI installs it: .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing('Playwright for Python is not installed (pip install -e ".[test]")')
    if not Path(CHROMIUM).exists():
        _missing(f"{CHROMIUM} not found (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def server(review_out, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    shutil.copytree(review_out, out)
    process, url = _start_server(out)
    yield out, url
    process.terminate()
    process.wait(10)


def _tile_level(url: str) -> int | None:
    if "_files/" not in url:
        return None
    return int(url.split("_files/")[1].split("/")[0])


def test_review_a_slide_zoom_filter_and_label_with_the_keyboard(browser, server):
    from pipeline.gallery import open_gallery

    out, url = server
    gallery = open_gallery(out / "sample_mll23.zarr")
    n_cells, candidates = len(gallery), gallery.candidates
    rejected = candidates.loc[~candidates["accepted"], "reason"].value_counts()
    assert set(rejected.index) >= {"thick_zone", "cut"}, rejected
    page = browser.new_page(viewport={"width": 1500, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    levels: list[int] = []
    page.on("request", lambda request: levels.append(_tile_level(request.url) or -1))

    # batch page
    page.goto(url)
    page.wait_for_selector("#slides tbody tr")
    failed, done = (row.inner_text() for row in page.locator("#slides tbody tr").all())
    numbers = (
        str(n_cells),
        str(len(candidates)),
        f"thick_zone {rejected['thick_zone']}",
        f"cut {rejected['cut']}",
    )
    for expected in ("sample_mll23", "done", *numbers, "overview"):
        assert expected in done
    assert "broken\tfailed" in failed and "is not a slide OpenSlide or tifffile can read" in failed

    # open the slide; the annotator gives a name first
    page.click("text=sample_mll23")
    page.wait_for_selector("#annotator-dialog[open]")
    page.fill("#annotator-input", "anna")
    page.click("#annotator-form button")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_function(TILES_LOADED)
    assert page.locator("#grid .tile").count() == n_cells
    assert page.locator("#annotator-name").inner_text() == "anna"

    # every candidate drawn over the slide, each outcome toggleable from the legend
    painted = (
        "() => { const c = document.getElementById('overlay'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4)"
        " n += d[i] > 0; return n; }"
    )
    all_drawn = page.evaluate(painted)
    assert all_drawn > 1000
    page.click("#legend input[data-outcome='thick_zone']")
    page.click("#legend input[data-outcome='cut']")
    page.wait_for_timeout(200)
    accepted_only = page.evaluate(painted)
    assert 0 < accepted_only < all_drawn / 2
    page.click("#legend input[data-outcome='thick_zone']")
    page.click("#legend input[data-outcome='cut']")

    # zoom with the mouse wheel: the viewer asks for tiles of a finer level
    coarse = max(levels)
    zoom = page.evaluate("review.viewer.viewport.getZoom()")
    box = page.locator("#viewer").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(6):  # OpenSeadragon zooms by 1.2 per wheel step
        page.mouse.wheel(0, -400)
        page.wait_for_timeout(150)
    page.wait_for_function(f"() => review.viewer.viewport.getZoom() > {zoom * 2}")
    page.wait_for_function("() => review.viewer.world.getItemAt(0).getFullyLoaded()")
    assert max(levels) > coarse

    # click a candidate on the slide: its crop and features are shown
    page.click("#viewer .openseadragon-container button, #viewer [title='Go home']", timeout=5000)
    page.wait_for_timeout(800)
    picked = page.evaluate(
        """() => {
        const item = review.viewer.world.getItemAt(0), cs = review.candidates;
        const r = c => Math.sqrt(c.area_um2 / Math.PI) / review.info.mpp;
        for (let j = 0; j < cs.length; j++) {
          const c = cs[j];
          if (c.accepted || c.reason !== 'cut') continue;
          const far = (o, k) => k === j || Math.hypot(o.x_px - c.x_px, o.y_px - c.y_px) > 3 * r(c) + 40;
          const alone = cs.every(far);
          if (!alone) continue;
          const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(c.x_px, c.y_px));
          return {j, x: p.x, y: p.y};
        }
        return null;
      }"""
    )
    assert picked is not None
    page.mouse.click(box["x"] + picked["x"], box["y"] + picked["y"])
    page.wait_for_function(f"() => review.selectedCandidate === {picked['j']}")
    assert f"candidate {picked['j']} (cut" in page.locator("#details h2").inner_text()
    page.wait_for_function("() => document.querySelector('#details img.big').naturalWidth > 0")

    # click a crop: the viewer flies to its cell
    page.click("#grid .tile[data-cell='5']")
    cell = page.evaluate("review.cells[5]")
    page.wait_for_function(
        """([x, y]) => { const item = review.viewer.world.getItemAt(0);
           const c = item.viewportToImageCoordinates(review.viewer.viewport.getCenter(true));
           return Math.hypot(c.x - x, c.y - y) < 20; }""",
        arg=[cell["x_px"], cell["y_px"]],
    )
    assert "cell #5" in page.locator("#details h2").inner_text()

    # filter by a reject reason: its candidates, cut from the slide
    page.select_option("#filter-reason", "thick_zone")
    assert page.locator("#grid .tile").count() == rejected["thick_zone"]
    assert page.locator("#grid .tile .rejected").first.inner_text() == "thick_zone"
    page.wait_for_function("() => document.querySelector('#grid .tile img').naturalWidth > 0")
    page.select_option("#filter-reason", "accepted")

    # label three cells with the keyboard (each key moves on to the next cell), undo a fourth
    page.click("#grid .tile[data-cell='0']")
    for key in ("m", "s", "l", "e"):  # as fast as a typist: each label moves on at once
        page.keyboard.press(key)
    assert page.evaluate("review.position") == 4
    page.keyboard.press("Backspace")
    assert page.evaluate("review.position") == 3
    page.wait_for_function("() => review.unsaved === 0")
    assert page.evaluate("Object.keys(review.labels).length") == 3

    # reload: the labels are still there, for the same annotator
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    badges = [page.locator(f"#grid .tile[data-cell='{i}'] .label-badge").inner_text() for i in range(4)]
    assert badges == ["myeloblast", "segmented neutrophil", "typical lymphocyte", ""]
    stored = json.loads((out / "sample_mll23.labels" / "anna.json").read_text())["labels"]
    assert {row: entry["label"] for row, entry in stored.items()} == {
        "0": "myeloblast",
        "1": "segmented_neutrophil",
        "2": "typical_lymphocyte",
    }
    page.select_option("#filter-label", "myeloblast")
    assert page.locator("#grid .tile").count() == 1
    page.select_option("#filter-label", "*")

    screenshot = os.environ.get("REVIEW_SCREENSHOT")
    if screenshot:
        page.click("#grid .tile[data-cell='9']")
        page.wait_for_timeout(1500)
        page.wait_for_function("() => review.viewer.world.getItemAt(0).getFullyLoaded()")
        page.screenshot(path=screenshot)
    assert errors == []
    page.close()


def test_the_browser_gets_403_without_the_token_and_works_with_it(browser, review_out):  # noqa: F811
    process, url = _start_server(review_out, "--host", "0.0.0.0")
    try:
        page = browser.new_page()
        base = url.split("?")[0]
        assert page.goto(base).status == 403
        assert page.goto(base + "slide/sample_mll23").status == 403
        assert page.goto(url).status == 200  # the token once, in the URL ...
        page.wait_for_selector("#slides tbody tr")
        page.add_init_script("localStorage.setItem('review.annotator', 'ben')")
        assert page.goto(base + "slide/sample_mll23").status == 200  # ... then the cookie carries it
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_function(TILES_LOADED)
        page.close()
    finally:
        process.terminate()
        process.wait(10)
