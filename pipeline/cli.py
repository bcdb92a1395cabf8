"""Command line: parses arguments and calls the library; no pipeline logic lives here.

Every user error is a :class:`~pipeline.errors.PipelineError`, printed as one line (``error: ...``) with
exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import PipelineError

EXIT_FAILED = 1


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from .simulate.presets import PRESETS
    from .simulate.scene import PLACEMENTS

    p = sub.add_parser(
        "simulate",
        help="write a simulated whole-slide scan of a blood smear (SVS) with ground truth",
        description="Simulate a stained blood-smear scan as an Aperio SVS, with <stem>.truth.csv "
        "(one row per nucleated cell) and <stem>.truth.json (parameters, red-cell and platelet counts).",
    )
    p.add_argument("out", help="output .svs path")
    p.add_argument("--width-mm", type=float, default=3.0, help="window width in mm (default 3)")
    p.add_argument("--height-mm", type=float, default=3.0, help="window height in mm (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--preset",
        default="normal",
        choices=sorted(PRESETS),
        help="blood counts and differential: "
        + "; ".join(f"{name}: {preset.description}" for name, preset in sorted(PRESETS.items())),
    )
    p.add_argument(
        "--mpp", type=float, default=0.25, help="level-0 pixel size in um/px (default 0.25, a 40x scan)"
    )
    p.add_argument(
        "--placement",
        "--zone",
        dest="placement",
        default="monolayer",
        choices=PLACEMENTS,
        help="part of the smear in the window: one zone, 'across' (all zones compressed into the "
        "window) or 'whole' (the whole smear; use --width-mm 75 --height-mm 25)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local Dask worker processes (default: cores, max 8; 0: none)",
    )
    p.add_argument("--chunk-px", type=int, default=1024, help="render chunk side in px, a multiple of 256")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .engine import default_workers
    from .simulate import simulate_slide

    result = simulate_slide(
        args.out,
        width_mm=args.width_mm,
        height_mm=args.height_mm,
        seed=args.seed,
        preset=args.preset,
        mpp=args.mpp,
        placement=args.placement,
        workers=default_workers() if args.workers is None else args.workers,
        chunk_px=args.chunk_px,
        progress=not args.quiet,
    )
    print(
        f"wrote {result.slide_path} ({result.width_px} x {result.height_px} px, "
        f"{result.n_nucleated} nucleated cells, {result.n_red_cells} red cells) "
        f"and {result.truth_path.name} in {result.seconds:.1f} s"
    )
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="detect white cells on slides and write single-cell galleries (zarr)",
        description="Metafer-style detection: a ~1 um/px overview, optical density against the local glass "
        "white, an adaptive threshold, objects of 40-800 um^2, a quality filter, then a 25 x 25 um crop "
        "(288 x 288 px) of every accepted cell at full resolution, into OUT/<slide stem>.zarr.",
    )
    p.add_argument(
        "slides",
        nargs="+",
        help="slide files (any format OpenSlide reads, or TIFF), folders of slides, or globs",
    )
    p.add_argument("--out", default="out", help="output folder (default: ./out)")
    p.add_argument(
        "--mpp", type=float, default=None, help="level-0 pixel size in um/px, overriding the metadata"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="local Dask worker processes (default: cores, max 8)"
    )
    p.add_argument("--crop-um", type=float, default=25.0, help="crop side in um (default 25, MLL23)")
    p.add_argument("--crop-px", type=int, default=288, help="crop side in px (default 288, MLL23)")
    p.add_argument("--min-area-um2", type=float, default=40.0, help="smallest object kept, um^2 (default 40)")
    p.add_argument(
        "--max-area-um2", type=float, default=800.0, help="largest object kept, um^2 (default 800)"
    )
    p.add_argument("--tile-px", type=int, default=1024, help="overview tile side in px (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose gallery is already complete")
    p.add_argument(
        "--scheduler",
        default=None,
        help="join an existing Dask cluster: tcp://HOST:PORT or a scheduler file (default: a local one)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .batch import expand_slides, run_batch
    from .engine import compute_client, default_workers
    from .relocate import CropParams
    from .runner import RunParams

    base = RunParams()
    params = replace(
        base,
        tile_px=args.tile_px,
        crop=CropParams(crop_um=args.crop_um, crop_px=args.crop_px),
        segment=replace(base.segment, min_area_um2=args.min_area_um2, max_area_um2=args.max_area_um2),
    )
    workers = default_workers() if args.workers is None else args.workers
    slides = expand_slides(args.slides)
    # One cluster for all slides: starting workers costs seconds.
    with compute_client(workers, args.scheduler) as client:
        outcomes = run_batch(
            slides,
            args.out,
            params=params,
            mpp=args.mpp,
            client=client,
            workers=workers,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    failed = 0
    for outcome in outcomes:
        if outcome.status == "failed":
            failed += 1
            print(f"error: {outcome.error}", file=sys.stderr)
        elif outcome.status == "skipped":
            print(f"{outcome.slide}: gallery already complete, skipped (--overwrite redoes it)")
        else:
            print(
                f"{outcome.slide}: {outcome.cells} cells from {outcome.candidates} candidates "
                f"in {outcome.seconds:.1f} s"
            )
    if len(outcomes) > 1:
        done = sum(o.status != "failed" for o in outcomes)
        print(f"{done} of {len(outcomes)} slides done, {failed} failed; record: {args.out}/batch.json")
    return EXIT_FAILED if failed else 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare a gallery with a simulated slide's truth (recall, precision, centring, duplicates)",
    )
    p.add_argument("gallery", help="OUT/<stem>.zarr written by run")
    p.add_argument("truth", help="<stem>.truth.csv written by simulate")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .evaluate import evaluate_gallery

    report = evaluate_gallery(args.gallery, args.truth)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"truth cells: {report['truth_cells']}")
    print(
        f"{'':<11}{'found':>7}{'recall':>8}{'precision':>10}{'dupl.':>6}{'false':>6}{'centre med/p95 um':>19}"
    )
    for name in ("candidates", "accepted"):
        r = report[name]
        err = r["centring_error_um"]
        centring = f"{err['median']:.2f} / {err['p95']:.2f}" if err["median"] is not None else "-"
        print(
            f"{name:<11}{r['matched']:>7}{_pct(r['recall']):>8}{_pct(r['precision']):>10}"
            f"{r['duplicates']:>6}{r['false']:>6}{centring:>19}"
        )
    for name in ("candidates", "accepted"):
        zones = ", ".join(f"{z} {_pct(v)}" for z, v in report[name]["recall_by_zone"].items())
        print(f"{name} recall by zone: {zones}")
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m pipeline``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="White-cell galleries from whole-slide blood-smear scans (Metafer-style), "
        "and a simulator of such scans.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_simulate(sub)
    _add_evaluate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: nothing unfinished was marked complete; re-run to resume", file=sys.stderr)
        return 130
