"""Realism report: the same statistics on simulated monolayer fields and on real smear photographs.

Usage (from the repository root)::

    python -m benchmarks.realism                 # held-out real images (every 3rd), 4 simulated slides
    python -m benchmarks.realism --split calibration --limit 60 --json realism.json

Real sets (../shared/data, or ``--data``): chula-rbc (red cells, all labelled), txl-pbc-train (white
cells, red cells and platelets boxed, three labs) and bccd (boxes). Each image is resampled to
0.25 um/px from its set's pixel size (SOURCE.md of each set). The simulator was calibrated on the other
two thirds of the images (``--split calibration``); the default reports on the held-out third.

For every statistic (benchmarks/realism_stats.py) the report prints the real sets' median and
10th-90th percentile over fields, each set's median, and the simulated median; ``OUT`` marks a
simulated median outside the real 10-90 range. Exit code 1 if any statistic is out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

from benchmarks.real_smears import SOURCES, voc_boxes, yolo_boxes
from benchmarks.realism_stats import MPP, STATISTICS, Field, field_stats, resample

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHULA_MPP = 0.18
BCCD_MPP = SOURCES["bccd"].um_per_px
#: TXL-PBC sources told apart by image height (SOURCE.md): PBC, Raabin-WBC, BCD.
TXL_MPP_BY_HEIGHT = {
    h: s.um_per_px for s in SOURCES.values() if s.folder == "txl-pbc-train" for _, h in s.sizes
}
SPLITS = ("heldout", "calibration", "all")
SIM_FIELD_PX = (460, 345)  # a chula-rbc field (640 x 480 at 0.18 um/px) at 0.25 um/px
SIM_WBC_FIELD_PX = 240


def _in_split(index: int, split: str) -> bool:
    held_out = index % 3 == 2
    return split == "all" or (split == "heldout") == held_out


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"cannot read {path}: a damaged image in the real set; remove it or restore it")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _boxes_to_objects(boxes: list[tuple[float, float, float, float]], shape, scale: float, mpp: float):
    """(x0, y0, x1, y1) in source px -> (x_px, y_px, diameter_um) at MPP; boxes cut by the border get NaN."""
    h, w = shape[:2]
    rows = []
    for x0, y0, x1, y1 in boxes:
        cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        cut = cx - bw / 2 < 2 or cy - bh / 2 < 2 or cx + bw / 2 > w - 2 or cy + bh / 2 > h - 2
        d = math.nan if cut else math.sqrt(bw * bh) * mpp
        rows.append((cx * scale, cy * scale, d))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def chula_fields(root: Path, split: str, limit: int) -> Iterator[Field]:
    """chula-rbc: every red cell labelled by its centre."""
    images = sorted((root / "images").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
    taken = 0
    for i, path in enumerate(images):
        label = root / "labels" / f"{path.stem}.txt"
        if not _in_split(i, split) or not label.exists():
            continue
        rgb, scale = resample(_read_rgb(path), CHULA_MPP)
        xy = np.loadtxt(label, ndmin=2)[:, :2] if label.stat().st_size else np.zeros((0, 2))
        rbc = np.column_stack([xy * scale, np.full(len(xy), math.nan)])
        yield Field(rgb, rbc=rbc, rbc_complete=True, source="chula-rbc")
        taken += 1
        if taken >= limit:
            return


def txl_fields(root: Path, split: str, limit: int) -> Iterator[Field]:
    """txl-pbc-train: YOLO boxes of white cells (0), red cells (1) and platelets (2)."""
    taken = 0
    for i, path in enumerate(sorted((root / "images").glob("*.jpg"))):
        label = root / "labels" / f"{path.stem}.txt"
        if not _in_split(i, split) or not label.exists():
            continue
        raw = _read_rgb(path)
        mpp = TXL_MPP_BY_HEIGHT.get(raw.shape[0])
        if mpp is None:
            continue
        rgb, scale = resample(raw, mpp)
        h, w = raw.shape[:2]
        boxes = {c: yolo_boxes(label, w, h, c) for c in (0, 1, 2)}
        yield Field(
            rgb,
            rbc=_boxes_to_objects(boxes[1], raw.shape, scale, mpp),
            wbc=_boxes_to_objects(boxes[0], raw.shape, scale, mpp),
            platelets=_boxes_to_objects(boxes[2], raw.shape, scale, mpp),
            source="txl-pbc",
        )
        taken += 1
        if taken >= limit:
            return


def bccd_fields(root: Path, split: str, limit: int) -> Iterator[Field]:
    """bccd: Pascal VOC boxes (RBC, WBC, Platelets)."""
    taken = 0
    for i, path in enumerate(sorted((root / "JPEGImages").glob("*.jpg"))):
        xml = root / "Annotations" / f"{path.stem}.xml"
        if not _in_split(i, split) or not xml.exists():
            continue
        raw = _read_rgb(path)
        rgb, scale = resample(raw, BCCD_MPP)
        boxes = {name: voc_boxes(xml, name) for name in ("RBC", "WBC", "Platelets")}
        yield Field(
            rgb,
            rbc=_boxes_to_objects(boxes["RBC"], raw.shape, scale, BCCD_MPP),
            wbc=_boxes_to_objects(boxes["WBC"], raw.shape, scale, BCCD_MPP),
            platelets=_boxes_to_objects(boxes["Platelets"], raw.shape, scale, BCCD_MPP),
            source="bccd",
        )
        taken += 1
        if taken >= limit:
            return


REAL_SETS: dict[str, tuple[str, Callable[[Path, str, int], Iterator[Field]]]] = {
    "chula-rbc": ("chula-rbc", chula_fields),
    "txl-pbc": ("txl-pbc-train", txl_fields),
    "bccd": ("bccd", bccd_fields),
}


def simulated_fields(seeds: list[int], preset: str = "normal", per_seed: int = 6) -> Iterator[Field]:
    """Monolayer fields of simulated slides: plain fields, and fields centred on white cells."""
    from pipeline.simulate.presets import get_preset
    from pipeline.simulate.render import SlideModel, render_region
    from pipeline.simulate.scene import SceneSpec

    for seed in seeds:
        model = SlideModel(SceneSpec(40000, 40000, MPP, seed, get_preset(preset), "monolayer"))
        rng = np.random.default_rng(seed)
        w, h = SIM_FIELD_PX
        for _ in range(per_seed):
            x0, y0 = (int(v) for v in rng.integers(4000, 36000 - w, 2))
            yield _simulated_field(model, render_region, x0, y0, w, h)
        # White cells: the first few of a 3 x 3 mm window, each in a field around it.
        cells = model.scene.nucleated_in_rect(5000, 5000, 8000, 8000)
        half = SIM_WBC_FIELD_PX // 2
        for k in range(min(per_seed * 2, len(cells))):
            cx, cy = int(cells.x_um[k] / MPP), int(cells.y_um[k] / MPP)
            yield _simulated_field(model, render_region, cx - half, cy - half, 2 * half, 2 * half)


def _simulated_field(model, render_region, x0: int, y0: int, w: int, h: int) -> Field:
    from pipeline.simulate.render import simple_object_diameters_um

    region = render_region(model, x0, y0, w, h)
    scene = model.scene
    x0_um, y0_um, x1_um, y1_um = x0 * MPP, y0 * MPP, (x0 + w) * MPP, (y0 + h) * MPP
    margin = 40.0
    nucleated = scene.nucleated_in_rect(x0_um - margin, y0_um - margin, x1_um + margin, y1_um + margin)
    red = scene.red_cells(x0_um, y0_um, x1_um, y1_um, nucleated)
    plt = scene.platelets_in_rect(x0_um, y0_um, x1_um, y1_um)
    rbc_d, plt_d = simple_object_diameters_um(model, red, plt)
    cells = region.cells
    return Field(
        region.rgb,
        rbc=np.column_stack([red.x_um / MPP - x0, red.y_um / MPP - y0, rbc_d]),
        wbc=np.column_stack([cells.x_um / MPP - x0, cells.y_um / MPP - y0, region.diameter_um]),
        platelets=np.column_stack([plt.x_um / MPP - x0, plt.y_um / MPP - y0, plt_d]),
        rbc_complete=True,
        source="simulated",
    )


def collect(fields: Iterator[Field]) -> dict[str, list[float]]:
    """Statistics of every field, as lists per statistic (NaN dropped)."""
    values: dict[str, list[float]] = {k: [] for k in STATISTICS}
    for f in fields:
        for key, v in field_stats(f).items():
            if np.isfinite(v):
                values[key].append(v)
    return values


def detector_recall_rows(data: Path, seed: int = 1, size_mm: float = 1.5) -> list[tuple]:
    """Detector gallery recall and precision on a simulated monolayer vs the real mosaics:
    ``(name, sim recall, real recall, sim precision, real precision)``.

    The simulated side: a ``size_mm`` square ``mll23`` monolayer slide with the simulator's defaults
    (every artefact: debris, dust, precipitate, focus changes, seams), run end to end and evaluated
    against its truth (accepted cells found, of the monolayer's white cells; accepted cells that are
    white cells). The real side: ``benchmarks.real_smears`` on each source's held-out half at 0.25 um/px
    (gallery recall over the cells not cut by their photograph's border, gallery precision), and pooled.
    """
    import tempfile

    from benchmarks.real_smears import SOURCES, run_source
    from pipeline.evaluate import evaluate_gallery
    from pipeline.runner import run_slide
    from pipeline.simulate import simulate_slide

    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_slide(
            Path(tmp) / "monolayer.svs", width_mm=size_mm, height_mm=size_mm, seed=seed, preset="mll23",
            placement="monolayer", workers=0, progress=False,
        )  # fmt: skip
        result = run_slide(sim.slide_path, Path(tmp) / "out", workers=0, progress=False)
        accepted = evaluate_gallery(result.gallery, sim.truth_path)["accepted"]
        sim_recall = accepted["recall_by_zone"]["monolayer"]
        sim_precision = accepted["precision_by_zone"]["monolayer"]
    rows, found, total, true_kept, kept = [], 0.0, 0, 0.0, 0.0
    for name, source in SOURCES.items():
        row = run_source(source, "held-out", 0.25, data=data)
        rows.append(
            (f"vs {name}", sim_recall, row["gallery_recall"], sim_precision, row["gallery_precision"])
        )
        found += row["gallery_recall"] * row["uncut"]
        total += row["uncut"]
        judged = row["accepted"] - row["unjudged"]  # accepted cells whose truth is known
        true_kept += row["gallery_precision"] * judged
        kept += judged
    pooled = (
        "vs all real (pooled)",
        sim_recall,
        found / max(total, 1),
        sim_precision,
        true_kept / max(kept, 1),
    )
    return [pooled, *rows]


def report(
    real: dict[str, dict[str, list[float]]],
    sim: dict[str, list[float]],
    recall: list[tuple[str, float, float]] | None = None,
) -> tuple[str, list[str]]:
    """The side-by-side table and the statistics whose simulated median lies outside the real 10-90 %."""
    sets = list(real)
    head = f"{'statistic':<24} {'real p10':>9} {'median':>8} {'p90':>8} " + " ".join(
        f"{s[:9]:>9}" for s in sets
    )
    lines = [head + f" {'simulated':>9}  flag", "-" * (len(head) + 16)]
    out = []
    for key in STATISTICS:
        pooled = [v for s in sets for v in real[s][key]]
        sim_values = sim[key]
        if not pooled or not sim_values:
            continue
        p10, p50, p90 = np.percentile(pooled, [10, 50, 90])
        m = float(np.median(sim_values))
        flag = "" if p10 <= m <= p90 else "OUT"
        if flag:
            out.append(key)
        per_set = " ".join(f"{np.median(real[s][key]):>9.3g}" if real[s][key] else f"{'-':>9}" for s in sets)
        lines.append(f"{key:<24} {p10:>9.3g} {p50:>8.3g} {p90:>8.3g} {per_set} {m:>9.3g}  {flag}")
    lines.append("")
    lines += [f"  {k}: {v}" for k, v in STATISTICS.items()]
    lines.append("")
    if recall:
        lines.append(f"{'gallery recall':<24} {'simulated':>9} {'real':>8}  (within 5 points?)")
        for name, s, r, *_ in recall:
            flag = "" if abs(s - r) <= 0.05 else "OUT"
            lines.append(f"{name:<24} {s:>9.1%} {r:>8.1%}  {flag}")
        if len(recall[0]) > 3:
            lines.append(f"{'gallery precision':<24} {'simulated':>9} {'real':>8}")
            for name, _, _, sp, rp in recall:
                lines.append(f"{name:<24} {sp:>9.1%} {rp:>8.1%}")
        if abs(recall[0][1] - recall[0][2]) > 0.05:
            out.append("gallery recall (simulated vs real, pooled)")
    else:
        lines.append("gallery recall, simulated vs real mosaics: not measured (--no-detector)")
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the real sets")
    parser.add_argument("--split", choices=SPLITS, default="heldout", help="real images to measure")
    parser.add_argument("--limit", type=int, default=10_000, help="at most this many images per set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4], help="simulated slides")
    parser.add_argument("--preset", default="normal", help="simulator preset")
    parser.add_argument("--json", type=Path, help="also write all per-field values here")
    parser.add_argument(
        "--no-detector", action="store_true", help="skip the detector's recall on simulated and real slides"
    )
    args = parser.parse_args(argv)
    real = {}
    for name, (folder, loader) in REAL_SETS.items():
        root = args.data / folder
        if not root.is_dir():
            raise SystemExit(f"real set {root} not found; pass --data with the folder holding {folder}/")
        real[name] = collect(loader(root, args.split, args.limit))
    sim = collect(simulated_fields(args.seeds, args.preset))
    recall = None if args.no_detector else detector_recall_rows(args.data)
    text, out = report(real, sim, recall)
    print(f"real images: {args.split} split; simulated: preset {args.preset}, seeds {args.seeds}\n")
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"real": real, "simulated": sim}, indent=1))
    if out:
        print(f"\n{len(out)} statistic(s) outside the real 10-90 % range: {', '.join(out)}")
        return 1
    print("\nevery statistic inside the real 10-90 % range")
    return 0


if __name__ == "__main__":
    sys.exit(main())
