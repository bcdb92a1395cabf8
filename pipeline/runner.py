"""One slide, top to bottom: slide -> overview tiles -> candidates -> quality -> crops -> gallery.

Each stage is a plain function of arrays and tables (in :mod:`~pipeline.segment`,
:mod:`~pipeline.quality`, :mod:`~pipeline.relocate`, :mod:`~pipeline.gallery`); this module plans the
work, hands tasks to the engine (a Dask cluster or this process) and keeps the driver light: tasks get a
:class:`~pipeline.slide.SlideRef` and coordinates, read pixels themselves, and return small tables. Only
crops carry pixels: they stay on the workers that cut them until a task writes them into the gallery,
one whole shard each.

Tiling: the overview is cut into square tiles with a halo wider than any object plus every
neighbourhood the stages look at; a candidate belongs to the tile whose half-open core holds its
centroid. The result therefore does not depend on the tile size or on how many workers run.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from . import __version__
from ._memory import retain_freed_memory
from ._tile_maps import tile_maps
from .engine import TaskQueue, compute_client, held_rows, ordered_map, ordered_map_holding, worker_count
from .errors import GalleryError, ParameterError, SlideError, is_interrupt, raise_if_interrupted
from .gallery import (
    DEFAULT_SHARD_CELLS,
    create_gallery_draft,
    finalize_gallery,
    is_complete,
    open_gallery,
    partial_path_for,
    wait_for_pending_writes,
    write_shard,
)
from .lock import gallery_lock
from .od import od_lut, optical_density
from .qc import gallery_contact_sheet, overview_picture, png_bytes, write_file, write_png
from .quality import QualityParams, judge, neighbour_gaps_um, red_cell_layers, ring_features, slide_density
from .relocate import (
    CropParams,
    crop_window,
    is_padded,
    refine_centre_at,
    relocation_table,
)
from .segment import (
    DEFAULT_RED_CELL_OD,
    SegmentParams,
    SlideStains,
    estimate_slide_stains,
    required_halo_um,
    sample_optical_density,
    segment,
    stain_warnings,
)
from .slide import SlideRef, cached_slide, open_slide

#: The overview is read at about this pixel size, like a 10x objective.
OVERVIEW_MPP = 1.0
#: Thumbnail pixels darker than this (OD summed over R, G, B, against the slide's white) hold stain;
#: vignetting of up to ~13 % at a camera field's corner stays below it.
BLANK_MAX_OD_SUM = 0.18
#: A native pyramid level within this factor of OVERVIEW_MPP is used as it is (no resampling).
NATIVE_LEVEL_TOLERANCE = 1.35
#: A slide whose typical field is denser than this (red-cell layers) shows no readable monolayer.
MAX_TYPICAL_DENSITY = 2.0
#: A slide with stain on more than this fraction of its sampled pixels should yield candidates.
MIN_STAINED_FRACTION = 0.02
#: Driver-side work that overlaps the workers' (it only draws QC pictures).
_BACKGROUND = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qc")


@dataclass(frozen=True)
class RunParams:
    """Every parameter of a run (stored in the gallery's attrs).

    Attributes
    ----------
    overview_mpp
        Pixel size of the detection overview, um/px.
    tile_px
        Side of the overview tiles (core), px.
    segment, quality, crop
        Stage parameters.
    shard_cells
        Crops per gallery shard (one task writes one shard).
    skip_blank
        Skip overview tiles with no stain at all in the slide's thumbnail.
    stat_samples
        Overview windows sampled to estimate the slide's stain and white level.
    """

    overview_mpp: float = OVERVIEW_MPP
    # The halo (~100 px at 1 um/px) is re-read and re-segmented by both neighbours: at 1024 px a tile
    # does 1.44x its core's work, at 2048 px 1.21x (detection CPU -23 % on a 268 mm^2 slide, +120 MB
    # peak per worker).
    tile_px: int = 2048
    segment: SegmentParams = field(default_factory=SegmentParams)
    quality: QualityParams = field(default_factory=QualityParams)
    crop: CropParams = field(default_factory=CropParams)
    shard_cells: int = DEFAULT_SHARD_CELLS
    skip_blank: bool = True
    stat_samples: int = 16

    def __post_init__(self) -> None:
        if not (math.isfinite(self.overview_mpp) and 0.2 <= self.overview_mpp <= 4.0):
            raise ParameterError(f"overview_mpp must be between 0.2 and 4 um/px, got {self.overview_mpp}")
        if not 128 <= self.tile_px <= 8192:
            raise ParameterError(f"--tile-px must be between 128 and 8192, got {self.tile_px}")

    def as_dict(self) -> dict[str, Any]:
        """All parameters, nested, JSON-safe."""
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """What the driver decided about a slide, sent to every task (small and picklable)."""

    ref: SlideRef
    mpp0: float
    dimensions: tuple[int, int]
    overview_mpp: float
    overview_native_level: int | None
    overview_size: tuple[int, int]
    halo_px: int
    params: RunParams

    @property
    def scale(self) -> float:
        """Level-0 pixels per overview pixel."""
        return self.overview_mpp / self.mpp0


@dataclass(frozen=True)
class SlideEstimate:
    """Slide-level statistics estimated once from sample windows.

    Attributes
    ----------
    stains
        Glass white, stain directions, red-cell OD and threshold
        (:func:`~pipeline.segment.estimate_slide_stains`).
    density
        The slide's typical density in red-cell layers (:func:`~pipeline.quality.slide_density`).
    """

    stains: SlideStains
    density: float


@dataclass(frozen=True)
class RunResult:
    """Outcome of one slide."""

    slide: Path
    gallery: Path
    status: str  # "done" or "skipped" (already complete)
    cells: int
    candidates: int
    seconds: float
    warnings: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ plan
def plan_slide(ref: SlideRef, params: RunParams) -> Plan:
    """Open the slide's metadata on the driver and decide the overview geometry and halo."""
    with open_slide(ref.path, ref.mpp_override) as slide:
        mpp0 = slide.mpp
        dims = slide.dimensions
        level = slide.level_for_mpp(params.overview_mpp)
        level_mpp = slide.level_mpp(level)
        if slide.greyscale:
            warnings.warn(
                f"{slide.path} is greyscale: without stain colour white cells cannot be told from red "
                "cells, so few or none will be found; scan or export the slide in colour",
                UserWarning,
                stacklevel=2,
            )
    native = (
        max(level_mpp, params.overview_mpp) / min(level_mpp, params.overview_mpp) <= NATIVE_LEVEL_TOLERANCE
    )
    overview_mpp = level_mpp if native else max(params.overview_mpp, mpp0)
    size = (math.ceil(dims[0] * mpp0 / overview_mpp), math.ceil(dims[1] * mpp0 / overview_mpp))
    q = params.quality
    context_um = max(
        required_halo_um(params.segment),
        # a ring around the largest object
        math.sqrt(params.segment.max_area_um2 / math.pi) + q.ring_gap_um + q.ring_width_um,
    )
    halo = math.ceil(context_um / overview_mpp) + 2
    return Plan(ref, mpp0, dims, overview_mpp, level if native else None, size, halo, params)


def overview_tiles(plan: Plan) -> list[tuple[int, int, int, int]]:
    """Cores (x0, y0, width, height) of the overview tiles in overview pixels, raster order."""
    w, h = plan.overview_size
    t = plan.params.tile_px
    return [(x, y, min(t, w - x), min(t, h - y)) for y in range(0, h, t) for x in range(0, w, t)]


def _read_overview(plan: Plan, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """Overview pixels [x0, x0+width) x [y0, y0+height) (overview px; outside the slide: white)."""
    slide = cached_slide(plan.ref)
    if plan.overview_native_level is not None:
        return slide.read_region(plan.overview_native_level, x0, y0, width, height)
    return slide.read_at_mpp(x0 * plan.scale, y0 * plan.scale, width, height, plan.overview_mpp)


# ----------------------------------------------------------------------------------- blank glass
@dataclass(frozen=True)
class StainMap:
    """Where the slide holds any stain, from its thumbnail (independent of the tiling)."""

    stained: np.ndarray  # uint8 (h, w): 1 where the thumbnail pixel is darker than glass
    px_per_overview_px: float

    def box(self, x: int, y: int, w: int, h: int) -> tuple[slice, slice]:
        """Thumbnail pixels under an overview-pixel rectangle."""
        k = self.px_per_overview_px
        return (
            slice(math.floor(y * k), math.ceil((y + h) * k) + 1),
            slice(math.floor(x * k), math.ceil((x + w) * k) + 1),
        )


def stain_map(plan: Plan) -> StainMap:
    """Threshold the slide's thumbnail (about 4 um/px) against its brightest glass."""
    longest_um = max(plan.dimensions) * plan.mpp0
    with open_slide(plan.ref.path, plan.ref.mpp_override) as slide:
        thumb, thumb_mpp = slide.thumbnail(max(64, min(2048, math.ceil(longest_um / 4.0))))
    thumb = np.ascontiguousarray(thumb[..., :3], dtype=np.uint8)
    # Against the slide's brightest glass (not a local maximum, which would make a large thick zone
    # look like glass): stain is anything darker than vignetting at a field corner can make glass.
    pixels = thumb.reshape(-1, 3)
    unsaturated = pixels[(pixels < 254).any(axis=1)]
    white = np.percentile(unsaturated if len(unsaturated) > 100 else pixels, 99, axis=0)
    od = optical_density(thumb, white).sum(axis=-1)
    return StainMap((od > BLANK_MAX_OD_SUM).astype(np.uint8), plan.overview_mpp / thumb_mpp)


def blank_tile_mask(
    plan: Plan, tiles: list[tuple[int, int, int, int]], stains: StainMap | None = None
) -> np.ndarray:
    """True for tiles whose core and halo hold no stain at all in the thumbnail (to skip them)."""
    stains = stains or stain_map(plan)
    grow = math.ceil((plan.halo_px + 2) * stains.px_per_overview_px) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * grow + 1, 2 * grow + 1))
    grown = StainMap(cv2.dilate(stains.stained, kernel), stains.px_per_overview_px)
    return np.array([not grown.stained[grown.box(*tile)].any() for tile in tiles], dtype=bool)


