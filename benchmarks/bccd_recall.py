"""Recall of the overview segmentation on real blood-smear photographs (BCCD).

BCCD (Shenggan/BCCD_Dataset, MIT licence; a copy in ../shared/data/bccd) has 364 photographs of
Giemsa-type smears from another lab and microscope than anything the detection was developed on, with
white-cell boxes (the truth; red-cell boxes are incomplete). Pixel size about 0.072 um/px (plausible
0.066-0.077, from the red-cell boxes).

Default mode: each photograph is resampled (``cv2.INTER_AREA``) to an overview pixel size and segmented
with :func:`pipeline.segment.segment`, padded on every side by the halo with the slide's glass white (a
photograph is a window of a slide; nothing is invented beyond its border). A white-cell box counts as
found when an object's centroid lies inside it (box scaled to the overview). False objects are those
whose centroid lies in the photograph but in no white-cell box; those in a platelet box are counted too.
A photograph with one white cell and two objects in its box counts as a cell split in two.

Fixed split, so that tuning does not fit the photographs we report: photographs with an even number
(BloodImage_00000, _00002, ...) are for tuning; odd-numbered ones are held out and reported separately.
The stain statistics of each split are estimated from that split's own photographs (as a slide's are
from its own sample windows), and also from each photograph alone (``per-photo``: a 46 x 35 um window
at 1 um/px, a harsh test of the estimator).

The whole pipeline on real photographs (BCCD and three more labs, tiled into slides) is
``benchmarks/real_smears.py``. ``--speed`` times the segmentation of detection on a 4096 x 4096 px
overview tiled from the photographs.

Usage (from the repository root)::

    python -m benchmarks.bccd_recall                          # 0.5, 0.8, 1.0, 1.5, 2.0 um/px
    python -m benchmarks.bccd_recall --mpp 1.0 --bccd-mpp 0.066
    python -m benchmarks.bccd_recall --mpp 1.0 --stain 0.5 0.5 0.5    # a paler lab
    python -m benchmarks.bccd_recall --mpp 1.0 --stain 0.5 0.5 0.5 --threshold 0.12   # fixed threshold
    python -m benchmarks.bccd_recall --speed
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from benchmarks.real_smears import voc_boxes
from pipeline._tile_maps import tile_maps
from pipeline.runner import _red_cell_unit
from pipeline.segment import (
    SegmentParams,
    SlideStains,
    estimate_slide_stains,
    required_halo_um,
    segment,
)

BCCD_MPP = 0.072  # from the median red-cell box (DESIGN-NOTES, data/bccd/SOURCE.md)
DEFAULT_BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"
SPLITS = {"tune (even)": 0, "held out (odd)": 1}


@dataclass(frozen=True)
class Photo:
    """One photograph resampled to an overview pixel size, with its boxes in overview pixels."""

    name: str
    rgb: np.ndarray
    wbc: list[tuple[float, float, float, float]]
    platelets: list[tuple[float, float, float, float]]


def photo_number(path: Path) -> int:
    """The number in ``BloodImage_00042.jpg`` (42): even ones tune, odd ones are held out."""
    return int(path.stem.rsplit("_", 1)[-1])


def restain(rgb: np.ndarray, od_scale: tuple[float, float, float]) -> np.ndarray:
    """The photograph as another lab might have stained it: its OD against the glass (the brightest
    percent of the photograph) multiplied per channel."""
    image = rgb.astype(np.float64)
    white = np.percentile(image.reshape(-1, 3), 99, axis=0)
    od = -np.log10(np.clip(image, 1, None) / white) * np.asarray(od_scale)
    return np.clip(np.round(white * 10.0**-od), 0, 255).astype(np.uint8)


def load_photos(
    bccd: Path,
    mpp: float,
    parity: int,
    bccd_mpp: float = BCCD_MPP,
    od_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> list[Photo]:
    """Photographs whose number has the given parity, resampled to ``mpp`` with their boxes (and
    restained with ``od_scale``, see :func:`restain`)."""
    scale = bccd_mpp / mpp
    photos = []
    for path in sorted((bccd / "JPEGImages").glob("*.jpg")):
        if photo_number(path) % 2 != parity:
            continue
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        if od_scale != (1.0, 1.0, 1.0):
            rgb = restain(rgb, od_scale)
        h, w = rgb.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        sx, sy = size[0] / w, size[1] / h
        xml = bccd / "Annotations" / (path.stem + ".xml")

        def scaled(name: str, sx: float = sx, sy: float = sy, xml: Path = xml) -> list:
            return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in voc_boxes(xml, name)]

        photos.append(Photo(path.stem, small, scaled("WBC"), scaled("Platelets")))
    return photos


def _inside(boxes: list[tuple[float, float, float, float]], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n_boxes, n_points) true where a point lies in a box (inclusive)."""
    if not boxes:
        return np.zeros((0, len(x)), dtype=bool)
    b = np.asarray(boxes, dtype=float)
    return (x[None] >= b[:, :1]) & (x[None] <= b[:, 2:3]) & (y[None] >= b[:, 1:2]) & (y[None] <= b[:, 3:4])


