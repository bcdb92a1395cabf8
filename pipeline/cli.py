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
    p.add_argument("--mpp", type=float, default=0.25, help="level-0 pixel size in um/px (default 0.25, a 40x scan)")
    p.add_argument(
        "--placement",
        "--zone",
        dest="placement",
        default="monolayer",
        choices=PLACEMENTS,
        help="part of the smear in the window: one zone, 'across' (all zones compressed into the "
        "window) or 'whole' (the whole smear; use --width-mm 75 --height-mm 25)",
    )
    p.add_argument("--workers", type=int, default=None, help="local Dask worker processes (default: cores, max 8; 0: none)")
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
        f"wrote {result.slide_path} ({result.width_px} x {result.height_px} px, {result.n_nucleated} nucleated "
        f"cells, {result.n_red_cells} red cells) and {result.truth_path.name} in {result.seconds:.1f} s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m pipeline``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="White-cell galleries from whole-slide blood-smear scans (Metafer-style), and a simulator.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
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