# ------------------------------------------------------------------------------------ statistics
def sample_windows(
    plan: Plan, n: int, size_px: int = 512, stains: StainMap | None = None
) -> list[tuple[int, int, int, int]]:
    """Up to ``n`` overview windows spread over the stained part of the slide (independent of the tiling).

    Windows lie on a regular k x k grid (k = ceil(sqrt(n))). With a stain map only windows holding stain
    count, since on a mostly blank slide glass alone would make the stain statistics meaningless; the
    grid is refined (2k, 4k) until ``n`` stained windows exist, and ``n`` of them are chosen far apart.
    """
    w, h = plan.overview_size
    size = min(size_px, w, h)
    k0 = max(1, math.ceil(math.sqrt(n)))
    windows: list[tuple[int, int, int, int]] = []
    for k in (k0, 2 * k0, 4 * k0):
        xs = np.unique(np.linspace(0, max(0, w - size), k).round().astype(int))
        ys = np.unique(np.linspace(0, max(0, h - size), k).round().astype(int))
        grid = [(int(x), int(y), size, size) for y in ys for x in xs]
        stained = grid if stains is None else [win for win in grid if stains.stained[stains.box(*win)].any()]
        windows = stained or windows
        if len(windows) >= n or stains is None:
            break
    if not windows:  # no stain anywhere: the plain grid (the estimate then reports blank glass)
        windows = grid
    return _far_apart(windows, n)


