"""Compare OpenSlide's read_region with pipeline.slide's direct tile reader on a generated Aperio SVS.

Usage::

    python -m benchmarks.bench_slide_read [--size 12288] [--region 2048] [--svs PATH]   # from the repo root

Writes a JPEG-tiled Aperio SVS (levels 1, 4, 16; ``pipeline.simulate.svs.SvsWriter``) unless ``--svs``
names an existing one, then reads every ``region x region`` window of level 0 and of level 1 once with
each reader and prints megapixels per second (single thread). Also times ``Slide.read_at_mpp`` for a
1 um/px overview.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import openslide

from pipeline.simulate.svs import TILE_PX as TILE
from pipeline.simulate.svs import SvsWriter, encode_tile, thumbnail_from, tiles_of
from pipeline.slide import open_slide

MPP = 0.25


def _texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Pale background with stained blobs and mild noise: JPEG sizes like a real smear scan."""
    image = np.full((height, width, 3), (235, 225, 230), dtype=np.uint8)
    for _ in range(max(1, height * width // 20000)):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(60, 200, 3))
        cv2.circle(image, centre, int(rng.integers(4, 30)), colour, -1)
    noise = rng.normal(0, 4, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _level0_tiles(size: int, quarter: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    """Level-0 tiles; each is also shrunk 4x into ``quarter`` so level 0 never sits in memory."""
    rng = np.random.default_rng(seed)
    small = TILE // 4
    for y in range(0, size, TILE):
        for x in range(0, size, TILE):
            tile = _texture(TILE, TILE, rng)
            quarter[y // 4 : y // 4 + small, x // 4 : x // 4 + small] = cv2.resize(
                tile, (small, small), interpolation=cv2.INTER_AREA
            )
            yield tile


def write_svs(path: Path, size: int) -> None:
    """Stream a square Aperio SVS (``size`` a multiple of 1024) to ``path``: level 0 never sits in memory."""
    quarter = np.empty((size // 4, size // 4, 3), dtype=np.uint8)
    with SvsWriter(path, size, size, MPP) as svs:
        svs.write_level0(encode_tile(tile) for tile in _level0_tiles(size, quarter, seed=0))
        sixteenth = cv2.resize(quarter, (size // 16, size // 16), interpolation=cv2.INTER_AREA)
        svs.write_thumbnail(thumbnail_from(sixteenth))
        for level in (quarter, sixteenth):
            svs.write_level(tiles_of(level), (level.shape[1], level.shape[0]))


def _windows(width: int, height: int, region: int) -> list[tuple[int, int, int, int]]:
    return [
        (x, y, min(region, width - x), min(region, height - y))
        for y in range(0, height, region)
        for x in range(0, width, region)
    ]


def _rate(
    read: Callable[[int, int, int, int], np.ndarray], windows: list[tuple[int, int, int, int]]
) -> float:
    start = time.perf_counter()
    pixels = 0
    for window in windows:
        pixels += read(*window).shape[0] * window[2]
    return pixels / 1e6 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=12288, help="level-0 width = height in px")
    parser.add_argument("--region", type=int, default=2048, help="read window size in px")
    parser.add_argument("--svs", type=Path, help="use this SVS instead of generating one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.svs
        if path is None:
            path = Path(tmp) / "bench.svs"
            start = time.perf_counter()
            write_svs(path, args.size)
            print(f"wrote {path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s")
        handle = openslide.OpenSlide(str(path))
        with open_slide(path) as slide:
            print(f"{slide!r}, level dimensions {slide.level_dimensions}")
            for level in (0, 1):
                windows = _windows(*slide.level_dimensions[level], args.region)
                ds = handle.level_downsamples[level]

                def via_openslide(
                    x: int, y: int, w: int, h: int, level: int = level, ds: float = ds
                ) -> np.ndarray:
                    return np.asarray(handle.read_region((round(x * ds), round(y * ds)), level, (w, h)))

                def via_slide(x: int, y: int, w: int, h: int, level: int = level) -> np.ndarray:
                    return slide.read_region(level, x, y, w, h)

                os_rate = _rate(via_openslide, windows)
                direct_rate = _rate(via_slide, windows)
                print(
                    f"level {level}: openslide read_region {os_rate:6.1f} Mpx/s, "
                    f"direct tiles {direct_rate:6.1f} Mpx/s ({direct_rate / os_rate:.1f}x)"
                )
            side = round(slide.dimensions[0] * slide.mpp)  # output px at 1 um/px
            start = time.perf_counter()
            slide.read_at_mpp(0, 0, side, side, mpp_out=1.0)
            seconds = time.perf_counter() - start
            print(f"read_at_mpp 1 um/px overview {side}x{side}: {side * side / 1e6 / seconds:.1f} Mpx/s")
        handle.close()


if __name__ == "__main__":
    main()
