"""``simulate_slide``: render a whole slide tile by tile on Dask, stream it into an SVS, write truth.

Memory stays flat with slide size: workers render square chunks (a multiple of 256 px), JPEG-encode
their level-0 tiles and write their 4x-reduced pixels straight into a temporary on-disk array (each
chunk owns its own file); the driver only receives encoded tiles, a chunk row at a time, in the
order the TIFF needs. Level-1 tiles are encoded on the cluster too, a band at a time as soon as the
render has covered it (see :mod:`._level1`); the driver keeps only level 2 and smaller.

Outputs appear only when whole: everything is written under ``*.partial`` names and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import cv2
import numpy as np

from .. import __version__
from ..engine import TASK_RETRIES, compute_client, ordered_map
from ..errors import ParameterError
from ._level1 import BAND_PX, EncodedBand, Level1Store, band_starts, encode_band, reduce4
from .cells import MLL23_CLASSES
from .optics import IN_FOCUS_MAX_SIGMA_UM, defocus_sigma_um
from .presets import get_preset, parse_artefacts
from .render import SlideModel, render_region
from .scene import PLACEMENTS, PUSH_ASIDE_MAX_THICKNESS, SceneSpec
from .svs import TILE_PX, SvsWriter, encode_tile, pyramid_sizes, thumbnail_from, tiles_of

if TYPE_CHECKING:
    import pandas as pd

# pandas, scipy and tqdm are imported where the driver uses them: render workers import this module
# for its task function, and need none of them (half a second of every worker's start).

TRUTH_COLUMNS = (
    "cell_id",
    "cell_class",
    "x_px",
    "y_px",
    "x_um",
    "y_um",
    "diameter_um",
    "nucleus_area_um2",
    "nucleated",
    "zone",
    "in_focus",
    "touching",
    "spread",
    "blur_sigma_um",
)
MAX_SLIDE_MM = (80.0, 30.0)


@dataclass(frozen=True)
class SimulationResult:
    """Paths and counts of a finished simulation."""

    slide_path: Path
    truth_path: Path
    summary_path: Path
    n_nucleated: int
    n_red_cells: int
    width_px: int
    height_px: int
    seconds: float


@dataclass(frozen=True)
class _Chunk:
    x0: int
    y0: int
    width: int
    height: int


@dataclass(frozen=True)
class _ChunkResult:
    tiles: list[list[bytes]]
    cells: dict[str, np.ndarray]
    red_cells: int
    platelets: int
    red_cell_zones: dict[str, int]


#: The slide model a worker process rendered last: its scene keeps caches (white cells of 500-um blocks
#: and their neighbours) that a fresh copy with every task would rebuild.
_WORKER_MODEL: list[SlideModel] = []


def _worker_model(model: SlideModel) -> SlideModel:
    if _WORKER_MODEL and _WORKER_MODEL[0].spec == model.spec:
        return _WORKER_MODEL[0]
    _WORKER_MODEL[:] = [model]
    return model


def _in_dask_worker() -> bool:
    # A process that has not imported distributed is no worker (and need not pay for importing it).
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


#: Chunks rendered by one task (consecutive chunks of a row): fewer, longer tasks spend less of the
#: cluster's time on scheduling and transfers, while each chunk's buffers stay small.
CHUNKS_PER_TASK = 4


def _render_chunks(chunks: tuple[_Chunk, ...], model: SlideModel, level1: Level1Store) -> list[_ChunkResult]:
    if _in_dask_worker():
        # A worker process is one of several sharing the cores: OpenCV's own threads only add
        # synchronisation (measured 10-15 % more CPU per chunk with 2 threads on a 2-core machine).
        cv2.setNumThreads(1)
        model = _worker_model(model)
    return [_render_chunk(chunk, model, level1) for chunk in chunks]


def _render_chunk(chunk: _Chunk, model: SlideModel, level1: Level1Store) -> _ChunkResult:
    region = render_region(model, chunk.x0, chunk.y0, chunk.width, chunk.height)
    rgb = region.rgb
    tiles = [
        [encode_tile(rgb[ty : ty + TILE_PX, tx : tx + TILE_PX]) for tx in range(0, chunk.width, TILE_PX)]
        for ty in range(0, chunk.height, TILE_PX)
    ]
    # Chunks are multiples of 256 px, so their 4x reduction covers whole chunks of the level-1 array.
    small = cv2.resize(rgb, (chunk.width // 4, chunk.height // 4), interpolation=cv2.INTER_AREA)
    level1.write(chunk.y0 // 4, chunk.x0 // 4, small)
    cells = region.cells
    return _ChunkResult(
        tiles=tiles,
        cells={
            "x_um": cells.x_um,
            "y_um": cells.y_um,
            "class_index": cells.class_index,
            "spread": cells.spread,
            "diameter_um": region.diameter_um,
            "nucleus_area_um2": region.nucleus_area_um2,
        },
        red_cells=region.red_cells,
        platelets=region.platelets,
        red_cell_zones=region.red_cell_zones,
    )


def _validate(width_mm: float, height_mm: float, mpp: float, chunk_px: int, workers: int, out: Path) -> None:
    if not (0 < width_mm <= MAX_SLIDE_MM[0] and 0 < height_mm <= MAX_SLIDE_MM[1]):
        raise ParameterError(
            f"--width-mm and --height-mm must be > 0 and at most {MAX_SLIDE_MM[0]:g} x {MAX_SLIDE_MM[1]:g} "
            f"(a glass slide), got {width_mm:g} x {height_mm:g}"
        )
    if not (0.1 <= mpp <= 1.0) or not math.isfinite(mpp):
        raise ParameterError(f"--mpp must be between 0.1 and 1.0 um/px, got {mpp:g}")
    if chunk_px < TILE_PX or chunk_px % TILE_PX:
        raise ParameterError(f"chunk size must be a positive multiple of {TILE_PX} px, got {chunk_px}")
    if workers < 0:
        raise ParameterError(f"--workers must be 0 or more, got {workers}")
    if out.suffix.lower() != ".svs":
        raise ParameterError(f"output must end in .svs, got {out}")
    if not out.parent.exists():
        raise ParameterError(f"output folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise ParameterError(f"output folder {out.parent} is not writable")


def simulate_slide(
    out_path: str | os.PathLike,
    *,
    width_mm: float,
    height_mm: float,
    seed: int = 0,
    preset: str = "normal",
    mpp: float = 0.25,
    placement: str = "monolayer",
    workers: int = 1,
    chunk_px: int = 1024,
    progress: bool = True,
    client: object | None = None,
    artefacts: str | frozenset[str] = "all",
) -> SimulationResult:
    """Simulate a whole-slide scan of a blood smear and write it as an Aperio SVS with ground truth.

    Parameters
    ----------
    out_path
        The ``.svs`` file to write; ``<stem>.truth.csv`` and ``<stem>.truth.json`` go beside it.
    width_mm, height_mm
        Size of the scanned window of the smear.
    seed
        Random seed: the same seed and parameters give the same slide whatever ``workers`` and
        ``chunk_px`` are.
    preset
        Blood counts and differential (see :data:`pipeline.simulate.presets.PRESETS`).
    mpp
        Level-0 pixel size in um/px (0.25 is a 40x scan).
    placement
        Part of the smear shown: ``monolayer``, ``thick``, ``feathered``, ``across`` (all three zones
        compressed into the window, for tests) or ``whole`` (the whole smear on a slide).
    workers
        Local Dask worker processes; 0 renders in this process.
    chunk_px
        Side of the square render chunks (a multiple of 256).
    progress
        Show a progress bar.
    client
        An existing ``distributed.Client`` to use instead of starting a local cluster.
    artefacts
        Artefacts of real slides to include: ``"all"``, ``"none"``, a comma-separated list or a set of
        names from :data:`pipeline.simulate.presets.ARTEFACTS`.

    Returns
    -------
    SimulationResult
    """
    started = time.perf_counter()
    out = Path(out_path)
    _validate(width_mm, height_mm, mpp, chunk_px, workers, out)
    if placement not in PLACEMENTS:
        raise ParameterError(f"unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}")
    blood = get_preset(preset)
    forked = client is None and workers > 0 and _start_worker_server(seed, mpp)
    width_px = round(width_mm * 1000.0 / mpp)
    height_px = round(height_mm * 1000.0 / mpp)
    chosen = parse_artefacts(artefacts)
    model = SlideModel(SceneSpec(width_px, height_px, mpp, seed, blood, placement, chosen))

    stem = out.name[: -len(out.suffix)]
    truth_path = out.with_name(stem + ".truth.csv")
    summary_path = out.with_name(stem + ".truth.json")
    partial = out.with_name(out.name + ".partial")
    workdir = out.with_name(f".{stem}.simulate.tmp")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    cluster = ExitStack()  # the local cluster, when this call starts one
    closer = ThreadPoolExecutor(max_workers=1)
    try:
        sizes = pyramid_sizes(width_px, height_px)
        level1 = Level1Store.create(workdir / "level1", sizes[1][0], sizes[1][1], chunk_px)
        n_tx, n_ty = math.ceil(width_px / TILE_PX), math.ceil(height_px / TILE_PX)
        chunks = [
            _Chunk(x0, y0, min(chunk_px, n_tx * TILE_PX - x0), min(chunk_px, n_ty * TILE_PX - y0))
            for y0 in range(0, n_ty * TILE_PX, chunk_px)
            for x0 in range(0, n_tx * TILE_PX, chunk_px)
        ]
        per_row = math.ceil(n_tx * TILE_PX / chunk_px)
        # Tasks never straddle two rows, so a row's results arrive from whole tasks. The last row goes a
        # chunk per task: the workers then run out of work together, not up to a long task apart.
        last_row = len(chunks) - per_row
        tasks = [
            tuple(chunks[row + i : row + min(i + step, per_row)])
            for row in range(0, len(chunks), per_row)
            for step in [1 if row == last_row else CHUNKS_PER_TASK]
            for i in range(0, per_row, step)
        ]
        tasks_per_row = math.ceil(per_row / CHUNKS_PER_TASK)
        collected: list[_ChunkResult] = []

        from tqdm import tqdm

        bar = tqdm(total=len(chunks), desc=f"simulate {out.name}", unit="chunk", disable=not progress)
        active = client if client is not None else cluster.enter_context(_local_client(workers, forked))
        bands = _Bands(active, level1, sizes[2] if len(sizes) > 2 else None)

        def level0_tiles(task_results: Iterator[list[_ChunkResult]]) -> Iterator[bytes]:
            row: list[_ChunkResult] = []
            rows_done = 0
            for result in (r for results in task_results for r in results):
                row.append(result)
                bar.update(1)
                if len(row) < per_row:
                    continue
                # Keep the small per-cell tables before yielding: the writer stops iterating at the
                # last tile, so code after the final yield never runs.
                collected.extend(
                    _ChunkResult([], r.cells, r.red_cells, r.platelets, r.red_cell_zones) for r in row
                )
                if not rows_done:
                    # The truth tables need pandas only at the end, when nothing else runs: import
                    # it while the driver mostly waits for chunks (after the workers' own start).
                    threading.Thread(target=_import_pandas, daemon=True).start()
                # Every chunk of the row has returned, so its level-1 pieces are on disk.
                rows_done = min(rows_done + chunk_px, n_ty * TILE_PX)
                bands.rendered(rows_done // 4)
                tiles = [r.tiles for r in row]
                row = []
                for t in range(len(tiles[0])):
                    for part in tiles:
                        yield from part[t]

        with SvsWriter(partial, width_px, height_px, mpp) as svs:
            window = tasks_per_row + (4 if client is not None else 2 * max(1, workers))
            svs.write_level0(
                level0_tiles(ordered_map(active, _render_chunks, tasks, model, level1, window=window))
            )
            bar.close()
            if len(collected) != len(chunks):
                raise RuntimeError(f"rendered {len(collected)} of {len(chunks)} chunks")
            encoded = bands.results()
            # Stopping the local workers takes a few tenths of a second: it runs while the driver
            # writes the reduced levels and the truth.
            closing = closer.submit(cluster.close)
            levels = _write_reduced_levels(svs, encoded, bands.level2, level1, sizes)
        truth, summary = _truth_tables(model, collected, placement, preset, seed, levels)
        summary = {"slide": out.name, **summary}  # evaluate checks that a gallery's truth is its slide's
        truth.to_csv(truth_path.with_name(truth_path.name + ".partial"), index=False)
        summary_path.with_name(summary_path.name + ".partial").write_text(json.dumps(summary, indent=2))
        closing.result()
        os.replace(truth_path.with_name(truth_path.name + ".partial"), truth_path)
        os.replace(summary_path.with_name(summary_path.name + ".partial"), summary_path)
        os.replace(partial, out)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        closer.shutdown()  # first: the cluster may be closing in it
        # The cluster learns of the failure (compute_client then keeps Dask's shutdown noise quiet).
        cluster.__exit__(type(exc), exc, exc.__traceback__)
        raise
    finally:
        closer.shutdown()
        cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return SimulationResult(
        slide_path=out,
        truth_path=truth_path,
        summary_path=summary_path,
        n_nucleated=len(truth),
        n_red_cells=int(summary["red_cells"]),
        width_px=width_px,
        height_px=height_px,
        seconds=time.perf_counter() - started,
    )


def _import_pandas() -> None:
    import pandas  # noqa: F401


#: ``"<seed> <mpp>"`` of the slide whose banks the workers' fork server builds as it starts (see
#: :mod:`._warm`, which takes it out of the environment again).
WARM_BANKS_ENV = "PIPELINE_SIMULATE_WARM_BANKS"

#: What the local workers import before their first task, once, in the process they are forked from
#: (the last one also builds the slide's sprite and noise banks, see :mod:`._warm`).
_WORKER_PRELOAD = (
    "distributed",
    "pipeline._local_worker",
    "pipeline.simulate.run",
    "pipeline.simulate._warm",
)


def _start_worker_server(seed: int, mpp: float) -> bool:
    """Start the process local workers are forked from, and let it import their modules and build the
    banks of slide ``seed`` at ``mpp`` now (False where there is no fork server: Windows).

    Spawned workers each import Dask and the renderer (about 0.7 CPU-s apiece) and build the banks
    (0.15 CPU-s) only once the cluster is up; forked from this server, they start at once with both,
    and the one import runs while the driver imports and plans, on a core that would otherwise wait.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    from multiprocessing import forkserver

    # The thread limits Dask's nanny sets for the workers it spawns (distributed.nanny.pre-spawn-environ):
    # forked workers inherit the server's environment instead.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(_WORKER_PRELOAD))
    # Read by the server as it starts (a server already running keeps its banks: workers build theirs).
    os.environ[WARM_BANKS_ENV] = f"{int(seed)} {float(mpp)!r}"
    try:
        forkserver.ensure_running()
    finally:
        os.environ.pop(WARM_BANKS_ENV, None)
    return True