def _far_apart(windows: list[tuple[int, int, int, int]], n: int) -> list[tuple[int, int, int, int]]:
    """``n`` windows, each in turn the farthest from those already chosen (ties: first in raster order)."""
    if len(windows) <= n:
        return windows
    xy = np.array([(x, y) for x, y, _, _ in windows], dtype=float)
    chosen = [0]
    nearest = np.hypot(*(xy - xy[0]).T)
    while len(chosen) < n:
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.hypot(*(xy - xy[pick]).T))
    return [windows[i] for i in sorted(chosen)]


def _estimate_task(windows: list[tuple[int, int, int, int]], plan: Plan) -> SlideEstimate:
    samples = [_read_overview(plan, *window) for window in windows]
    params = plan.params
    sample_od = sample_optical_density(samples, plan.overview_mpp, params.segment)
    stains = estimate_slide_stains(samples, plan.overview_mpp, params.segment, sample_od)
    unit = _red_cell_unit(stains)
    layers = [red_cell_layers(od, stains.red_cell_direction, unit) for od in sample_od[1]]
    return SlideEstimate(stains, slide_density(layers, plan.overview_mpp, params.quality))


def _red_cell_unit(stains: SlideStains) -> float:
    """One red cell's OD: the slide's own, or real smears' typical one where too little stain was sampled."""
    return stains.red_cell_od if stains.red_cell_od > 0 else DEFAULT_RED_CELL_OD


