"""The explorer's web application (Flask): one page and a small JSON API.

Routes (all answers are JSON, except the page, its static files and the PNGs):

==========================  ======  =========================================================
``/``                       GET     the page (``static/index.html``; no CDN, works offline)
``/api/info``               GET     model, layers, modules, units (channel, module, influence)
``/api/pairs?start=P``      GET     Original 1 and Original 2 of pairs P..P+7 (PNG data URLs)
``/api/hybrids``            POST    ``{"selection": {layer: [ch]}, "start": P}`` -> hybrids
``/api/select``             POST    ``{"mask": [[0/1]] (H x W), "threshold": 0.5}`` -> selection
``/api/map/<layer>/<ch>``   GET     the channel's influence map (PNG)
``/api/module``             POST    ``{"selection": ..., "name": ...}`` -> module JSON file
``/api/hybrids.png``        POST    ``{"selection": ..., "start": P}`` -> PNG grid download
==========================  ======  =========================================================

A malformed request gets a 4xx answer ``{"error": "..."}`` saying what was wrong (bad JSON,
unknown layer, channel out of range, empty or too large region, request body over
:data:`MAX_REQUEST_BYTES`); the server keeps running.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from cfmodules.errors import CfModulesError, LayerNotFoundError
from cfmodules.explorer.core import Explorer

__all__ = ["create_app", "MAX_REQUEST_BYTES", "STATIC"]

MAX_REQUEST_BYTES = 256 * 1024
"""Largest request body accepted (a 64x64 region as JSON is about 9 kB)."""

STATIC = Path(__file__).with_name("static")


def png_bytes(image: np.ndarray) -> bytes:
    """(C, H, W) or (H, W, C) uint8 image -> PNG bytes."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _urls(images: np.ndarray) -> list[str]:
    from cfmodules.display import png_data_url

    return [png_data_url(png_bytes(im)) for im in images]


def create_app(explorer: Explorer) -> Any:
    """The Flask application serving ``explorer``.

    Parameters
    ----------
    explorer : Explorer

    Returns
    -------
    flask.Flask
        Run it with :func:`cfmodules.explorer.serve` (or any WSGI server); test it with
        ``app.test_client()``.

    Raises
    ------
    ModelNotAvailableError
        When Flask is not installed.
    """
    try:
        from flask import Flask, Response, jsonify, request, send_from_directory
        from werkzeug.exceptions import HTTPException
    except ImportError as e:  # pragma: no cover - flask is a dependency of the explore extra
        from cfmodules.errors import ModelNotAvailableError

        raise ModelNotAvailableError("The explorer needs Flask: pip install 'cfmodules[explore]'"
                                     ".") from e

    app = Flask("cfmodules.explorer", static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]

    def error(status: int, message: str) -> Any:
        resp = jsonify({"error": message, "status": status})
        resp.status_code = status
        return resp

    @app.errorhandler(CfModulesError)
    def library_error(e: CfModulesError) -> Any:
        return error(404 if isinstance(e, LayerNotFoundError) and request.method == "GET"
                     else 400, " ".join(str(e).split()))

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Any:
        messages = {413: f"The request is larger than {MAX_REQUEST_BYTES // 1024} kB; send the "
                         "region at the maps' resolution.",
                    404: "No such page or API route.", 405: "Wrong HTTP method for this route."}
        return error(e.code or 500, messages.get(e.code or 0, e.description or e.name))

    @app.errorhandler(Exception)
    def unexpected(e: Exception) -> Any:  # a bug: say so, keep serving
        app.logger.exception("explorer request failed")
        return error(500, f"Internal error: {type(e).__name__}: {e}")

    def body() -> dict[str, Any]:
        data = request.get_json(force=True, silent=True)
        if not isinstance(data, dict):
            from cfmodules.errors import ConfigError

            raise ConfigError("The request body must be a JSON object, e.g. "
                              "{\"selection\": {\"main.8\": [3, 17]}, \"start\": 0}.")
        return data

    def start_arg() -> int:
        text = request.args.get("start", "0")
        try:
            value: Any = int(text)
        except ValueError:
            value = text
        return explorer.check_start(value)

    @app.get("/")
    def index() -> Any:
        return send_from_directory(STATIC, "index.html")

    @app.get("/api/info")
    def info() -> Any:
        return jsonify(explorer.info())

    @app.get("/api/pairs")
    def pairs() -> Any:
        start = start_arg()
        o1, o2 = explorer.originals(start)
        return jsonify({"start": start, "original1": _urls(o1), "original2": _urls(o2)})

    @app.post("/api/hybrids")
    def hybrids() -> Any:
        data = body()
        t = time.perf_counter()
        sel = explorer.check_selection(data.get("selection", {}))
        images = explorer.hybrids(sel, data.get("start", 0))
        urls = _urls(images)
        return jsonify({"selection": sel, "start": data.get("start", 0), "hybrids": urls,
                        "ms": round(1000 * (time.perf_counter() - t), 1)})

    @app.post("/api/select")
    def select() -> Any:
        data = body()
        if "mask" not in data:
            from cfmodules.errors import ConfigError

            raise ConfigError("Send the painted region as \"mask\": rows of 0 and 1 at the "
                              "maps' resolution.")
        return jsonify(explorer.select_region(data["mask"], data.get("threshold", 0.5)))

    @app.get("/api/map/<layer>/<channel>")
    def channel_map(layer: str, channel: str) -> Any:
        try:
            ch: Any = int(channel)
        except ValueError:
            ch = channel
        return Response(png_bytes(explorer.map_image(layer, ch)), mimetype="image/png")

    @app.post("/api/module")
    def module() -> Any:
        data = body()
        mf = explorer.module_file(data.get("selection", {}), data.get("name", "selection"))
        return Response(mf.to_json(), mimetype="application/json", headers={
            "Content-Disposition": "attachment; filename=module.json"})

    @app.post("/api/hybrids.png")
    def hybrids_png() -> Any:
        from cfmodules.display import ImageGrid

        data = body()
        sel = explorer.check_selection(data.get("selection", {}))
        start = explorer.check_start(data.get("start", 0))
        o1, o2 = explorer.originals(start)
        grid = ImageGrid.from_images(np.stack([o1, o2, explorer.hybrids(sel, start)]))
        return Response(grid.to_png(), mimetype="image/png", headers={
            "Content-Disposition": "attachment; filename=hybrids.png"})

    return app
