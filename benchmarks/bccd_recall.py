"""Recall of white cells on real blood-smear photographs (BCCD), tiled into a whole slide.

BCCD (Shenggan/BCCD_Dataset, MIT licence; a copy in ../shared/data/bccd) has 364 photographs of
Giemsa-type smears from another lab and microscope than anything the detection was developed on, with
white-cell boxes. Each photograph (about 0.072 um/px) is resampled to 0.25 um/px and placed on a grid in
an Aperio SVS; ``python -m pipeline run`` then processes the mosaic like any slide. A white-cell box
counts as found when a candidate's centre lies inside it.

Usage (from the repository root)::

    python -m benchmarks.bccd_recall                 # all images
    python -m benchmarks.bccd_recall --every 2 --offset 1   # odd-numbered images only
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.simulate.svs import TILE_PX, SvsWriter, encode_tile, pyramid_sizes, thumbnail_from, tiles_of

BCCD_MPP = 0.072  # from the median red-cell box (DESIGN-NOTES, data/bccd/SOURCE.md)
DEFAULT_BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


@dataclass(frozen=True)
class Box:
    """A white-cell box in mosaic level-0 pixels."""

    image: str
    x0: float
    y0: float
    x1: float
    y1: float


def _wbc_boxes(xml_path: Path) -> list[tuple[float, float, float, float]]:
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        if obj.findtext("name") == "WBC":
            bb = obj.find("bndbox")
            boxes.append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def build_mosaic(
    bccd: Path, out: Path, *, mpp: float = 0.25, every: int = 1, offset: int = 0, columns: int = 16
) -> list[Box]:
    """Write BCCD photographs as one Aperio SVS mosaic at ``mpp``; return the white-cell boxes."""
    images = sorted((bccd / "JPEGImages").glob("*.jpg"))[offset::every]
    scale = BCCD_MPP / mpp
    tiles, boxes = [], []
    for path in images:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        tiles.append(small)
        xml = bccd / "Annotations" / (path.stem + ".xml")
        boxes.append([(path.stem, *b) for b in _wbc_boxes(xml)] if xml.exists() else [])
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    mosaic = np.full((rows * th, columns * tw, 3), 255, np.uint8)
    placed: list[Box] = []
    for k, (tile, tile_boxes) in enumerate(zip(tiles, boxes, strict=True)):
        r, c = divmod(k, columns)
        y0, x0 = r * th, c * tw
        mosaic[y0 : y0 + tile.shape[0], x0 : x0 + tile.shape[1]] = tile
        for name, bx0, by0, bx1, by1 in tile_boxes:
            placed.append(Box(name, x0 + bx0 * scale, y0 + by0 * scale, x0 + bx1 * scale, y0 + by1 * scale))
    write_svs(mosaic, out, mpp)
    return placed


def write_svs(image: np.ndarray, out: Path, mpp: float) -> None:
    """Write an RGB array as an Aperio SVS with a 4x pyramid (in memory: for small images)."""
    h, w = image.shape[:2]
    sizes = pyramid_sizes(w, h)
    levels = [image]
    for _ in sizes[1:]:
        prev = levels[-1]
        levels.append(cv2.resize(prev, (math.ceil(prev.shape[1] / 4), math.ceil(prev.shape[0] / 4)),
                                 interpolation=cv2.INTER_AREA))  # fmt: skip
    with SvsWriter(out, w, h, mpp) as svs:
        svs.write_level0(encode_tile(t) for t in tiles_of(image))
        svs.write_thumbnail(thumbnail_from(levels[-1]))
        for level in levels[1:]:
            svs.write_level(tiles_of(level), (level.shape[1], level.shape[0]))
    assert TILE_PX == 256


def recall(boxes: list[Box], x_px: np.ndarray, y_px: np.ndarray) -> tuple[int, list[Box]]:
    """Boxes with at least one candidate centre inside, and the list of missed boxes."""
    found = 0
    missed = []
    for box in boxes:
        inside = (x_px >= box.x0) & (x_px <= box.x1) & (y_px >= box.y0) & (y_px <= box.y1)
        if inside.any():
            found += 1
        else:
            missed.append(box)
    return found, missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bccd", type=Path, default=DEFAULT_BCCD)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from pipeline.gallery import open_gallery
    from pipeline.runner import run_slide

    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "bccd_mosaic.svs"
        boxes = build_mosaic(args.bccd, slide, every=args.every, offset=args.offset)
        result = run_slide(slide, Path(tmp) / "out", workers=args.workers, progress=False)
        gallery = open_gallery(result.gallery)
        c = gallery.candidates
        found, missed = recall(boxes, c["x_px"].to_numpy(), c["y_px"].to_numpy())
        accepted = c[c["accepted"]]
        found_acc, _ = recall(boxes, accepted["x_px"].to_numpy(), accepted["y_px"].to_numpy())
        stains = gallery.attrs["estimate"]["stains"]
    print(f"images: every {args.every} from {args.offset}; white-cell boxes: {len(boxes)}")
    print(
        f"candidates: {len(c)}; boxes found by a candidate: {found}/{len(boxes)} = {found / len(boxes):.1%}"
    )
    print(f"accepted: {len(accepted)}; boxes found by an accepted cell: {found_acc}/{len(boxes)}")
    print(f"stain estimate: {stains}")
    if missed:
        print("missed:", ", ".join(b.image for b in missed))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