# -------------------------------------------------------------------------------------- detection
def _detect_tile(tile: tuple[int, int, int, int], plan: Plan, estimate: SlideEstimate) -> pd.DataFrame:
    """Candidates whose centroid lies in one overview tile's core, with neighbourhood features."""
    retain_freed_memory()  # reuse one tile's pages for the next (pipeline/_memory.py: ~1/3 of the time)
    x0, y0, w, h = tile
    halo = plan.halo_px
    rgb = _read_overview(plan, x0 - halo, y0 - halo, w + 2 * halo, h + 2 * halo)
    params = plan.params
    maps = tile_maps(rgb, plan.overview_mpp, params.segment, estimate.stains, _red_cell_unit(estimate.stains))
    labels, objects = segment(
        rgb, plan.overview_mpp, estimate.stains, params.segment, feature=maps.feature, white=maps.white
    )
    if objects.empty:
        return _empty_candidates()
    # Continuous coordinates of the centroids in the tile (with halo): pixel i spans [i, i+1).
    cx = objects["x_px"].to_numpy(float)
    cy = objects["y_px"].to_numpy(float)
    core = (cx >= halo) & (cx < halo + w) & (cy >= halo) & (cy < halo + h)
    if not core.any():
        return _empty_candidates()
    # Columns as arrays and one frame at the end: pandas' indexing and column insertion cost more
    # than the arithmetic of a tile.
    columns = {name: objects[name].to_numpy()[core] for name in objects.columns}
    cx, cy = cx[core], cy[core]
    radius_px = np.sqrt(columns["area_um2"].astype(float) / math.pi) / plan.overview_mpp
    ring = ring_features(maps.layers, labels, cx, cy, radius_px, plan.overview_mpp, params.quality)
    # Objects reaching the edge of the scanned image are cut: part of the cell lies outside it. One
    # pixel of slack: a native level can be a pixel smaller than the size planned from level 0.
    width, height = plan.overview_size
    gx0, gy0 = columns["x0"] + x0 - halo, columns["y0"] + y0 - halo
    gx1, gy1 = columns["x1"] + x0 - halo, columns["y1"] + y0 - halo
    cut = (gx0 <= 1) | (gy0 <= 1) | (gx1 >= width - 1) | (gy1 >= height - 1)
    out = {
        "x_px": (x0 - halo + cx) * plan.scale,
        "y_px": (y0 - halo + cy) * plan.scale,
        "area_um2": columns["area_um2"].astype(float),
    }
    # The bounding box is in tile pixels: it would differ between tilings.
    out |= {k: v for k, v in columns.items() if k not in ("x_px", "y_px", "area_um2", "y0", "x0", "y1", "x1")}
    out |= {k: ring[k].to_numpy() for k in ring.columns}
    out["cut"] = cut
    return pd.DataFrame(out)


def _empty_candidates() -> pd.DataFrame:
    columns = ("x_px", "y_px", "area_um2", "coverage", "layers", "stacked")
    return pd.DataFrame({**{c: np.zeros(0) for c in columns}, "cut": np.zeros(0, bool)})


#: Columns a relocation batch carries: the position to start from and what judging needs.
_BATCH_COLUMNS = ["x_px", "y_px", "layers", "gap_um", "cut"]


def _cells_task(batch: pd.DataFrame, plan: Plan, estimate: SlideEstimate) -> tuple[pd.DataFrame, np.ndarray]:
    """Re-centre accepted candidates at full resolution, judge them again, and cut the crops of those
    still accepted.

    Both reads of a cell (the search window and the crop inside it) come from the same decoded
    level-0 tiles, which the slide's tile cache keeps between them.

    Returns
    -------
    table : pandas.DataFrame
        On the batch's index: the new ``x_px``, ``y_px``, ``blur_um``, ``relocated`` and the verdict
        (``density_ratio``, ``quality``, ``accepted``, ``reason``).
    crops : numpy.ndarray
        uint8 ``(n_accepted, crop_px, crop_px, 3)``, in the batch's order.
    """
    slide = cached_slide(plan.ref)
    crop = plan.params.crop
    lut = od_lut(estimate.stains.white_rgb)
    x_overview, y_overview = batch["x_px"].to_numpy(float), batch["y_px"].to_numpy(float)

    def read_window(x0: int, y0: int, size: int) -> np.ndarray:
        return slide.read_region(0, x0, y0, size, size)

    refined = [
        refine_centre_at(read_window, x, y, plan.mpp0, estimate.stains, crop, lut)
        for x, y in zip(x_overview, y_overview, strict=True)
    ]
    table = relocation_table(refined, x_overview, y_overview, plan.mpp0)
    table.index = batch.index
    verdict = judge(batch.assign(blur_um=table["blur_um"]), plan.params.quality, estimate.density)
    accepted = verdict["accepted"].to_numpy()
    crops = np.empty((int(accepted.sum()), crop.crop_px, crop.crop_px, 3), dtype=np.uint8)
    xs, ys = table["x_px"].to_numpy()[accepted], table["y_px"].to_numpy()[accepted]
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        left, top = crop_window(float(x), float(y), plan.mpp0, crop)
        crops[i] = slide.read_at_mpp(left, top, crop.crop_px, crop.crop_px, crop.crop_mpp)
    return table.join(verdict), crops