def segment_photo(photo: Photo, mpp: float, stains: SlideStains, params: SegmentParams) -> np.ndarray:
    """Object centroids ``(n, 2)`` (x, y in photo pixels) of a photograph padded with glass."""
    halo = math.ceil(required_halo_um(params) / mpp) + 2
    white = [round(v) for v in stains.white_rgb]
    padded = cv2.copyMakeBorder(photo.rgb, halo, halo, halo, halo, cv2.BORDER_CONSTANT, value=white)
    _, objects = segment(padded, mpp, stains, params)
    xy = objects[["x_px", "y_px"]].to_numpy(float) - halo
    h, w = photo.rgb.shape[:2]
    keep = (xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)
    return xy[keep]


def score(photos: list[Photo], centroids: list[np.ndarray]) -> dict[str, float | int | list[str]]:
    """White-cell boxes found, false objects (per image; those on platelets) and the missed photos."""
    found = total = false = on_platelet = duplicates = 0
    missed = []
    for photo, xy in zip(photos, centroids, strict=True):
        hit = _inside(photo.wbc, xy[:, 0], xy[:, 1])
        total += len(photo.wbc)
        found += int(hit.any(axis=1).sum())
        if len(photo.wbc) == 1:  # one cell cut into several objects (boxes of two cells may overlap)
            duplicates += max(0, int(hit[0].sum()) - 1)
        if len(photo.wbc) and not hit.any(axis=1).all():
            missed.append(photo.name)
        stray = ~hit.any(axis=0)
        false += int(stray.sum())
        on_platelet += int((_inside(photo.platelets, xy[:, 0], xy[:, 1]).any(axis=0) & stray).sum())
    return {
        "found": found,
        "total": total,
        "recall": found / max(total, 1),
        "false_per_image": false / max(len(photos), 1),
        "false_on_platelets_per_image": on_platelet / max(len(photos), 1),
        "duplicates": duplicates,
        "missed": missed,
    }


def evaluate_split(photos: list[Photo], mpp: float, params: SegmentParams) -> tuple[SlideStains, dict, dict]:
    """Scores with stains estimated from the whole split, and from each photograph alone."""
    stains = estimate_slide_stains([p.rgb for p in photos], mpp, params)
    pooled = score(photos, [segment_photo(p, mpp, stains, params) for p in photos])
    alone = []
    for p in photos:
        own = estimate_slide_stains([p.rgb], mpp, params)
        alone.append(segment_photo(p, mpp, own, params))
    return stains, pooled, score(photos, alone)


def _line(label: str, s: dict) -> str:
    return (
        f"  {label:<9} found {s['found']}/{s['total']} = {s['recall']:.1%}; "
        f"false objects/image {s['false_per_image']:.2f} "
        f"(on platelets {s['false_on_platelets_per_image']:.2f}); "
        f"cells split in two or more: {s['duplicates']}"
    )


