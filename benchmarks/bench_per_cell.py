"""CPU time per cell of the two full-resolution stages, in one process: re-centring and the crop.

Re-runs, on the first ``--cells`` cells of a finished gallery of the slide, exactly the tasks a worker
runs (``_relocate_task`` on batches of 64 from the overview positions, ``_shard_task`` on shards of the
gallery's size into a scratch gallery), measures their CPU time (``time.process_time``: every thread of
the process, zarr's codec threads included), and checks that the new centres, blur and crops are those
of the gallery, bit for bit (so a gallery written by an older version tells whether its results changed).

Usage (from the repository root)::

    python -m pipeline run slide.svs --out OUT
    python -m benchmarks.bench_per_cell slide.svs OUT/slide.zarr --cells 2048
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from pipeline.gallery import create_gallery, open_gallery
from pipeline.runner import (
    RunParams,
    SlideRef,
    _estimate_task,
    _relocate_task,
    _shard_task,
    plan_slide,
    sample_windows,
    stain_map,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", type=Path)
    parser.add_argument("gallery", type=Path, help="a finished gallery of the slide, default parameters")
    parser.add_argument("--cells", type=int, default=2048)
    args = parser.parse_args()
    gallery = open_gallery(args.gallery)
    params = RunParams()
    plan = plan_slide(SlideRef(str(args.slide), None), params)
    estimate = _estimate_task(sample_windows(plan, params.stat_samples, stains=stain_map(plan)), plan)

    relocated = gallery.candidates[gallery.candidates["relocated"]].iloc[: args.cells]
    overview = pd.DataFrame(
        {"x_px": relocated["x_overview_px"].to_numpy(), "y_px": relocated["y_overview_px"].to_numpy()},
        index=relocated.index,
    )
    started = time.process_time()
    moved = pd.concat(
        [_relocate_task(overview.iloc[i : i + 64], plan, estimate) for i in range(0, len(overview), 64)]
    )
    relocate_ms = (time.process_time() - started) / len(overview) * 1e3
    same_centres = np.array_equal(moved["x_px"].to_numpy(), relocated["x_px"].to_numpy()) and np.array_equal(
        moved["y_px"].to_numpy(), relocated["y_px"].to_numpy()
    )
    same_blur = np.array_equal(moved["blur_um"].to_numpy(), relocated["blur_um"].to_numpy(), equal_nan=True)

    cells = gallery.cells.iloc[: args.cells]
    with tempfile.TemporaryDirectory() as tmp:
        draft = create_gallery(
            Path(tmp) / "scratch.zarr",
            len(cells),
            {c: cells[c].to_numpy() for c in cells.columns},
            {c: gallery.candidates[c].to_numpy() for c in gallery.candidates.columns},
            {},
            crop_px=int(gallery.attrs["crop_px"]),
            shard_cells=int(gallery.attrs["shard_cells"]),
        )
        xs, ys = cells["x_px"].to_numpy(), cells["y_px"].to_numpy()
        started = time.process_time()
        for i, (a, b) in enumerate(draft.shard_ranges()):
            _shard_task((i, xs[a:b], ys[a:b]), plan, str(draft.partial_path))
        crop_ms = (time.process_time() - started) / len(cells) * 1e3
        images = zarr.open_array(draft.partial_path / "images", mode="r")
        same_crops = all(np.array_equal(images[a:b], gallery.images[a:b]) for a, b in draft.shard_ranges())
    print(
        f"{len(overview)} re-centred: {relocate_ms:.2f} ms CPU per cell (same centres: {same_centres}, "
        f"same blur: {same_blur}); {len(cells)} crops: {crop_ms:.2f} ms CPU per cell "
        f"(same pixels: {same_crops})"
    )


if __name__ == "__main__":
    main()