def _shard_task(shard: tuple[int, list[np.ndarray], int | None], partial_path: str) -> Any:
    """Write one shard from consecutive runs of crops (``n_cells``: as for :func:`write_shard`)."""
    index, parts, n_cells = shard
    images = parts[0] if len(parts) == 1 else np.concatenate(parts)
    # finalize_gallery checks the receipts' rows, never their checksums (that would re-read the gallery)
    return write_shard(partial_path, index, images, n_cells=n_cells, checksum=False)


# ------------------------------------------------------------------------------------------- run
@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 3)


def gallery_path(slide_path: str | Path, out_dir: str | Path) -> Path:
    """Where a slide's gallery goes: ``OUT/<slide stem>.zarr``."""
    return Path(out_dir) / f"{Path(slide_path).stem}.zarr"


def run_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    params: RunParams | None = None,
    mpp: float | None = None,
    workers: int = 1,
    client: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Detect white cells on one slide and write its gallery and QC pictures.

    Parameters
    ----------
    slide_path
        Any slide OpenSlide or tifffile reads.
    out_dir
        Output folder; the gallery is ``<out_dir>/<slide stem>.zarr`` (format in :mod:`pipeline.gallery`),
        with ``<stem>.overview.png`` and ``<stem>.contact.png`` beside it.
    params
        Run parameters (defaults: MLL23 geometry).
    mpp
        Level-0 pixel size override in um/px, for slides whose metadata lacks or misstates it.
    workers
        Local Dask worker processes when no ``client`` is given; 0 runs in this process.
    client
        An existing ``distributed.Client``.
    overwrite
        Redo a slide whose gallery is already complete (otherwise it is skipped).
    progress
        Show progress bars.
    log
        Where to send one-line progress messages (default: nowhere).

    Returns
    -------
    RunResult

    Raises
    ------
    PipelineError
        ``SlideError``/``MppError`` for the slide; ``GalleryError`` when the gallery cannot be written
        (disk full, not writable), ``LockHeldError`` (a ``GalleryError``) when another run holds its
        lock (``OUT/.<stem>.zarr.lock``). On any
        failure, Ctrl-C included, the unfinished draft is deleted and nothing is marked complete.
    """
    final = gallery_path(slide_path, out_dir)
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GalleryError(_write_error_message(Path(slide_path), final, exc)) from exc
    with gallery_lock(final):
        try:
            return _run_slide_locked(
                slide_path, out_dir, params=params, mpp=mpp, workers=workers, client=client,
                overwrite=overwrite, progress=progress, log=log,
            )  # fmt: skip
        except BaseException as exc:
            # The next run deletes a leftover draft anyway; deleting it now frees the space at once,
            # which matters when the disk is full. An interrupted wait leaves zarr's writes running on
            # its IO thread, and they would put files back into the deleted draft.
            try:
                wait_for_pending_writes()
            finally:  # a second Ctrl-C during the wait
                shutil.rmtree(partial_path_for(final), ignore_errors=True)
            os_error = _os_error_in(exc, Path(out_dir))
            if os_error is not None:
                raise GalleryError(_write_error_message(Path(slide_path), final, os_error)) from exc
            raise


def _os_error_in(exc: BaseException, out_dir: Path) -> OSError | None:
    """The operating-system error behind a failed write to ``out_dir``, if that is what ``exc`` is."""
    if isinstance(exc, SlideError):
        return None  # reading the slide failed: its message already says so
    for error in (exc, exc.__cause__):
        # errno is None for Dask's connection errors, which subclass OSError but are not about files.
        if not isinstance(error, OSError) or error.errno is None:
            continue
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return error  # only writing fails this way
        # Other errors (EIO, EACCES, ESTALE...) may come from reading the slide over a network file
        # system: only those about a file under the output folder are about writing the gallery.
        if error.filename is not None and _is_under(Path(os.fsdecode(error.filename)), out_dir):
            return error
    return None


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def _write_error_message(slide_path: Path, final: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{slide_path}: disk full while writing {final} ({reason}); free space in {final.parent} or "
            "choose another --out, then re-run (nothing was marked complete)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        return (
            f"{slide_path}: cannot write {final} ({reason}); make {final.parent} writable or choose "
            "another --out"
        )
    return f"{slide_path}: I/O error writing {exc.filename or final} ({reason}); check the disk, then re-run"


def _run_slide_locked(
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    params: RunParams | None,
    mpp: float | None,
    workers: int,
    client: Any,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None] | None,
) -> RunResult:
    """:func:`run_slide` while holding the gallery's lock."""
    started = time.perf_counter()
    params = params or RunParams()
    slide_path = Path(slide_path)
    out_dir = Path(out_dir)
    final = gallery_path(slide_path, out_dir)
    if is_complete(final) and not overwrite:
        gallery = open_gallery(final)
        notes = tuple(gallery.attrs.get("warnings", ()))
        return RunResult(slide_path, final, "skipped", len(gallery), len(gallery.candidates), 0.0, notes)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)
    timings: dict[str, float] = {}
    ref = SlideRef(str(slide_path), mpp)
    plan = plan_slide(ref, params)
    # A local cluster's workers start (and import the pipeline) while the driver reads the thumbnail, once
    # the slide is known to open.
    cluster, closing = ExitStack(), None
    try:
        engine = cluster.enter_context(_engine(client, workers))
        with _stage(timings, "plan"):
            tiles = overview_tiles(plan)
            stains = stain_map(plan)
            blank = blank_tile_mask(plan, tiles, stains) if params.skip_blank else np.zeros(len(tiles), bool)
        say(
            f"{slide_path.name}: {len(tiles)} overview tiles at {plan.overview_mpp:.3g} um/px, "
            f"{int(blank.sum())} blank"
        )
        with _stage(timings, "estimate"):
            windows = sample_windows(plan, params.stat_samples, stains=stains)
            # In the driver (a fraction of a second): a new cluster's workers are still starting.
            estimate = _estimate_task(windows, plan)
        with _stage(timings, "detect"):
            todo = [t for t, b in zip(tiles, blank, strict=True) if not b]
            parts = _map_stage(
                engine,
                _detect_tile,
                todo,
                plan,
                estimate,
                desc=f"detect {slide_path.name}",
                progress=progress,
            )
        with _stage(timings, "quality"):
            candidates = _assemble_candidates(parts, plan, estimate)
        # The overview picture needs the final verdicts; its thumbnail is read while workers work.
        thumbnail = _BACKGROUND.submit(_overview_thumbnail, plan)
        # Room for every candidate accepted so far: re-centring only ever rejects more.
        draft = create_gallery_draft(
            final,
            int(candidates["accepted"].sum()),
            {},
            crop_px=params.crop.crop_px,
            shard_cells=params.shard_cells,
            overwrite=overwrite or final.exists(),
        )
        with _stage(timings, "cells"):
            candidates, receipts = _relocate_and_crop(
                engine,
                candidates,
                plan,
                estimate,
                str(draft.partial_path),
                params.shard_cells,
                progress,
                slide_path.name,
            )
        notes = slide_warnings(estimate, len(candidates))
        for note in notes:
            warnings.warn(f"{slide_path}: {note}", UserWarning, stacklevel=2)
            say(f"warning: {note}")
        accepted = candidates[candidates["accepted"]].copy()
        cells = _cells_table(accepted, candidates, plan)
        candidates["cell_index"] = -1
        candidates.loc[accepted.index, "cell_index"] = np.arange(len(accepted))
        attrs = _attrs(plan, estimate, candidates, tiles, blank)
        attrs["warnings"] = list(notes)
        overview = _BACKGROUND.submit(_overview_png, thumbnail, plan, candidates.copy())
        # Every task is done: a local cluster closes (~0.4 s) while the gallery is finalized.
        closing = _BACKGROUND.submit(cluster.close)
    except BaseException as exc:
        if closing is None:  # the cluster closes knowing why (compute_client then quiets Dask's logs)
            cluster.__exit__(type(exc), exc, exc.__traceback__)
        else:
            wait([closing])
        raise
    try:
        timings["total_before_finalize"] = round(time.perf_counter() - started, 3)
        raise_if_interrupted()
        tables = {"cells": _columns(cells), "candidates": _columns(candidates)}
        finalize_gallery(draft, attrs | {"timings_s": timings}, receipts, **tables)
        _write_qc_pictures(final, slide_path, overview, say)
    finally:
        wait([closing])
    if closing.exception() is not None:
        # The gallery is complete by now: a cluster that did not close cleanly fails no slide.
        warnings.warn(
            f"{slide_path}: the local cluster did not close cleanly ({closing.exception()})", stacklevel=2
        )
    say(f"{slide_path.name}: {len(cells)} cells from {len(candidates)} candidates -> {final}")
    return RunResult(
        slide_path, final, "done", len(cells), len(candidates), time.perf_counter() - started, tuple(notes)
    )


