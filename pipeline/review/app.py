"""The review web app's routes (Flask): batch page, slide page, tiles, crops, tables and labels.

Nothing a browser sends is used as a path: slides are named by their gallery's stem and looked up in
the :class:`~pipeline.review.catalog.Catalog` of the output folder; files are served only from the
package's static folder and from the folder's own list of QC pictures. Anything else is a 404.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, abort, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from ..errors import GalleryError, ParameterError, SlideError
from ..qc import COLOURS
from .catalog import Catalog
from .labels import LABEL_KEYS, LABELS, LabelStore, check_annotator
from .security import TOKEN_COOKIE, host_header_name, is_loopback, token_matches
from .tiles import SlideTiles, TileCache, encode_jpeg

__all__ = ["create_app"]

_HERE = Path(__file__).parent
_GREY = (90, 90, 90)
#: Side of the crops shown in the grid and details, px (the gallery's crops are resized to it).
_THUMB_PX = 192
# Columns of the cells/candidates tables that are positions or bookkeeping, not features to show.
_NOT_FEATURES = frozenset({"accepted", "reason", "cell_index", "candidate_index", "cell_id"})


def create_app(out_dir: str | Path, token: str | None = None) -> Flask:
    """The review app for the output folder ``out_dir``.

    Parameters
    ----------
    out_dir
        The folder ``python -m pipeline run --out`` wrote (galleries, batch.json, QC pictures).
    token
        When given, every request must carry it (``?token=`` once, then the cookie); 403 otherwise.
        Without it, only requests addressed to a loopback host name are answered.

    Returns
    -------
    flask.Flask
        A WSGI app; :func:`pipeline.review.server.serve` runs it.
    """
    catalog = Catalog(out_dir)
    tiles = TileCache()
    app = Flask(
        __name__,
        static_folder=str(_HERE / "static"),
        static_url_path="/static",
        template_folder=str(_HERE / "templates"),
    )
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # a label is a few bytes
    app.config["review.catalog"] = catalog

    @app.before_request
    def guard() -> Response | None:
        if token is not None:
            given = request.args.get("token") or request.cookies.get(_cookie_name())
            if not token_matches(given, token):
                return _text(
                    "403 forbidden: open the URL with ?token=... that the review command printed", 403
                )
        elif not is_loopback(host_header_name(request.host)):
            return _text("403 forbidden: this app answers only at 127.0.0.1, localhost or ::1", 403)
        if request.method == "POST" and not request.is_json:
            return _text("415: send JSON", 415)
        return None

    @app.after_request
    def headers(response: Response) -> Response:
        if token is not None and token_matches(request.args.get("token"), token):
            response.set_cookie(_cookie_name(), token, httponly=True, samesite="Strict")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"  # the token never leaves in a Referer
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _text(f"{exc.code} {exc.name}: {exc.description or ''}".strip(), exc.code or 500)

    @app.errorhandler(GalleryError)
    def gallery_error(exc: GalleryError) -> Response:
        return _text(f"404 not found: {exc}", 404)

    @app.errorhandler(ParameterError)
    def parameter_error(exc: ParameterError) -> Response:
        return _text(f"400 bad request: {exc}", 400)

    # --- pages -------------------------------------------------------------------------------------

    @app.get("/")
    def batch_page() -> str:
        return render_template("batch.html", out_dir=str(catalog.out_dir))

    @app.get("/slide/<stem>")
    def slide_page(stem: str) -> str:
        catalog.gallery(stem)
        return render_template("slide.html", stem=stem, out_dir=str(catalog.out_dir))

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status=204)

    @app.get("/files/<name>")
    def picture(name: str) -> Response:
        if name not in catalog.pictures():  # the folder's own list: no path from the browser is opened
            abort(404)
        data = (catalog.out_dir / name).read_bytes()
        return Response(data, mimetype="image/png", headers={"Cache-Control": "no-cache"})

    # --- tables ------------------------------------------------------------------------------------

    @app.get("/api/batch")
    def batch() -> Response:
        return jsonify({"out_dir": str(catalog.out_dir), "slides": [e.as_json() for e in catalog.entries()]})

    @app.get("/api/slide/<stem>")
    def slide_info(stem: str) -> Response:
        gallery = catalog.gallery(stem)
        attrs = gallery.attrs
        slide = attrs.get("slide") or {}
        crop = (attrs.get("parameters") or {}).get("crop") or {}
        candidates = gallery.candidates
        outcomes = (
            np.where(candidates["accepted"].to_numpy(bool), "accepted", candidates["reason"].astype(str))
            if len(candidates)
            else np.array([], dtype=str)
        )
        names, counts = np.unique(outcomes, return_counts=True)
        counted = dict(zip(names.tolist(), counts.tolist(), strict=True))
        order = [name for name in COLOURS if name in counted] + sorted(set(counted) - set(COLOURS))
        viewer_error = ""
        try:
            _tiles(stem)
        except GalleryError as exc:
            viewer_error = str(exc)
        return jsonify(
            {
                "stem": stem,
                "slide": str(slide.get("path", "")),
                "mpp": slide.get("mpp"),
                "dimensions": slide.get("dimensions"),
                "n_cells": len(gallery),
                "n_candidates": len(candidates),
                "crop_um": crop.get("crop_um"),
                "crop_px": attrs.get("crop_px"),
                "outcomes": [
                    {"name": name, "count": counted[name], "colour": _hex(COLOURS.get(name, _GREY))}
                    for name in order
                ],
                "labels": [{"name": name, "key": LABEL_KEYS[name]} for name in LABELS],
                "annotators": LabelStore(gallery.path, attrs).annotators(),
                "viewer_error": viewer_error,
            }
        )

    @app.get("/api/slide/<stem>/cells")
    def cells(stem: str) -> Response:
        table = catalog.gallery(stem).cells
        return jsonify(_columns(table))

    @app.get("/api/slide/<stem>/candidates")
    def candidates(stem: str) -> Response:
        table = catalog.gallery(stem).candidates
        return jsonify(_columns(table))

    # --- pictures ----------------------------------------------------------------------------------

    @app.get("/dzi/<stem>.dzi")
    def dzi(stem: str) -> Response:
        return Response(_tiles(stem).dzi(), mimetype="application/xml")

    @app.get("/dzi/<stem>_files/<int:level>/<int:column>_<int:row>.jpeg")
    def tile(stem: str, level: int, column: int, row: int) -> Response:
        data = _tiles(stem).tile(level, column, row)
        if data is None:
            abort(404)
        return _jpeg(data)

    @app.get("/slide/<stem>/cell/<int:index>.jpg")
    def cell_crop(stem: str, index: int) -> Response:
        gallery = catalog.gallery(stem)
        if not 0 <= index < len(gallery):
            abort(404)
        image = np.asarray(gallery.images[index])
        return _jpeg(encode_jpeg(image, quality=92))

    @app.get("/slide/<stem>/candidate/<int:index>.jpg")
    def candidate_crop(stem: str, index: int) -> Response:
        gallery = catalog.gallery(stem)
        if not 0 <= index < len(gallery.candidates):
            abort(404)
        row = gallery.candidates.iloc[index]
        mpp = float((gallery.attrs.get("slide") or {}).get("mpp"))
        crop_um = float(((gallery.attrs.get("parameters") or {}).get("crop") or {}).get("crop_um") or 25.0)
        image = _tiles(stem).crop(float(row["x_px"]), float(row["y_px"]), crop_um / mpp, _THUMB_PX)
        return _jpeg(encode_jpeg(image, quality=92))

    # --- labels ------------------------------------------------------------------------------------

    @app.get("/api/slide/<stem>/labels/<annotator>")
    def get_labels(stem: str, annotator: str) -> Response:
        gallery = catalog.gallery(stem)
        labels = LabelStore(gallery.path, gallery.attrs).read(check_annotator(annotator))
        return jsonify({"annotator": annotator, "labels": {str(k): v for k, v in labels.items()}})

    @app.post("/api/slide/<stem>/labels/<annotator>")
    def set_label(stem: str, annotator: str) -> Response:
        gallery = catalog.gallery(stem)
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("cell"), int):
            raise ParameterError('send {"cell": ROW, "label": NAME or null}')
        index, label = body["cell"], body.get("label")
        if not 0 <= index < len(gallery):
            raise ParameterError(f"cell {index} out of range for a gallery of {len(gallery)} cells")
        row = gallery.cells.iloc[index]
        labels = LabelStore(gallery.path, gallery.attrs).set(
            check_annotator(annotator), index, label, x_px=row["x_px"], y_px=row["y_px"]
        )
        return jsonify({"annotator": annotator, "labels": {str(k): v for k, v in labels.items()}})

    def _tiles(stem: str) -> SlideTiles:
        try:
            return tiles.get(*catalog.slide(stem))
        except SlideError as exc:
            raise GalleryError(f"{exc}; the gallery is still shown") from exc

    return app


def _cookie_name() -> str:
    # Cookies are shared by every port of a host: two apps on one machine (two tunnels, two folders)
    # must not overwrite each other's token.
    port = request.host.rpartition(":")[2]
    return f"{TOKEN_COOKIE}_{port if port.isdigit() else 'default'}"


def _text(message: str, status: int) -> Response:
    return Response(message + "\n", status=status, mimetype="text/plain")


def _jpeg(data: bytes) -> Response:
    return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _columns(table: Any) -> dict[str, Any]:
    """A table as ``{"columns": [...], "rows": [[...], ...]}`` with NaN and infinities as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    columns = [str(c) for c in table.columns]
    rows = [[clean(v) for v in row] for row in table.itertuples(index=False, name=None)]
    return {"columns": columns, "rows": rows, "features": [c for c in columns if c not in _NOT_FEATURES]}
