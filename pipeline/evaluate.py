"""Compare a gallery with the simulator's truth: recall, precision, centring error, duplicates.

Matching is one-to-one: candidate-truth pairs closer than the match radius (the larger of
``min_radius_um`` and the truth cell's radius) are taken in order of distance, each candidate and each
truth cell at most once. A candidate left over that lies within the radius of an already matched truth
cell is a *duplicate*; any other leftover is a *false* detection.

Recall is counted over truth cells (overall, per class, per smear zone); precision over detections
(overall and per zone: the zone a detection lies in, from the simulated scene when its ``truth.json``
is at hand, else the zone of the nearest truth cell). Detections have no class, so there is no precision
per class.

The quality filter is compared with the simulator's own judgement of each cell: a truth cell is *good*
for a gallery when it is in focus, touches nothing and lies outside the thick zone (``in_focus``,
``touching``, ``zone``). For each reject reason the report counts the good and bad cells it removed, and
the detections that were no cell at all; it also states the two focus limits (the truth's and the
filter's) and how many accepted cells fall between them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .errors import ParameterError, PipelineError
from .gallery import open_gallery

MIN_MATCH_RADIUS_UM = 6.0
#: Zones of a wedge smear from the drop of blood to the tip (the simulator's names), for ordering tables.
ZONE_ORDER = ("thick", "monolayer", "feathered", "glass")


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of detections to truth cells."""

    truth_of_detection: np.ndarray  # index into truth, -1 if unmatched
    detection_of_truth: np.ndarray  # index into detections, -1 if unmatched
    distance_um: np.ndarray  # per detection, distance to its truth (nan if unmatched)
    duplicate: np.ndarray  # per detection: unmatched but within the radius of a matched truth cell


def match(
    det_x_um: np.ndarray,
    det_y_um: np.ndarray,
    truth_x_um: np.ndarray,
    truth_y_um: np.ndarray,
    truth_radius_um: np.ndarray,
    min_radius_um: float = MIN_MATCH_RADIUS_UM,
) -> Matching:
    """Match detections to truth cells one-to-one, closest pairs first (see the module docstring)."""
    n_det, n_truth = len(det_x_um), len(truth_x_um)
    truth_of = np.full(n_det, -1, dtype=np.int64)
    det_of = np.full(n_truth, -1, dtype=np.int64)
    distance = np.full(n_det, np.nan)
    duplicate = np.zeros(n_det, dtype=bool)
    if n_det == 0 or n_truth == 0:
        return Matching(truth_of, det_of, distance, duplicate)
    radius = np.maximum(np.asarray(truth_radius_um, dtype=float), min_radius_um)
    tree = cKDTree(np.column_stack([truth_x_um, truth_y_um]))
    det = np.column_stack([det_x_um, det_y_um])
    pairs = []
    for i, near in enumerate(tree.query_ball_point(det, r=float(radius.max()))):
        for j in near:
            d = math.hypot(det[i, 0] - truth_x_um[j], det[i, 1] - truth_y_um[j])
            if d <= radius[j]:
                pairs.append((d, i, j))
    pairs.sort()
    within: dict[int, list[int]] = {}
    for d, i, j in pairs:
        within.setdefault(i, []).append(j)
        if truth_of[i] < 0 and det_of[j] < 0:
            truth_of[i], det_of[j], distance[i] = j, i, d
    for i, truths in within.items():
        if truth_of[i] < 0 and any(det_of[j] >= 0 for j in truths):
            duplicate[i] = True
    return Matching(truth_of, det_of, distance, duplicate)