def _write_qc_pictures(final: Path, slide_path: Path, overview: Future, say: Callable[[str], None]) -> None:
    """The overview picture and the contact sheet beside a complete gallery; a failure only warns."""
    try:
        write_file(final.with_name(f"{slide_path.stem}.overview.png"), overview.result())
        _write_contact_sheet(final, slide_path)
    except Exception as exc:
        if is_interrupt(exc):
            raise
        # The gallery is complete and whole by now; the pictures only help to look at it, so no
        # failure here (an unreadable thumbnail, a full disk, a codec error) may fail the slide.
        warnings.warn(f"{slide_path}: QC pictures not written ({exc})", UserWarning, stacklevel=3)
        say(f"QC pictures not written: {exc}")


def slide_warnings(estimate: SlideEstimate, n_candidates: int) -> list[str]:
    """What a user should know about a slide's estimate and result (empty when nothing is unusual).

    Parameters
    ----------
    estimate
        The slide's estimate.
    n_candidates
        How many candidates detection found.
    """
    notes = stain_warnings(estimate.stains)
    if estimate.density > MAX_TYPICAL_DENSITY:
        notes.append(
            f"the typical field is {estimate.density:.1f} red cells thick: the samples show no readable "
            "monolayer, so thick zones are judged against a thick smear"
        )
    if n_candidates == 0 and estimate.stains.stained_fraction > MIN_STAINED_FRACTION:
        notes.append(
            f"stain covers {estimate.stains.stained_fraction:.0%} of the sampled slide, yet no white-cell "
            "candidate was found; check the overview picture and the estimate in the gallery's attrs"
        )
    return notes


