"""Detection and the quality filter on real smears: photographs from four labs tiled into slides.

Real photographs with white-cell boxes (../shared/data, each folder with its SOURCE.md):

========  ==========================================  ======  ===========================
source    what                                        um/px   file
========  ==========================================  ======  ===========================
pbc       CellaVision DM96, MGG (Barcelona)           0.106   txl-pbc-train, 360 x 363 px
raabin    camera on a microscope, Giemsa (Iran)       0.060   txl-pbc-train, 575 x 575 px
bcd       microscope fields, pale varied glass        0.099   txl-pbc-train, 416 x 416 px
bccd      Giemsa-type (Shenggan/BCCD_Dataset)         0.072   bccd, 640 x 480 px
========  ==========================================  ======  ===========================

The pixel sizes are the SOURCE.md estimates from red-cell size. Each source's photographs are resampled
(``cv2.INTER_AREA``) to the slide's pixel size (0.25 um/px, or 0.5) and tiled edge to edge, in rows, into
an Aperio SVS (:func:`pipeline.simulate.svs.write_svs`); the box centres are the truth. The whole pipeline
(:func:`pipeline.runner.run_slide`) runs on the slide, in this process.

Scores, per source:

- **candidate recall**: boxes holding a candidate's centre (one-to-one, nearest first), of the boxes *not
  cut by their photograph's border* (a box within :data:`CUT_MARGIN_UM` of it); ``candidate_recall_all``
  (JSON) counts every box, slivers of cut cells too small to be an object of 40 um^2 included;
- **gallery recall**: boxes holding an accepted cell's centre, of the uncut boxes: a cut cell is one a
  gallery should reject, so it is left out of recall, and an accepted cut cell still counts as a white
  cell;
- **gallery precision**: accepted cells matched to a box, of all accepted cells (a second cell in one box
  counts as a false one);
- **rejects**: the reasons the quality filter gave the candidates of uncut boxes (good cells lost), and
  the candidates of no box.

Splits, so that tuning does not fit what is reported: BCCD keeps its even/odd numbering (even
photographs tune, odd ones are held out); the txl-pbc-train sources are split by the CRC-32 of the file
name (even: tune, odd: held out). ``--split held-out`` is what the acceptance numbers quote.

Usage (from the repository root)::

    python -m benchmarks.real_smears                           # held-out halves, 0.25 and 0.5 um/px
    python -m benchmarks.real_smears --split tune --mpp 0.25   # the tuning halves
    python -m benchmarks.real_smears --sources raabin --limit 60 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: A box closer than this to its photograph's border (um) is a cut cell.
CUT_MARGIN_UM = 1.0
#: An accepted cell in no box and this close to its photograph's border (um) is left out of precision.
BORDER_UM = 5.0


@dataclass(frozen=True)
class Source:
    """One set of photographs with white-cell boxes."""

    name: str
    folder: str
    um_per_px: float
    #: (width, height) of its photographs, where one folder holds several sources
    sizes: tuple[tuple[int, int], ...] = ()
    lab: str = ""
    #: Every photograph was taken around a white cell: one without a box is unlabelled, not empty.
    centred: bool = False


SOURCES = {
    "pbc": Source("pbc", "txl-pbc-train", 0.106, ((360, 363), (366, 369)), "CellaVision DM96, MGG", True),
    "raabin": Source("raabin", "txl-pbc-train", 0.060, ((575, 575),), "camera on a microscope, Giemsa", True),
    "bcd": Source("bcd", "txl-pbc-train", 0.099, ((416, 416),), "microscope, pale varied glass"),
    "bccd": Source("bccd", "bccd", 0.072, (), "Giemsa-type, BCCD"),
}
SPLITS = ("tune", "held-out", "all")


@dataclass
class Photo:
    """A photograph and its white-cell boxes (x0, y0, x1, y1 in its own pixels)."""

    name: str
    rgb: np.ndarray
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- loading
def in_split(source: Source, path: Path, split: str) -> bool:
    """Whether a photograph belongs to ``split`` (see the module docstring)."""
    if split == "all":
        return True
    if source.folder == "bccd":
        odd = int(path.stem.rsplit("_", 1)[-1]) % 2 == 1
    else:
        odd = zlib.crc32(path.name.encode()) % 2 == 1
    return odd == (split == "held-out")


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def voc_boxes(xml_path: Path, name: str = "WBC") -> list[tuple[float, float, float, float]]:
    """Boxes ``(x0, y0, x1, y1)`` of objects called ``name`` in a Pascal VOC file (none if it is missing)."""
    if not xml_path.exists():
        return []
    boxes = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        if (obj.findtext("name") or "").strip() == name:
            bb = obj.find("bndbox")
            boxes.append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def yolo_boxes(txt: Path, width: int, height: int, cls: int = 0) -> list[tuple[float, float, float, float]]:
    """Boxes ``(x0, y0, x1, y1)`` of class ``cls`` in a YOLO label file (none if it is missing)."""
    boxes = []
    if not txt.exists():
        return boxes
    for line in txt.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5 or int(parts[0]) != cls:
            continue
        cx, cy, bw, bh = (float(v) for v in parts[1:])
        boxes.append(
            ((cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width, (cy + bh / 2) * height)
        )
    return boxes


def _distinct(boxes: list[tuple[float, float, float, float]]) -> list[tuple[float, float, float, float]]:
    """Boxes without repeats: a box lying mostly (>= 60 % of its area) inside a larger one marks the same
    cell twice (BCD has five such pairs)."""

    def area(b: tuple[float, float, float, float]) -> float:
        return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])

    kept: list[tuple[float, float, float, float]] = []
    for b in sorted(boxes, key=area, reverse=True):
        inside = [
            max(0.0, min(b[2], k[2]) - max(b[0], k[0])) * max(0.0, min(b[3], k[3]) - max(b[1], k[1]))
            for k in kept
        ]
        if not any(i >= 0.6 * area(b) for i in inside):
            kept.append(b)
    return kept


def load_source(source: Source, split: str, data: Path = DATA, limit: int | None = None) -> list[Photo]:
    """The photographs of one source in ``split``, in file-name order (at most ``limit``)."""
    folder = data / source.folder
    if source.folder == "bccd":
        paths = sorted((folder / "JPEGImages").glob("*.jpg"))
    else:
        paths = sorted((folder / "images").glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no photographs under {folder}; see benchmarks/real_smears.py for the data")
    photos = []
    for path in paths:
        if not in_split(source, path, split):
            continue
        rgb = _read_rgb(path)
        h, w = rgb.shape[:2]
        if source.sizes and (w, h) not in source.sizes:
            continue
        if source.folder == "bccd":
            boxes = voc_boxes(folder / "Annotations" / f"{path.stem}.xml")
        else:
            boxes = yolo_boxes(folder / "labels" / f"{path.stem}.txt", w, h)
        photos.append(Photo(path.stem, rgb, _distinct(boxes)))
        if limit is not None and len(photos) >= limit:
            break
    return photos


# -------------------------------------------------------------------------------------------- mosaic
def build_mosaic(
    photos: Sequence[Photo], um_per_px: float, out: Path, mpp: float = 0.25, columns: int | None = None
) -> pd.DataFrame:
    """Tile photographs (resampled to ``mpp``) edge to edge into an SVS; return the truth, one row a box.

    Photographs of one source share a size; the few that are larger are centre-cropped to the smallest.
    Truth columns: ``image``, ``x_px``, ``y_px`` (box centre, level-0 px), ``x0, y0, x1, y1`` (box) and
    ``cut`` (the box lies within :data:`CUT_MARGIN_UM` of its photograph's border).
    """
    from pipeline.simulate.svs import write_svs

    scale = um_per_px / mpp
    tiles = [cv2.resize(p.rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) for p in photos]
    th, tw = min(t.shape[0] for t in tiles), min(t.shape[1] for t in tiles)
    columns = columns or max(1, round(math.sqrt(len(tiles) * th / tw)))
    # Whole rows only (the last photographs that do not fill a row are left out): no place of the slide
    # without a photograph, and none shown twice.
    rows = max(1, len(tiles) // columns)
    columns = min(columns, len(tiles))
    mosaic = np.empty((rows * th, columns * tw, 3), np.uint8)
    truth = []
    unboxed: list[tuple[int, int]] = []
    margin = CUT_MARGIN_UM / mpp
    for k in range(rows * columns):
        tile = tiles[k]
        dy, dx = (tile.shape[0] - th) // 2, (tile.shape[1] - tw) // 2
        r, c = divmod(k, columns)
        y0, x0 = r * th, c * tw
        mosaic[y0 : y0 + th, x0 : x0 + tw] = tile[dy : dy + th, dx : dx + tw]
        if not photos[k].boxes:
            unboxed.append((x0, y0))
        for bx0, by0, bx1, by1 in photos[k].boxes:
            b = np.array([bx0 * scale - dx, by0 * scale - dy, bx1 * scale - dx, by1 * scale - dy])
            cut = b[0] < margin or b[1] < margin or b[2] > tw - margin or b[3] > th - margin
            b = np.clip(b, 0, [tw, th, tw, th])
            truth.append(
                {
                    "image": photos[k].name,
                    "x_px": x0 + (b[0] + b[2]) / 2,
                    "y_px": y0 + (b[1] + b[3]) / 2,
                    "x0": x0 + b[0],
                    "y0": y0 + b[1],
                    "x1": x0 + b[2],
                    "y1": y0 + b[3],
                    "cut": bool(cut),
                }
            )
    write_svs(mosaic, out, mpp)
    table = pd.DataFrame(truth, columns=["image", "x_px", "y_px", "x0", "y0", "x1", "y1", "cut"])
    table.attrs.update(photo_px=(tw, th), photos=rows * columns, unboxed=unboxed)
    return table


# ----------------------------------------------------------------------------------------- scoring
def match_boxes(truth: pd.DataFrame, x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
    """For each box, the index of the detection matched to it (-1: none): a detection's centre must lie
    in the box; pairs are taken nearest first, each box and each detection at most once."""
    match = np.full(len(truth), -1, dtype=np.int64)
    if len(truth) == 0 or len(x_px) == 0:
        return match
    pairs = []
    order = np.argsort(x_px)
    xs = x_px[order]
    for i, row in enumerate(truth.itertuples(index=False)):
        lo, hi = np.searchsorted(xs, row.x0, "left"), np.searchsorted(xs, row.x1, "right")
        for j in order[lo:hi]:
            if row.y0 <= y_px[j] <= row.y1:
                pairs.append((math.hypot(x_px[j] - row.x_px, y_px[j] - row.y_px), i, int(j)))
    used = set()
    for _, i, j in sorted(pairs):
        if match[i] < 0 and j not in used:
            match[i] = j
            used.add(j)
    return match


def _inside_any(truth: pd.DataFrame, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    b = truth[["x0", "y0", "x1", "y1"]].to_numpy(float)
    if len(b) == 0:
        return np.zeros(len(x), bool)
    return (
        (x[:, None] >= b[:, 0]) & (x[:, None] <= b[:, 2]) & (y[:, None] >= b[:, 1]) & (y[:, None] <= b[:, 3])
    ).any(1)


def _near_photo_border(
    x: np.ndarray, y: np.ndarray, photo_px: tuple[int, int], margin_px: float
) -> np.ndarray:
    tw, th = photo_px
    fx, fy = np.mod(x, tw), np.mod(y, th)
    return (fx < margin_px) | (fx > tw - margin_px) | (fy < margin_px) | (fy > th - margin_px)


def score(truth: pd.DataFrame, candidates: pd.DataFrame, mpp: float, centred: bool = False) -> dict:
    """The benchmark's numbers for one slide (see the module docstring).

    An accepted cell that matches no box is *split* when its centre lies in a box (a second object in
    one cell), *unjudged* when it lies within :data:`BORDER_UM` of its photograph's border (cells cut
    by the photograph, which the sets do not always box: neither right nor wrong) or, for sources whose
    every photograph was taken around a white cell (``centred``), in a photograph with no box (four
    Raabin and one PBC photograph lack their label), else *false*.
    Precision = matched / (matched + split + false).
    """
    x = candidates["x_px"].to_numpy(float)
    y = candidates["y_px"].to_numpy(float)
    accepted = candidates["accepted"].to_numpy(bool)
    reasons = candidates["reason"].astype(str).to_numpy()
    by_candidate = match_boxes(truth, x, y)
    acc_idx = np.flatnonzero(accepted)
    by_accepted = match_boxes(truth, x[acc_idx], y[acc_idx])
    uncut = ~truth["cut"].to_numpy(bool)
    # good cells lost: uncut boxes no accepted cell matched, by the reason of their own candidate
    lost = [
        reasons[j]
        for j, u, a in zip(by_candidate, uncut, by_accepted, strict=True)
        if j >= 0 and u and a < 0 and not accepted[j]
    ]
    unmatched = np.ones(len(acc_idx), bool)
    unmatched[by_accepted[by_accepted >= 0]] = False
    ux, uy = x[acc_idx][unmatched], y[acc_idx][unmatched]
    split = _inside_any(truth, ux, uy)
    border = ~split & _near_photo_border(ux, uy, truth.attrs["photo_px"], BORDER_UM / mpp)
    if centred:  # a photograph taken around a white cell that has no box is unlabelled
        tw, th = truth.attrs["photo_px"]
        unboxed = set(truth.attrs["unboxed"])
        border |= ~split & np.array(
            [(int(a // tw) * tw, int(b // th) * th) in unboxed for a, b in zip(ux, uy, strict=True)], bool
        )
    false = ~split & ~border
    hits = int((by_accepted >= 0).sum())
    judged = hits + int(split.sum()) + int(false.sum())
    return {
        "boxes": len(truth),
        "uncut": int(uncut.sum()),
        "candidates": len(candidates),
        "candidate_recall": float((by_candidate[uncut] >= 0).mean()) if uncut.any() else math.nan,
        "candidate_recall_all": float((by_candidate >= 0).mean()) if len(truth) else math.nan,
        "gallery_recall": float((by_accepted[uncut] >= 0).mean()) if uncut.any() else math.nan,
        "accepted": len(acc_idx),
        "gallery_precision": hits / judged if judged else math.nan,
        "split_cells": int(split.sum()),
        "false": int(false.sum()),
        "unjudged": int(border.sum()),
        "good_rejected_by": dict(pd.Series(lost, dtype=object).value_counts().astype(int)),
    }


# -------------------------------------------------------------------------------------------- run
def run_source(
    source: Source,
    split: str,
    mpp: float,
    *,
    data: Path = DATA,
    limit: int | None = None,
    workers: int = 0,
    params=None,
    keep: Path | None = None,
) -> dict:
    """Build one source's mosaic, run the pipeline on it and score it."""
    from pipeline.gallery import open_gallery
    from pipeline.runner import run_slide

    photos = load_source(source, split, data, limit)
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        slide = folder / f"{source.name}_{split}_{mpp:g}.svs"
        truth = build_mosaic(photos, source.um_per_px, slide, mpp)
        started = time.perf_counter()
        result = run_slide(
            slide, folder / "out", params=params, workers=workers, progress=False, overwrite=True
        )
        seconds = time.perf_counter() - started
        gallery = open_gallery(result.gallery)
        result_score = score(truth, gallery.candidates, mpp, source.centred)
        estimate = gallery.attrs.get("estimate", {})
        warnings = gallery.attrs.get("warnings", [])
    result_score.update(
        source=source.name, split=split, mpp=mpp, photos=truth.attrs["photos"], seconds=round(seconds, 1),
        threshold_od=estimate.get("stains", {}).get("threshold_od"), warnings=warnings,
    )  # fmt: skip
    return result_score


