"""Command line: parses arguments and calls the library; no pipeline logic lives here.

Every user error is a :class:`~pipeline.errors.PipelineError`, printed as one line (``error: ...``) with
exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__
from .errors import PipelineError, clear_interrupt, is_interrupt, note_interrupt, raise_if_interrupted

if TYPE_CHECKING:
    from .engine import SlurmOptions

EXIT_FAILED = 1


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from .simulate.presets import ARTEFACTS, PLACEMENTS, PRESETS

    p = sub.add_parser(
        "simulate",
        help="write a simulated whole-slide scan of a blood smear (SVS) with ground truth",
        description="Simulate a stained blood-smear scan as an Aperio SVS, with <stem>.truth.csv "
        "(one row per nucleated cell) and <stem>.truth.json (parameters, red-cell and platelet counts).",
        epilog="Writes OUT.svs, with OUT.truth.csv and OUT.truth.json beside it.",
    )
    p.add_argument("out", help="output .svs path")
    p.add_argument("--width-mm", type=float, default=3.0, help="window width in mm (default 3)")
    p.add_argument("--height-mm", type=float, default=3.0, help="window height in mm (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--preset",
        default="normal",
        choices=sorted(PRESETS),
        help="blood counts and differential (default normal): "
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
        help="part of the smear in the window (default monolayer): one zone, 'across' (all zones "
        "compressed into the window) or 'whole' (the whole smear; use --width-mm 75 --height-mm 25)",
    )
    p.add_argument(
        "--artefacts",
        default="all",
        metavar="LIST",
        help="artefacts of real slides (default all): all, none, or a comma-separated list of "
        + "; ".join(f"{name}: {what}" for name, what in ARTEFACTS.items()),
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local Dask worker processes (default: cores, max 8; 0: none)",
    )
    p.add_argument(
        "--chunk-px", type=int, default=1024, help="render chunk side in px, a multiple of 256 (default 1024)"
    )
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
        artefacts=args.artefacts,
    )
    print(
        f"wrote {result.slide_path} ({result.width_px} x {result.height_px} px, "
        f"{result.n_nucleated} nucleated cells, {result.n_red_cells} red cells) "
        f"with {result.truth_path.name} and {result.summary_path.name} in {result.seconds:.1f} s"
    )
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    from .crop_presets import CROP_PRESETS, DEFAULT_PRESET

    default = CROP_PRESETS[DEFAULT_PRESET]
    p = sub.add_parser(
        "run",
        help="detect white cells on slides and write single-cell galleries (zarr)",
        description="Metafer-style detection: a ~1 um/px overview, optical density against the local glass "
        "white, an adaptive threshold, objects of 40-800 um^2 (by default), a quality filter, then a square "
        "crop of every accepted cell at full resolution, into OUT/<slide stem>.zarr. Crops have the "
        f"{DEFAULT_PRESET} geometry ({default.crop_um:g} um, {default.crop_px} px) unless --preset picks "
        "another public gallery's or --crop-um/--crop-px set one.",
        epilog="crop presets (--preset): "
        + "; ".join(f"{name}: {preset.description}" for name, preset in sorted(CROP_PRESETS.items())),
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
        "--workers",
        type=int,
        default=None,
        help="local Dask worker processes (default: cores, max 8; 0: everything in this process); "
        "ignored with --scheduler or --cluster slurm",
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(CROP_PRESETS),
        help=f"crop geometry of a public gallery (default {DEFAULT_PRESET}; see the list below); "
        "--crop-um/--crop-px override it",
    )
    p.add_argument("--crop-um", type=float, default=None, help="crop side in um (default: the preset's)")
    p.add_argument("--crop-px", type=int, default=None, help="crop side in px (default: the preset's)")
    p.add_argument("--min-area-um2", type=float, default=40.0, help="smallest object kept, um^2 (default 40)")
    p.add_argument(
        "--max-area-um2", type=float, default=800.0, help="largest object kept, um^2 (default 800)"
    )
    p.add_argument("--tile-px", type=int, default=None, help="overview tile side in px (default 2048)")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose gallery is already complete")
    p.add_argument(
        "--scheduler",
        default=None,
        help="join an existing Dask cluster: tcp://HOST:PORT or a scheduler file (default: a local one)",
    )
    p.add_argument(
        "--cluster",
        choices=("local", "slurm"),
        default="local",
        help="where workers run when no --scheduler is given: local processes (default) or SLURM jobs",
    )
    p.add_argument(
        "--slides-at-once",
        type=int,
        default=None,
        help="slides in flight at once (default: half the cluster's workers, at least 2 and at most 8; "
        "1 with --workers 0; never more than the slides given)",
    )
    slurm = p.add_argument_group(
        "SLURM (--cluster slurm; needs dask-jobqueue; unset options come from dask's config jobqueue.slurm.*)"
    )
    slurm.add_argument("--jobs", type=int, default=None, help="SLURM jobs running workers (default 1)")
    slurm.add_argument("--cores", type=int, default=None, help="cores per job, one worker process each")
    slurm.add_argument("--memory", default=None, help="memory per job, e.g. 16GB (shared by its workers)")
    slurm.add_argument("--walltime", default=None, help="time limit per job, e.g. 04:00:00")
    slurm.add_argument("--queue", default=None, help="partition (sbatch -p)")
    slurm.add_argument("--account", default=None, help="account charged (sbatch -A)")
    slurm.add_argument(
        "--local-directory", default=None, help="node-local scratch for the workers, e.g. /scratch/$USER"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .batch import check_gallery_names, drafts_removed_on_failure, expand_slides, run_batch
    from .crop_presets import resolve_crop
    from .engine import compute_client, default_workers
    from .errors import ParameterError
    from .relocate import CropParams
    from .runner import RunParams

    if args.mpp is not None:  # before any slide: a complete gallery would be skipped without a word
        from .slide import check_mpp_option

        check_mpp_option(args.mpp)
    crop_um, crop_px = resolve_crop(args.preset, args.crop_um, args.crop_px)
    base = RunParams()
    params = replace(
        base,
        tile_px=base.tile_px if args.tile_px is None else args.tile_px,
        crop=CropParams(crop_um=crop_um, crop_px=crop_px),
        segment=replace(base.segment, min_area_um2=args.min_area_um2, max_area_um2=args.max_area_um2),
    )
    workers = default_workers() if args.workers is None else args.workers
    slides = expand_slides(args.slides)
    check_gallery_names(slides, args.out)  # before any SLURM job is submitted
    slurm = _slurm_options(args)
    if args.slides_at_once is not None and args.slides_at_once < 1:
        raise ParameterError(f"--slides-at-once must be 1 or more, got {args.slides_at_once}")
    # One cluster for all slides: starting workers costs seconds.
    with (
        drafts_removed_on_failure(slides, args.out),
        compute_client(
            workers,
            args.scheduler,
            slurm=slurm,
            slurm_log_directory=str(Path(args.out) / "logs" / "slurm"),
            say=lambda message: print(message, file=sys.stderr),
            preload=("pipeline.runner",),
        ) as client,
    ):
        outcomes = run_batch(
            slides,
            args.out,
            params=params,
            mpp=args.mpp,
            client=client,
            workers=workers,
            overwrite=args.overwrite,
            progress=not args.quiet,
            concurrent_slides=args.slides_at_once,
        )
    failed = 0
    for outcome in outcomes:
        if outcome.status == "failed":
            failed += 1
            named = Path(outcome.slide).name in outcome.error
            print(f"error: {'' if named else outcome.slide + ': '}{outcome.error}", file=sys.stderr)
        elif outcome.status == "skipped":
            print(f"{outcome.slide}: gallery already complete, skipped (--overwrite redoes it)")
        else:
            print(
                f"{outcome.slide}: {outcome.cells} cells from {outcome.candidates} candidates "
                f"in {outcome.seconds:.1f} s"
            )
    if len(outcomes) > 1:
        _print_batch_table(outcomes)
        done = sum(o.status != "failed" for o in outcomes)
        print(f"{done} of {len(outcomes)} slides done, {failed} failed; record: {args.out}/batch.json")
    return EXIT_FAILED if failed else 0


def _print_batch_table(outcomes: Sequence[Any]) -> None:
    """One row per slide: status, cells, candidates, seconds (errors are printed above)."""
    width = max(len("slide"), *(len(Path(o.slide).name) for o in outcomes))
    print(f"\n{'slide':<{width}}  {'status':<8}{'cells':>8}{'candidates':>12}{'seconds':>9}")
    for o in outcomes:
        print(f"{Path(o.slide).name:<{width}}  {o.status:<8}{o.cells:>8}{o.candidates:>12}{o.seconds:>9.1f}")
    cells, candidates = sum(o.cells for o in outcomes), sum(o.candidates for o in outcomes)
    print(f"{'total':<{width}}  {'':<8}{cells:>8}{candidates:>12}{sum(o.seconds for o in outcomes):>9.1f}")


def _slurm_options(args: argparse.Namespace) -> SlurmOptions | None:
    from .engine import SlurmOptions
    from .errors import ParameterError

    names = ("jobs", "cores", "memory", "walltime", "queue", "account", "local_directory")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.cluster != "slurm":
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            verb = "applies" if len(given) == 1 else "apply"
            raise ParameterError(f"{flags} {verb} only with --cluster slurm")
        return None
    return SlurmOptions(**given)


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

    from .evaluate import evaluate_gallery, format_report

    report = evaluate_gallery(args.gallery, args.truth)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    # Not pipeline.export: it imports OpenCV, pandas and zarr, a second of start-up for every command.
    from .crop_presets import CROP_PRESETS, EXPORT_FORMATS

    p = sub.add_parser(
        "export",
        help="write a gallery as image files + a cells CSV, CSV tables, or a GeoJSON overlay for QuPath",
        description="png/jpeg/tiff: one image per cell in OUT/<stem>/, named <stem>_<index>_x<X>_y<Y> "
        "(level-0 centre pixel), with OUT/<stem>/<stem>.cells.csv (file, slide, every cell column). csv: "
        "OUT/<stem>.cells.csv and OUT/<stem>.candidates.csv. geojson: OUT/<stem>.geojson, every "
        "candidate (accepted or rejected, with its measurements) as a QuPath detection in level-0 pixels.",
    )
    p.add_argument("galleries", nargs="+", help="OUT/<stem>.zarr galleries written by run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--format",
        dest="export_format",
        default=None,
        choices=EXPORT_FORMATS,
        help="what to write (default: the image format of the preset the gallery was cut with (run "
        "--preset: "
        + ", ".join(f"{name} {preset.image_format}" for name, preset in sorted(CROP_PRESETS.items()))
        + "), else png)",
    )
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=95,
        help="JPEG quality 1-100 (default 95); applies to jpeg images only, other formats are lossless",
    )
    p.add_argument(
        "--by-label",
        action="store_true",
        help="png/jpeg/tiff: one folder per label (OUT/<stem>/<label>/, the layout torchvision's ImageFolder "
        "reads); unlabelled cells and 'unsure' ones are left out",
    )
    p.add_argument(
        "--annotator",
        default=None,
        help="whose labels fill the label column (default: the label all annotators of the cell agree on)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier export")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_galleries

    results = export_galleries(  # refuses two galleries of one stem before writing anything
        args.galleries,
        args.out,
        args.export_format,
        jpeg_quality=args.jpeg_quality,
        overwrite=args.overwrite,
        progress=not args.quiet,
        by_label=args.by_label,
        annotator=args.annotator,
    )
    for result in results:
        print(result.summary())
    return 0


def _add_review(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "review",
        help="look at the galleries of an output folder in the browser, check them against their slides, "
        "label cells",
        description="A local web app: the batch, each slide in a zoomable viewer with every candidate "
        "marked, the gallery beside it, and labelling with the keyboard (labels go to "
        "OUT/<stem>.labels/<annotator>.json). Listens on 127.0.0.1; on any other --host every request "
        "needs the random token printed with the URL.",
    )
    p.add_argument("out", help="the folder `run --out` wrote")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other, e.g. 0.0.0.0, requires the token)",
    )
    p.add_argument(
        "--token",
        action="store_true",
        help="require the token on 127.0.0.1 too (shared machines, e.g. a cluster login node)",
    )
    p.set_defaults(func=_cmd_review)


def _cmd_review(args: argparse.Namespace) -> int:
    from .review.server import serve

    # Ctrl-C (or SIGTERM) is how the app is stopped, and leaves nothing unfinished: waitress returns
    # from its loop on the interrupt, or it arrives here.
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.out, host=args.host, port=args.port, require_token=args.token)
    clear_interrupt()
    print("review stopped")
    return 0


def _add_agreement(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "agreement",
        help="labels per class, confusion matrices and Cohen's kappa between the annotators of a gallery",
    )
    p.add_argument("gallery", help="OUT/<stem>.zarr labelled with `review`")
    p.set_defaults(func=_cmd_agreement)


def _cmd_agreement(args: argparse.Namespace) -> int:
    from .review.agreement import agreement_report, format_agreement

    counts, pairs = agreement_report(args.gallery)
    print(format_agreement(args.gallery, counts, pairs))
    return 0


def program_name(argv0: str | None = None) -> str:
    """The name the command was run by, for usage lines and ``--version``.

    Parameters
    ----------
    argv0
        ``sys.argv[0]`` when None: the installed script's path, or ``.../pipeline/__main__.py`` (or
        ``-c``) under ``python -m pipeline``.

    Returns
    -------
    str
        ``bloodsmear-pipeline`` (or whatever the script is called) or ``python -m pipeline``.
    """
    name = Path(sys.argv[0] if argv0 is None else argv0).name
    if name in {"", "-c", "-m"} or name.endswith(".py") or name.startswith("python"):
        return "python -m pipeline"
    return name


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line (``bloodsmear-pipeline`` or ``python -m pipeline``)."""
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="White-cell galleries from whole-slide blood-smear scans (Metafer-style), "
        "and a simulator of such scans.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_simulate(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_review(sub)
    _add_agreement(sub)
    return parser


