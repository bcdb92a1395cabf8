"""CPU time per cell of the full-resolution stage, in one process: re-centre, judge, crop, write.

Re-runs, on the first ``--cells`` candidates that a finished gallery of the slide re-centred, exactly
the stage a run does (``runner._relocate_and_crop`` without a cluster: batches of one shard's size,
each re-centred and cropped from the same decoded tiles, then written shard by shard into a scratch
gallery), measures its CPU time (``time.process_time``: every thread of the process, zarr's codec
threads included), and checks that the new centres, blur, verdicts and crops are those of the gallery,
bit for bit (so a gallery written by an older version tells whether its results changed).

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
import zarr

from pipeline.gallery import create_gallery_draft, open_gallery
from pipeline.runner import (
    RunParams,
    SlideRef,
    _estimate_task,
    _relocate_and_crop,
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

    # The candidates as detection left them: overview positions, accepted where re-centring was tried
    # (re-centring only ever rejects a cell as out of focus).
    candidates = gallery.candidates
    tried = candidates["accepted"] | (candidates["reason"] == "out_of_focus")
    done = candidates[tried].iloc[: args.cells]
    before = done[["layers", "gap_um", "cut"]].assign(
        x_px=done["x_overview_px"], y_px=done["y_overview_px"], accepted=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        draft = create_gallery_draft(
            Path(tmp) / "scratch.zarr",
            len(before),
            {},
            crop_px=int(gallery.attrs["crop_px"]),
            shard_cells=int(gallery.attrs["shard_cells"]),
        )
        started = time.process_time()
        after, _ = _relocate_and_crop(
            None, before, plan, estimate, str(draft.partial_path), draft.shard_cells, False, "bench"
        )
        ms_per_candidate = (time.process_time() - started) / len(before) * 1e3
        same = {
            name: np.array_equal(after[name].to_numpy(), done[name].to_numpy(), equal_nan=name == "blur_um")
            for name in ("x_px", "y_px", "blur_um", "accepted")
        }
        n_cells = int(after["accepted"].sum())
        first_cells = candidates.loc[: done.index[-1], "cell_index"].max() + 1
        written = zarr.open_array(draft.partial_path / "images", mode="r")[:n_cells]
        same["crops"] = n_cells == first_cells and np.array_equal(written, gallery.images[:n_cells])
    print(
        f"{len(before)} candidates re-centred, {n_cells} cropped: {ms_per_candidate:.2f} ms CPU per "
        f"candidate; the same as the gallery: " + ", ".join(f"{k} {v}" for k, v in same.items())
    )


if __name__ == "__main__":
    main()