@contextmanager
def _local_client(workers: int, forked: bool) -> Iterator[object]:
    """A local cluster of ``workers`` processes (None for 0: render in this process), forked from the
    server :func:`_start_worker_server` started if ``forked``.

    :func:`~pipeline.engine.compute_client` already runs local workers without Dask's profiler and
    with slow event-loop ticks (0.4 and ~0.4 of a 5 x 5 mm slide's 19 CPU-s, measured here).
    """
    import dask.config
    import distributed  # noqa: F401  (its defaults must be loaded before the override,
    # or leaving the override removes the whole 'distributed' section of the config)

    # Spawned workers would import everything themselves.
    method = {"distributed.worker.multiprocessing-method": "forkserver"} if forked else {}
    with dask.config.set(method), compute_client(workers) as client:
        yield client


class _Bands:
    """Level-1 bands, each handed to :func:`encode_band` as soon as the render has written its rows.

    Their level-2 rows are gathered into one array as the bands finish, so that no worker holds them
    until the end (level 2 is 1/256 of level 0: 75 MB for a 20 x 20 mm slide).
    """

    def __init__(self, client: object | None, store: Level1Store, level2_size: tuple[int, int] | None):
        self._client, self._store = client, store
        self._reduce = level2_size is not None
        self.level2 = None if level2_size is None else np.empty((*level2_size[::-1], 3), dtype=np.uint8)
        self._waiting = list(band_starts(store.height))
        self._handed: deque[tuple[int, object]] = deque()  # (first row, future or band), in order
        self._gathered: list[EncodedBand] = []

    def rendered(self, level1_rows: int) -> None:
        """The render has written level-1 rows [0, ``level1_rows``): encode the bands they complete."""
        while self._waiting and min(self._waiting[0] + BAND_PX, self._store.height) <= level1_rows:
            y0 = self._waiting.pop(0)
            if self._client is None:
                self._handed.append((y0, encode_band(y0, self._store, self._reduce)))
            else:
                # Ahead of render tasks submitted earlier: a band's tiles wait in no queue, and the
                # last band is all that remains to do once the render ends.
                future = self._client.submit(  # type: ignore[attr-defined]
                    encode_band, y0, self._store, self._reduce, pure=False, retries=TASK_RETRIES, priority=1
                )
                self._handed.append((y0, future))
        self._gather(wait=False)

    def _gather(self, wait: bool) -> None:
        while self._handed:
            y0, handle = self._handed[0]
            if not isinstance(handle, EncodedBand) and not (wait or handle.done()):  # type: ignore[attr-defined]
                return
            band = handle if isinstance(handle, EncodedBand) else handle.result()  # type: ignore[attr-defined]
            self._handed.popleft()
            if self.level2 is not None:
                small = cast(np.ndarray, band.reduced)
                self.level2[y0 // 4 : y0 // 4 + small.shape[0]] = small[: self.level2.shape[0] - y0 // 4]
            self._gathered.append(EncodedBand(band.path, band.lengths, None))

    def results(self) -> list[EncodedBand]:
        """Every band, in order (after the whole level has been rendered); level 2 is then complete."""
        if self._waiting:
            raise RuntimeError(f"{len(self._waiting)} level-1 band(s) never rendered")
        self._gather(wait=True)
        return self._gathered


def _write_reduced_levels(
    svs: SvsWriter,
    bands: list[EncodedBand],
    level2: np.ndarray | None,
    level1: Level1Store,
    sizes: list[tuple[int, int]],
) -> list[tuple[int, int]]:
    """Write the thumbnail, level 1 from its encoded bands, and level 2 and smaller."""
    pyramid = [] if level2 is None else [level2]
    for _ in sizes[3:]:
        pyramid.append(reduce4(pyramid[-1]))
    smallest = pyramid[-1] if pyramid else level1.rows(0, level1.height)
    svs.write_thumbnail(thumbnail_from(smallest))
    svs.write_level((tile for band in bands for tile in band.tiles()), sizes[1])
    for image in pyramid:
        svs.write_level(tiles_of(image), (image.shape[1], image.shape[0]))
    return sizes


def _pairs_within(x: np.ndarray, y: np.ndarray, r: float) -> Iterator[tuple[int, int]]:
    """Index pairs ``i < j`` of points at most ``r`` apart, from a grid of ``r``-sized buckets.

    What ``scipy.spatial.cKDTree.query_pairs`` gives, without importing ``scipy.spatial`` (half a
    second of the driver's CPU, a fifth of all it does for a 5 x 5 mm slide); white cells are sparse.
    """
    size = max(r, 1e-9)
    buckets: dict[tuple[int, int], list[int]] = {}
    cells = zip(
        np.floor(x / size).astype(np.int64).tolist(),
        np.floor(y / size).astype(np.int64).tolist(),
        strict=True,
    )
    for j, (bx, by) in enumerate(cells):
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for i in buckets.get((bx + dx, by + dy), ()):
                    if math.hypot(x[i] - x[j], y[i] - y[j]) <= r:
                        yield i, j
        buckets.setdefault((bx, by), []).append(j)


def _truth_tables(
    model: SlideModel,
    results: list[_ChunkResult],
    placement: str,
    preset: str,
    seed: int,
    levels: list[tuple[int, int]],
) -> tuple[pd.DataFrame, dict]:
    import pandas as pd

    spec, scene = model.spec, model.scene
    cols = {k: np.concatenate([r.cells[k] for r in results]) for k in results[0].cells} if results else {}
    df = pd.DataFrame(cols)
    if df.empty:
        df = pd.DataFrame(
            {k: [] for k in ("x_um", "y_um", "class_index", "spread", "diameter_um", "nucleus_area_um2")}
        )
    df = df.sort_values(["y_um", "x_um"], kind="stable").reset_index(drop=True)
    x, y = df["x_um"].to_numpy(float), df["y_um"].to_numpy(float)
    touching = scene.thickness(x, y) > PUSH_ASIDE_MAX_THICKNESS  # red cells overlap them there
    if len(df) > 1:
        diameter = df["diameter_um"].to_numpy(float)
        for i, j in _pairs_within(x, y, float(diameter.max())):
            # touching: rims closer than 1 um (cells are drawn side by side where the film is thin)
            if math.hypot(x[i] - x[j], y[i] - y[j]) < 0.5 * (diameter[i] + diameter[j]) + 1.0:
                touching[i] = touching[j] = True
    blur = defocus_sigma_um(model.optics, x, y) if len(df) else np.zeros(0)
    truth = pd.DataFrame(
        {
            "cell_id": np.arange(len(df), dtype=np.int64),
            "cell_class": [MLL23_CLASSES[int(k)] for k in df["class_index"]],
            "x_px": x / spec.mpp,
            "y_px": y / spec.mpp,
            "x_um": x,
            "y_um": y,
            "diameter_um": df["diameter_um"].to_numpy(float),
            "nucleus_area_um2": df["nucleus_area_um2"].to_numpy(float),
            "nucleated": True,
            "zone": scene.zone(x, y).astype(str) if len(df) else np.zeros(0, dtype=str),
            "in_focus": blur <= IN_FOCUS_MAX_SIGMA_UM,
            "touching": touching,
            "spread": df["spread"].to_numpy(float),
            "blur_sigma_um": blur,
        },
        columns=list(TRUTH_COLUMNS),
    )
    zones: dict[str, int] = {}
    for r in results:
        for z, c in r.red_cell_zones.items():
            zones[z] = zones.get(z, 0) + c
    summary = {
        "generator": f"pipeline {__version__} simulate",
        "coordinates": "x_px, y_px: level-0 pixels, continuous (pixel i spans [i, i+1)); x_um = x_px * mpp",
        "rows": "one row per nucleated cell (the 18 MLL23 classes, smudge cells included); red cells and "
        "platelets are summarised here as counts of centres per zone",
        "seed": seed,
        "preset": asdict(get_preset(preset)),
        "placement": placement,
        "artefacts": sorted(spec.artefacts),
        "mpp": spec.mpp,
        "width_px": spec.width_px,
        "height_px": spec.height_px,
        "levels": [list(s) for s in levels],
        "stain_matrix_od_rgb": model.stain_matrix.round(4).tolist(),
        "nucleated_cells": len(truth),
        "nucleated_by_class": {str(k): int(v) for k, v in truth["cell_class"].value_counts().items()},
        "nucleated_by_zone": {str(k): int(v) for k, v in truth["zone"].value_counts().items()},
        "red_cells": sum(r.red_cells for r in results),
        "red_cells_by_zone": zones,
        "platelets": sum(r.platelets for r in results),
    }
    return truth, summary