#: Exit code when the reader of standard output closed it early: 128 + SIGPIPE, as the shell reports.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    clear_interrupt()
    handlers = _interrupt_on_signals()  # first: building the parser imports modules, and takes time
    shown = warnings.showwarning
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        if not args.debug:
            warnings.showwarning = _show_warning_one_line
        code = int(args.func(args))
        raise_if_interrupted()  # an interrupt that a callee swallowed still ends the command as one
        return code
    except (KeyboardInterrupt, Exception) as exc:
        debug = args is not None and args.debug
        if is_interrupt(exc):
            if debug and not isinstance(exc, KeyboardInterrupt):
                raise
            print("interrupted: nothing unfinished was marked complete; re-run to resume", file=sys.stderr)
            # CPython remembers a KeyboardInterrupt that escaped an exec() of a string (dataclass and
            # namedtuple creation, during a lazy import) and then ends the process by SIGINT instead of
            # with our exit code; any later exec() of a string clears that record.
            exec("pass")
            return 130
        if isinstance(exc, BrokenPipeError) and exc.filename is None:
            # Whoever read our output went away (`... | head`): stop quietly, as a program killed by
            # SIGPIPE does, and keep Python from failing again when it flushes stdout at exit.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        if debug:
            raise
        print(f"error: {_one_line_error(exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        warnings.showwarning = shown
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        # The interrupt record is kept (the next main() clears it): slide threads of a batch may still
        # be running, and must stop at their next check instead of finishing their slide.


def _one_line_error(exc: BaseException) -> str:
    """The message printed after ``error:`` for an exception that ends a command."""
    if isinstance(exc, PipelineError):
        return str(exc)
    if isinstance(exc, OSError):  # outside any slide: the output folder, batch record, scheduler file
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}; check the path and free disk space"
    # A bug: still one line, with the way to the traceback.
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return f"unexpected {text}; re-run with --debug for the traceback and report it"


def _interrupt_on_signals() -> dict[int, Any]:
    """Treat SIGINT, SIGTERM and SIGHUP as an interrupt, recorded so that its consequences are too.

    SLURM sends SIGTERM at a job's walltime and on ``scancel``, and a closed terminal sends SIGHUP;
    without a handler Python dies at once and skips every ``finally``, leaving drafts and locks. The
    interrupt is also recorded (:func:`~pipeline.errors.note_interrupt`), because the KeyboardInterrupt
    can surface as another error (ctypes turns it into ``ArgumentError``). Returns the previous handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be set from the main thread (e.g. main() called in a test)

    def interrupt(signum: int, _frame: object) -> None:
        note_interrupt()
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous: dict[int, Any] = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        # An ignored signal stays ignored: nohup ignores SIGHUP, and a shell ignores SIGINT for the
        # jobs it starts in the background, so that closing the terminal or Ctrl-C leaves them running.
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, interrupt)
    return previous


def _show_warning_one_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings as ``warning: <message>`` lines, without Python's source-location lines."""
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=file or sys.stderr)