def run_recall(
    bccd: Path,
    mpps: list[float],
    bccd_mpp: float,
    show_missed: bool,
    params: SegmentParams,
    od_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> None:
    """Print recall and false objects per overview pixel size and split."""
    print(f"BCCD at {bccd_mpp} um/px, OD x {od_scale}; {params}")
    for mpp in mpps:
        for split, parity in SPLITS.items():
            photos = load_photos(bccd, mpp, parity, bccd_mpp, od_scale)
            stains, pooled, alone = evaluate_split(photos, mpp, params)
            print(f"{mpp:g} um/px, {split}: {len(photos)} photographs")
            print(_line("pooled", pooled))
            print(_line("per-photo", alone))
            stats = {k: (tuple(round(v, 3) for v in x) if isinstance(x, tuple) else round(x, 4))
                     for k, x in asdict(stains).items()}  # fmt: skip
            print(f"  stains    {stats}")
            if show_missed and pooled["missed"]:
                print("  missed:", ", ".join(pooled["missed"]))
        sys.stdout.flush()


def _segment_as_detection(rgb: np.ndarray, mpp: float, stains: SlideStains, params: SegmentParams):
    """Segment as the runner's detection does: the tile's maps in one pass, then the objects."""
    maps = tile_maps(rgb, mpp, params, stains, _red_cell_unit(stains))
    return segment(rgb, mpp, stains, params, feature=maps.feature, white=maps.white)


def _time_segment(rgb: np.ndarray, mpp: float, stains: SlideStains, repeats: int) -> tuple[float, int]:
    params = SegmentParams()
    _segment_as_detection(rgb[:512, :512], mpp, stains, params)  # warm up
    best, n = math.inf, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, objects = _segment_as_detection(rgb, mpp, stains, params)
        best, n = min(best, time.perf_counter() - t0), len(objects)
    return best, n


def _time_tiled(rgb: np.ndarray, mpp: float, stains: SlideStains, tile_px: int) -> float:
    """Seconds to segment ``rgb`` in tiles of ``tile_px`` with the required halo (as the runner does)."""
    params = SegmentParams()
    halo = math.ceil(required_halo_um(params, mpp) / mpp)
    h, w = rgb.shape[:2]
    t0 = time.perf_counter()
    for y in range(0, h, tile_px):
        for x in range(0, w, tile_px):
            window = rgb[max(0, y - halo) : y + tile_px + halo, max(0, x - halo) : x + tile_px + halo]
            _segment_as_detection(np.ascontiguousarray(window), mpp, stains, params)
    return time.perf_counter() - t0


def _simulated_overview(tmp: Path, size_mm: float, mpp: float) -> np.ndarray:
    """A healthy monolayer from the project's simulator, scanned directly at the overview pixel size."""
    from pipeline.simulate import simulate_slide
    from pipeline.slide import open_slide

    sim = simulate_slide(
        tmp / "speed.svs", width_mm=size_mm, height_mm=size_mm, seed=1, preset="normal", mpp=mpp,
        placement="monolayer", workers=0, progress=False,
    )  # fmt: skip
    with open_slide(sim.slide_path) as slide:
        w, h = slide.level_dimensions[0]
        return slide.read_region(0, 0, 0, w, h)


def run_speed(bccd: Path, mpp: float = 1.0, size_px: int = 4096, repeats: int = 3) -> None:
    """Time segmentation as detection runs it (:func:`pipeline._tile_maps.tile_maps`: optical density,
    stain feature and red-cell layers; then :func:`segment`) on one thread, on two overviews.

    Wall time: for CPU time per tile, ring features included, see ``benchmarks/bench_detect_tile.py``.

    A mosaic of the photographs (a white cell every 46 x 35 um: as dense as a leukaemic smear, the worst
    case for the per-object work) and a simulated healthy monolayer (about 20 white cells per mm^2).
    """
    cv2.setNumThreads(1)
    photos, mosaic = bccd_mosaic(bccd, mpp, size_px)
    stains = estimate_slide_stains([p.rgb for p in photos[::4]], mpp, SegmentParams())
    best, n = _time_segment(mosaic, mpp, stains, repeats)
    print(
        f"BCCD mosaic {size_px}x{size_px} px at {mpp} um/px ({n} objects): "
        f"{best:.3f} s = {size_px * size_px / best / 1e6:.1f} Mpx/s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rgb = _simulated_overview(Path(tmp), size_px * mpp / 1000.0, mpp)
    windows = [rgb[y : y + 512, x : x + 512] for y in range(0, rgb.shape[0] - 511, 1024) for x in (0, 2048)]
    stains = estimate_slide_stains(windows, mpp, SegmentParams())
    best, n = _time_segment(rgb, mpp, stains, repeats)
    h, w = rgb.shape[:2]
    print(
        f"simulated healthy monolayer {w}x{h} px ({n} objects): {best:.3f} s = {w * h / best / 1e6:.1f} Mpx/s"
    )
    for tile_px in (1024, 2048):
        seconds = min(_time_tiled(rgb, mpp, stains, tile_px) for _ in range(repeats))
        print(
            f"  in {tile_px} px tiles with the {required_halo_um(SegmentParams(), mpp):.0f} um halo: "
            f"{seconds:.3f} s = {w * h / seconds / 1e6:.1f} Mpx/s of slide"
        )


def bccd_mosaic(bccd: Path, mpp: float, size_px: int) -> tuple[list, np.ndarray]:
    """Every BCCD photograph at ``mpp``, and a ``size_px`` square mosaic of them edge to edge."""
    photos = load_photos(bccd, mpp, 0) + load_photos(bccd, mpp, 1)
    th = min(p.rgb.shape[0] for p in photos)
    tw = min(p.rgb.shape[1] for p in photos)
    rows, cols = math.ceil(size_px / th), math.ceil(size_px / tw)
    grid = [p.rgb[:th, :tw] for p in photos]
    mosaic = np.vstack(
        [np.hstack([grid[(r * cols + c) % len(grid)] for c in range(cols)]) for r in range(rows)]
    )[:size_px, :size_px]
    return photos, np.ascontiguousarray(mosaic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bccd", type=Path, default=DEFAULT_BCCD)
    parser.add_argument("--mpp", type=float, nargs="+", default=[0.5, 0.8, 1.0, 1.5, 2.0])
    parser.add_argument("--bccd-mpp", type=float, default=BCCD_MPP, help="pixel size of the photographs")
    parser.add_argument("--missed", action="store_true", help="list photographs with a missed box")
    parser.add_argument(
        "--stain", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("R", "G", "B"),
        help="restain the photographs: multiply their OD per channel (another lab's stain)",
    )  # fmt: skip
    parser.add_argument("--threshold", type=float, default=None, help="a fixed threshold (OD) instead")
    parser.add_argument("--speed", action="store_true", help="time segment() instead")
    args = parser.parse_args()
    if args.speed:
        run_speed(args.bccd)
    else:
        params = SegmentParams(threshold=args.threshold)
        run_recall(args.bccd, args.mpp, args.bccd_mpp, args.missed, params, tuple(args.stain))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