def _rate(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


def _ordered(names: Any) -> list[str]:
    """Zone or class names: the simulator's zone order first, then the rest alphabetically."""
    present = {str(name) for name in names}
    known = [zone for zone in ZONE_ORDER if zone in present]
    return known + sorted(present - set(known))


def scene_zones(truth_json: str | Path) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """The simulated smear's zone map, rebuilt from a ``*.truth.json`` sidecar.

    Parameters
    ----------
    truth_json
        The sidecar ``simulate`` writes beside the slide.

    Returns
    -------
    callable or None
        ``zone(x_um, y_um) -> array of zone names``; ``None`` when the file is missing or was not written
        by this simulator (then detections take the zone of the nearest truth cell).
    """
    path = Path(truth_json)
    if not path.is_file():
        return None
    try:
        from .simulate.presets import BloodPreset
        from .simulate.scene import Scene, SceneSpec

        meta = json.loads(path.read_text())
        spec = SceneSpec(
            int(meta["width_px"]),
            int(meta["height_px"]),
            float(meta["mpp"]),
            int(meta["seed"]),
            BloodPreset(**meta["preset"]),
            str(meta["placement"]),
        )
        scene = Scene(spec)
    except (KeyError, TypeError, ValueError, PipelineError):
        return None
    return scene.zone


def detection_zones(
    x_um: np.ndarray,
    y_um: np.ndarray,
    truth: pd.DataFrame,
    zone_map: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Zone of each detection: from the scene's zone map, else that of the nearest truth cell.

    Parameters
    ----------
    x_um, y_um
        Detection centres, um.
    truth
        The truth table (``x_um``, ``y_um``, ``zone``).
    zone_map
        :func:`scene_zones` of the slide, if known.

    Returns
    -------
    ndarray of str
    """
    x = np.asarray(x_um, dtype=float)
    y = np.asarray(y_um, dtype=float)
    if zone_map is not None:
        return np.asarray(zone_map(x, y)).astype(str)
    if len(x) == 0 or len(truth) == 0:
        return np.full(len(x), "unknown", dtype=object).astype(str)
    _, nearest = cKDTree(truth[["x_um", "y_um"]].to_numpy(float)).query(np.column_stack([x, y]))
    return truth["zone"].to_numpy().astype(str)[nearest]


def _match_table(table: pd.DataFrame, truth: pd.DataFrame, mpp: float) -> Matching:
    """:func:`match` of a gallery table's level-0 positions against the truth cells."""
    return match(
        table["x_px"].to_numpy(float) * mpp,
        table["y_px"].to_numpy(float) * mpp,
        truth["x_um"].to_numpy(float),
        truth["y_um"].to_numpy(float),
        truth["diameter_um"].to_numpy(float) / 2,
    )


def _section(
    table: pd.DataFrame,
    truth: pd.DataFrame,
    mpp: float,
    zone_map: Callable[..., np.ndarray] | None,
    m: Matching,
) -> dict[str, Any]:
    det_x = table["x_px"].to_numpy(float) * mpp
    det_y = table["y_px"].to_numpy(float) * mpp
    found = m.detection_of_truth >= 0
    true_det = m.truth_of_detection >= 0
    false_det = ~true_det & ~m.duplicate
    errors = m.distance_um[true_det]
    truth_class = truth["cell_class"].to_numpy().astype(str)
    truth_zone = truth["zone"].to_numpy().astype(str)
    det_zone = detection_zones(det_x, det_y, truth, zone_map)
    by_class = {
        c: {
            "truth": int((truth_class == c).sum()),
            "found": int(found[truth_class == c].sum()),
            "recall": _rate(int(found[truth_class == c].sum()), int((truth_class == c).sum())),
        }
        for c in sorted(set(truth_class))
    }
    by_zone = {}
    for z in _ordered(set(truth_zone) | set(det_zone)):
        in_truth, in_det = truth_zone == z, det_zone == z
        by_zone[z] = {
            "truth": int(in_truth.sum()),
            "found": int(found[in_truth].sum()),
            "recall": _rate(int(found[in_truth].sum()), int(in_truth.sum())),
            "detections": int(in_det.sum()),
            "matched": int(true_det[in_det].sum()),
            "duplicates": int(m.duplicate[in_det].sum()),
            "false": int(false_det[in_det].sum()),
            "precision": _rate(int(true_det[in_det].sum()), int(in_det.sum())),
        }
    return {
        "detections": len(table),
        "matched": int(true_det.sum()),
        "recall": _rate(int(found.sum()), len(truth)),
        "precision": _rate(int(true_det.sum()), len(table)),
        "duplicates": int(m.duplicate.sum()),
        "false": int(false_det.sum()),
        "centring_error_um": {
            "median": float(np.median(errors)) if errors.size else None,
            "p95": float(np.percentile(errors, 95)) if errors.size else None,
        },
        "recall_by_class": {c: v["recall"] for c, v in by_class.items()},
        "recall_by_zone": {z: v["recall"] for z, v in by_zone.items() if v["truth"]},
        "precision_by_zone": {z: v["precision"] for z, v in by_zone.items() if v["detections"]},
        "by_class": by_class,
        "by_zone": by_zone,
    }


def evaluate_tables(
    candidates: pd.DataFrame,
    cells: pd.DataFrame,
    truth: pd.DataFrame,
    mpp: float,
    zone_map: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    filter_max_blur_um: float | None = None,
) -> dict[str, Any]:
    """Recall and precision of candidates and accepted cells against truth, by class and by zone.

    Detections carry no class, so precision is reported overall and per zone (the zone a detection
    lies in); recall is reported overall, per class and per zone (of the truth cells).

    Parameters
    ----------
    candidates, cells
        The gallery's tables (level-0 ``x_px``, ``y_px``).
    truth
        The simulator's truth table.
    mpp
        Level-0 pixel size of the slide, um/px.
    zone_map
        Zone of any point (:func:`scene_zones`); without it a detection takes the zone of the nearest
        truth cell.
    filter_max_blur_um
        The quality filter's focus limit the gallery was made with (``max_blur_um``); the default
        limit when ``None``.

    Returns
    -------
    dict
        ``truth_cells``, ``truth_by_class``, ``truth_by_zone``, ``zone_source`` and, for ``candidates``
        and ``accepted``: ``detections``, ``matched``, ``recall``, ``precision``, ``duplicates``,
        ``false``, ``centring_error_um`` (``median``, ``p95``), ``recall_by_class``, ``recall_by_zone``,
        ``precision_by_zone``, and the counts behind them in ``by_class`` and ``by_zone``. Rates are
        ``None`` where their denominator is 0. ``filter_vs_truth`` (see :func:`filter_vs_truth`) when
        the candidates carry a ``reason`` and the truth its ``in_focus``, ``touching`` and ``zone``.

    Raises
    ------
    ParameterError
        If the truth table lacks the simulator's columns.
    """
    if not {"x_um", "y_um", "diameter_um", "cell_class", "zone"} <= set(truth.columns):
        raise ParameterError(
            "the truth table lacks simulator columns (x_um, y_um, diameter_um, cell_class, zone)"
        )
    truth_class = truth["cell_class"].astype(str)
    truth_zone = truth["zone"].astype(str)
    report: dict[str, Any] = {
        "truth_cells": len(truth),
        "truth_by_class": {c: int((truth_class == c).sum()) for c in sorted(set(truth_class))},
        "truth_by_zone": {z: int((truth_zone == z).sum()) for z in _ordered(set(truth_zone))},
        "zone_source": "scene" if zone_map is not None else "nearest truth cell",
    }
    candidate_matching = _match_table(candidates, truth, mpp)  # used twice: matched once
    report["candidates"] = _section(candidates, truth, mpp, zone_map, candidate_matching)
    report["accepted"] = _section(cells, truth, mpp, zone_map, _match_table(cells, truth, mpp))
    if "reason" in candidates.columns and set(TRUTH_FLAWS) <= set(truth.columns):
        report["filter_vs_truth"] = filter_vs_truth(
            candidates, truth, mpp, filter_max_blur_um, matching=candidate_matching
        )
    return report


#: Truth columns that make a cell unfit for a gallery, and when.
TRUTH_FLAWS = ("in_focus", "touching", "zone")
ACCEPTED = "accepted"  # the row of filter_vs_truth for candidates the filter kept


def filter_vs_truth(
    candidates: pd.DataFrame,
    truth: pd.DataFrame,
    mpp: float,
    filter_max_blur_um: float | None = None,
    matching: Matching | None = None,
) -> dict[str, Any]:
    """What each reject reason removed, judged by the simulator's truth.

    Parameters
    ----------
    candidates
        The gallery's candidates (level-0 ``x_px``, ``y_px``, ``reason``: '' when accepted).
    truth
        The simulator's truth table, with ``in_focus``, ``touching``, ``zone`` and ``blur_sigma_um``.
    mpp
        Level-0 pixel size of the slide, um/px.
    filter_max_blur_um
        The filter's focus limit (the default :class:`~pipeline.quality.QualityParams` one when None).
    matching
        The candidates' :func:`match` against ``truth`` when the caller has it.

    Returns
    -------
    dict
        ``by_reason``: for each reject reason and for ``accepted``: ``candidates``, ``truly_good``,
        ``truly_bad``, ``not_a_cell`` (false detections and duplicates) and ``bad_because`` (truth
        flaws of the bad ones: ``out_of_focus``, ``touching``, ``thick_zone``; a cell may have
        several). ``focus_limit_um``: ``truth`` (in focus at blur sigma <= it), ``filter`` (accepted up
        to it), ``accepted_truly_out_of_focus`` and, of those, ``accepted_between_limits`` (truth
        blur between the two limits).
    """
    from .quality import QualityParams
    from .simulate.optics import IN_FOCUS_MAX_SIGMA_UM

    m = _match_table(candidates, truth, mpp) if matching is None else matching
    flaws = {
        "out_of_focus": ~truth["in_focus"].to_numpy(bool),
        "touching": truth["touching"].to_numpy(bool),
        "thick_zone": truth["zone"].to_numpy().astype(str) == "thick",
    }
    bad = np.logical_or.reduce(list(flaws.values()))
    reasons = candidates["reason"].fillna("").astype(str).to_numpy()
    matched = m.truth_of_detection >= 0
    j = m.truth_of_detection[matched]
    by_reason: dict[str, dict[str, Any]] = {}
    for reason in [*sorted(set(reasons) - {""}), ""]:
        here = reasons == reason
        cells = j[here[matched]]
        by_reason[reason or ACCEPTED] = {
            "candidates": int(here.sum()),
            "truly_good": int((~bad[cells]).sum()),
            "truly_bad": int(bad[cells].sum()),
            "not_a_cell": int((here & ~matched).sum()),
            "bad_because": {name: int(flaw[cells].sum()) for name, flaw in flaws.items()},
        }
    limit = QualityParams().max_blur_um if filter_max_blur_um is None else float(filter_max_blur_um)
    kept = j[(reasons == "")[matched]]
    out_of_focus = kept[flaws["out_of_focus"][kept]]
    blur = truth["blur_sigma_um"].to_numpy(float) if "blur_sigma_um" in truth else np.full(len(truth), np.nan)
    return {
        "good_means": "in focus, not touching, not in the thick zone (the truth's in_focus, touching, zone)",
        "by_reason": by_reason,
        "focus_limit_um": {
            "truth": IN_FOCUS_MAX_SIGMA_UM,
            "filter": limit,
            "accepted_truly_out_of_focus": len(out_of_focus),
            "accepted_between_limits": int((blur[out_of_focus] <= limit).sum()),
        },
    }


def truth_json_for(truth_csv: str | Path) -> Path:
    """The ``*.truth.json`` sidecar next to a ``*.truth.csv``."""
    path = Path(truth_csv)
    return path.with_suffix(".json")


def evaluate_gallery(gallery_path: str | Path, truth_path: str | Path) -> dict[str, Any]:
    """Evaluate a gallery against a ``*.truth.csv`` written by ``python -m pipeline simulate``.

    Parameters
    ----------
    gallery_path
        ``OUT/<stem>.zarr`` written by ``run``.
    truth_path
        ``<stem>.truth.csv``; the ``<stem>.truth.json`` beside it, when present, gives the zone map.

    Returns
    -------
    dict
        See :func:`evaluate_tables`; also ``gallery`` and ``truth`` (the paths).

    Raises
    ------
    ParameterError
        If the truth file is missing or not the simulator's.
    GalleryError
        If the gallery cannot be read.
    """
    gallery = open_gallery(gallery_path)
    truth_file = Path(truth_path)
    if not truth_file.is_file():
        raise ParameterError(f"truth file {truth_file} not found; simulate writes it beside the slide")
    truth = pd.read_csv(truth_file)
    # Checked twice on purpose: size and bounds before the evaluation, which another slide's truth could
    # fail in a way that says nothing of the cause; the candidates' recall once it is known.
    check_same_slide(gallery_path, gallery.attrs["slide"], truth_file, truth)
    quality = gallery.attrs.get("parameters", {}).get("quality", {})
    report = evaluate_tables(
        gallery.candidates,
        gallery.cells,
        truth,
        float(gallery.attrs["slide"]["mpp"]),
        scene_zones(truth_json_for(truth_file)),
        quality.get("max_blur_um"),
    )
    check_same_slide(gallery_path, gallery.attrs["slide"], truth_file, truth, report["candidates"]["recall"])
    return {"gallery": str(gallery_path), "truth": str(truth_file), **report}


#: A truth named for another slide of the same size is refused when fewer of its cells than this lie
#: under a candidate: chance alone gives about 5-10 %, a real match 59 % or more even in the thick zone.
MIN_CANDIDATE_RECALL_OF_RENAMED = 0.25


def check_same_slide(
    gallery_path: str | Path,
    slide: dict[str, Any],
    truth_file: Path,
    truth: pd.DataFrame,
    candidate_recall: float | None = None,
) -> None:
    """Refuse a truth file written for another slide than the gallery's.

    The ``*.truth.json`` beside the truth gives its slide's size, which must be the gallery's; without
    it, the truth's cells must at least lie on the gallery's slide. It also names the slide: a gallery of
    a slide with another name (a converted or renamed copy) is accepted only if the candidates do find
    the truth's cells (``candidate_recall``, once known).

    Parameters
    ----------
    gallery_path
        The gallery, for the message.
    slide
        The gallery's ``attrs["slide"]`` (``path``, ``dimensions``).
    truth_file
        The ``*.truth.csv``.
    truth
        Its table.
    candidate_recall
        Share of the truth's cells found by a candidate; None before the evaluation.

    Raises
    ------
    ParameterError
        If the truth describes another slide.
    """
    width, height = (int(v) for v in slide["dimensions"])
    slide_name = Path(str(slide["path"])).name
    advice = f"pass the truth.csv that simulate wrote beside {slide_name}"
    meta = _sidecar(truth_json_for(truth_file))
    if "width_px" in meta and "height_px" in meta:
        size = (int(meta["width_px"]), int(meta["height_px"]))
        named = meta.get("slide")
        described = f"truth {truth_file} describes {named or 'a slide'} of {size[0]} x {size[1]} px"
        made_from = f"gallery {gallery_path} was made from {slide_name} ({width} x {height} px)"
        if size != (width, height):
            raise ParameterError(f"{described}, but {made_from}; {advice}")
        renamed = named is not None and named != slide_name
        if renamed and candidate_recall is not None and candidate_recall < MIN_CANDIDATE_RECALL_OF_RENAMED:
            raise ParameterError(
                f"{described}, but {made_from}, and only {100 * candidate_recall:.0f}% of its cells lie "
                f"under a candidate; {advice}"
            )
        return
    if len(truth) and {"x_px", "y_px"} <= set(truth.columns):
        if truth["x_px"].max() >= width or truth["y_px"].max() >= height:
            raise ParameterError(
                f"truth {truth_file} has cells outside gallery {gallery_path}'s slide {slide_name} "
                f"({width} x {height} px): it is another slide's; {advice}"
            )


def _sidecar(path: Path) -> dict[str, Any]:
    """The ``*.truth.json`` as a dict; empty where it is missing or unreadable."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(report: dict[str, Any]) -> str:
    """The evaluation report as tables for the terminal.

    Parameters
    ----------
    report
        As returned by :func:`evaluate_gallery` or :func:`evaluate_tables`.

    Returns
    -------
    str
        A summary table (found, recall, precision, duplicates, false detections, centring error), then
        recall and precision by zone and recall by class, for candidates and accepted cells.
    """
    cand, acc = report["candidates"], report["accepted"]
    lines = [
        f"truth cells: {report['truth_cells']} (detection zones from the {report['zone_source']})",
        f"{'':<11}{'found':>7}{'recall':>8}{'precision':>10}{'dupl.':>7}{'false':>7}"
        f"{'centre med/p95 um':>19}",
    ]
    for name, r in (("candidates", cand), ("accepted", acc)):
        err = r["centring_error_um"]
        centring = f"{err['median']:.2f} / {err['p95']:.2f}" if err["median"] is not None else "-"
        lines.append(
            f"{name:<11}{r['matched']:>7}{_pct(r['recall']):>8}{_pct(r['precision']):>10}"
            f"{r['duplicates']:>7}{r['false']:>7}{centring:>19}"
        )
    lines += [
        "",
        f"{'zone':<11}{'truth':>7}{'cand. recall':>14}{'acc. recall':>13}"
        f"{'cand. n':>9}{'cand. prec.':>13}{'acc. n':>8}{'acc. prec.':>12}",
    ]
    for zone in _ordered(set(cand["by_zone"]) | set(acc["by_zone"])):
        c, a = cand["by_zone"].get(zone, {}), acc["by_zone"].get(zone, {})
        lines.append(
            f"{zone:<11}{c.get('truth', 0):>7}{_pct(c.get('recall')):>14}{_pct(a.get('recall')):>13}"
            f"{c.get('detections', 0):>9}{_pct(c.get('precision')):>13}"
            f"{a.get('detections', 0):>8}{_pct(a.get('precision')):>12}"
        )
    width = max([len("class"), *(len(c) for c in cand["by_class"])]) + 2
    lines += ["", f"{'class':<{width}}{'truth':>7}{'cand. recall':>14}{'acc. recall':>13}"]
    for cls, c in cand["by_class"].items():
        a = acc["by_class"].get(cls, {})
        lines.append(f"{cls:<{width}}{c['truth']:>7}{_pct(c['recall']):>14}{_pct(a.get('recall')):>13}")
    if "filter_vs_truth" in report:
        lines += ["", *_filter_lines(report["filter_vs_truth"])]
    return "\n".join(lines)


def _filter_lines(section: dict[str, Any]) -> list[str]:
    lines = [
        f"quality filter against the truth (good: {section['good_means'].split(' (')[0]})",
        f"{'reason':<14}{'cand.':>7}{'good':>7}{'bad':>7}{'no cell':>9}   bad because",
    ]
    for reason, row in section["by_reason"].items():
        reason = "kept" if reason == ACCEPTED else reason  # "accepted" starts the summary's row
        because = ", ".join(f"{k} {v}" for k, v in row["bad_because"].items() if v) or "-"
        lines.append(
            f"{reason:<14}{row['candidates']:>7}{row['truly_good']:>7}{row['truly_bad']:>7}"
            f"{row['not_a_cell']:>9}   {because}"
        )
    focus = section["focus_limit_um"]
    lines.append(
        f"focus: the truth calls a cell in focus at blur <= {focus['truth']:g} um, the filter accepts up to "
        f"{focus['filter']:g} um; {focus['accepted_truly_out_of_focus']} accepted cells are out of focus by "
        f"the truth, {focus['accepted_between_limits']} of them between the two limits"
    )
    return lines