@contextmanager
def _engine(client: Any, workers: int) -> Iterator[Any]:
    if client is not None:
        yield client
        return
    with compute_client(workers, preload=("pipeline.runner",)) as own:
        yield own


def _window(engine: Any) -> int:
    if engine is None:
        return 1
    # The planned workers, not only those connected now: SLURM jobs join while a slide runs.
    return max(4, 3 * worker_count(engine))


def _map_stage(
    engine: Any, fn: Callable[..., Any], items: list[Any], *args: Any, desc: str, progress: bool
) -> list:
    """``fn(item, *args)`` for every item on the engine, in order, with a progress bar of tasks."""
    results = []
    with tqdm(total=len(items), desc=desc, unit="task", disable=not progress, leave=False) as bar:
        for result in ordered_map(engine, fn, items, *args, window=_window(engine)):
            results.append(result)
            bar.update(1)
    return results


def _assemble_candidates(parts: list[pd.DataFrame], plan: Plan, estimate: SlideEstimate) -> pd.DataFrame:
    """All candidates in a tiling-independent order, with neighbour features and a first judgement."""
    parts = [p for p in parts if len(p)]
    candidates = pd.concat(parts, ignore_index=True) if parts else _empty_candidates()
    candidates = candidates.sort_values(["y_px", "x_px"], kind="stable").reset_index(drop=True)
    mpp0 = plan.mpp0
    radius_um = np.sqrt(candidates["area_um2"].to_numpy(float) / math.pi)
    candidates["gap_um"] = neighbour_gaps_um(
        candidates["x_px"].to_numpy(float) * mpp0, candidates["y_px"].to_numpy(float) * mpp0, radius_um
    )
    candidates["blur_um"] = np.nan
    verdict = judge(candidates, plan.params.quality, estimate.density)
    return candidates.join(verdict)