def format_table(rows: list[dict]) -> str:
    """The per-source table printed by the benchmark."""
    head = (
        f"{'source':<8} {'split':<9} {'um/px':>5} {'photos':>6} {'boxes':>5} {'uncut':>5} "
        f"{'cand.rec':>8} {'gal.rec':>7} {'gal.prec':>8} {'acc':>5} {'split':>5} {'false':>5} {'unjudg':>6}"
        "  good cells rejected by"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lost = ", ".join(f"{k} {v}" for k, v in r["good_rejected_by"].items()) or "-"
        lines.append(
            f"{r['source']:<8} {r['split']:<9} {r['mpp']:>5g} {r['photos']:>6} {r['boxes']:>5} "
            f"{r['uncut']:>5} "
            f"{r['candidate_recall']:>8.1%} {r['gallery_recall']:>7.1%} {r['gallery_precision']:>8.1%} "
            f"{r['accepted']:>5} {r['split_cells']:>5} {r['false']:>5} {r['unjudged']:>6}  {lost}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--split", choices=SPLITS, default="held-out")
    parser.add_argument("--mpp", type=float, nargs="+", default=[0.25, 0.5], help="slide pixel sizes")
    parser.add_argument("--limit", type=int, default=None, help="at most this many photographs a source")
    parser.add_argument("--workers", type=int, default=0, help="Dask workers (0: in this process)")
    parser.add_argument("--keep", type=Path, default=None, help="keep slides and galleries in this folder")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args(argv)
    rows = []
    for mpp in args.mpp:
        for name in args.sources:
            row = run_source(
                SOURCES[name], args.split, mpp, data=args.data, limit=args.limit, workers=args.workers,
                keep=None if args.keep is None else args.keep / f"{name}_{mpp:g}",
            )  # fmt: skip
            rows.append(row)
            print(format_table([row]).splitlines()[-1] if len(rows) > 1 else format_table([row]), flush=True)
    print()
    print(format_table(rows))
    for r in rows:
        if r["warnings"]:
            print(f"{r['source']} {r['mpp']:g} um/px warnings: {'; '.join(r['warnings'])}")
    if args.json:
        print(json.dumps(rows, indent=1, default=float))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