def _relocate_and_crop(
    engine: Any,
    candidates: pd.DataFrame,
    plan: Plan,
    estimate: SlideEstimate,
    partial_path: str,
    shard_cells: int,
    progress: bool,
    name: str,
) -> tuple[pd.DataFrame, list[Any]]:
    """Re-centre accepted candidates at full resolution, measure focus, judge again, and write the
    crops of the cells into a draft gallery, shard by shard as their rows become known.

    Returns the candidates with their new positions and verdicts, and the shards' receipts.
    """
    candidates["x_overview_px"] = candidates["x_px"]
    candidates["y_overview_px"] = candidates["y_px"]
    candidates["relocated"] = False
    todo = candidates.loc[candidates["accepted"], _BATCH_COLUMNS]
    # Half a shard per batch: the crops held on a worker until their shard is written took 1.49 GB at
    # the peak with a whole shard per batch, 1.26 GB with half (2 workers, 268 mm^2 slide), for the
    # same CPU within noise; the shard task moves the smaller part of its crops (Dask runs a task where
    # most of its input lies).
    step = max(1, shard_cells // 2)
    batches = [todo.iloc[i : i + step] for i in range(0, len(todo), step)]
    tables = []
    # Crops wait on the workers, as slices of the tasks' results, until a shard's rows are complete.
    waiting: list[Any] = []
    n_waiting = n_cells = 0
    window = _window(engine)
    with (
        # Room for more shard writes than relocation tasks in flight: the driver, waiting on a shard,
        # would stop feeding the workers relocation tasks.
        TaskQueue(engine, 2 * window) as shards,
        tqdm(total=len(batches), desc=f"cells {name}", unit="task", disable=not progress, leave=False) as bar,
    ):
        for table, crops in ordered_map_holding(engine, _cells_task, batches, plan, estimate, window=window):
            tables.append(table)
            n_new, used = int(table["accepted"].sum()), 0
            while used < n_new:
                take = min(shard_cells - n_waiting, n_new - used)
                waiting.append(held_rows(engine, crops, used, used + take))
                used, n_waiting = used + take, n_waiting + take
                if n_waiting == shard_cells:
                    shards.submit(_shard_task, (n_cells // shard_cells, waiting, None), partial_path)
                    n_cells, waiting, n_waiting = n_cells + n_waiting, [], 0
            bar.update(1)
        if waiting:
            n_cells += n_waiting
            shards.submit(_shard_task, (n_cells // shard_cells, waiting, n_cells), partial_path)
        receipts = shards.results()
    if tables:
        moved = pd.concat(tables)
        columns = ["x_px", "y_px", "blur_um", "relocated"]
        candidates.loc[moved.index, columns] = moved[columns]
    verdict = judge(candidates, plan.params.quality, estimate.density)
    candidates[["quality", "accepted", "reason"]] = verdict[["quality", "accepted", "reason"]]
    if tables and not np.array_equal(verdict.loc[moved.index, "accepted"], moved["accepted"]):
        raise AssertionError("cells were cropped by a verdict that differs from the final one")
    candidates["padded"] = [
        is_padded(x, y, plan.mpp0, plan.params.crop, plan.dimensions)
        for x, y in zip(candidates["x_px"], candidates["y_px"], strict=True)
    ]
    return candidates, receipts


def _cells_table(accepted: pd.DataFrame, candidates: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    cells = accepted.drop(columns=["accepted", "reason"]).reset_index(names="candidate_index")
    cells.insert(0, "cell_id", np.arange(len(cells), dtype=np.int64))
    cells["x_um"] = cells["x_px"] * plan.mpp0
    cells["y_um"] = cells["y_px"] * plan.mpp0
    return cells


def _columns(table: pd.DataFrame) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in table.columns:
        values = table[name].to_numpy()
        if values.dtype == object:
            values = values.astype(str)
        out[str(name)] = values
    return out


def _attrs(
    plan: Plan, estimate: SlideEstimate, candidates: pd.DataFrame, tiles: list, blank: np.ndarray
) -> dict[str, Any]:
    reasons = candidates.loc[~candidates["accepted"], "reason"].value_counts()
    return {
        "pipeline_version": __version__,
        "parameters": plan.params.as_dict(),
        "slide": {
            "path": str(Path(plan.ref.path).resolve()),
            "mpp": plan.mpp0,
            "mpp_override": plan.ref.mpp_override,
            "dimensions": list(plan.dimensions),
            "vendor": _vendor(plan.ref),
        },
        "overview": {
            "mpp": plan.overview_mpp,
            "level": plan.overview_native_level,
            "resampled": plan.overview_native_level is None,
            "size_px": list(plan.overview_size),
            "halo_px": plan.halo_px,
            "tiles": len(tiles),
            "tiles_blank": int(np.sum(blank)),
        },
        "estimate": {
            "stains": asdict(estimate.stains),
            "density_layers": estimate.density,
        },
        "counts": {
            "candidates": len(candidates),
            "accepted": int(candidates["accepted"].sum()),
            "rejected_by_reason": {str(k): int(v) for k, v in reasons.items()},
            "padded": int(candidates.loc[candidates["accepted"], "padded"].sum()),
        },
        "coordinates": "x_px, y_px: level-0 pixels, continuous (pixel i spans [i, i+1))",
    }


def _vendor(ref: SlideRef) -> str:
    return cached_slide(ref).vendor


def _overview_thumbnail(plan: Plan) -> tuple[np.ndarray, float]:
    with open_slide(plan.ref.path, plan.ref.mpp_override) as slide:
        return slide.thumbnail(2400)


def _overview_png(thumbnail: Future, plan: Plan, candidates: pd.DataFrame) -> bytes:
    """The slide's thumbnail with every candidate marked, as PNG bytes (written once the gallery is)."""
    thumb, thumb_mpp = thumbnail.result()
    return png_bytes(overview_picture(thumb, thumb_mpp, plan.mpp0, candidates))


def _write_contact_sheet(final: Path, slide_path: Path) -> None:
    write_png(final.with_name(f"{slide_path.stem}.contact.png"), gallery_contact_sheet(open_gallery(final)))
