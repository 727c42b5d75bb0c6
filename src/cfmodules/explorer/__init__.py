"""The explorer: a local web page to look at an analysis's channels and modules live.

Paint a region on a face and the channels whose influence maps put most of their mass
inside it are selected (GANPaint's gesture, answered with the influence maps); the hybrids
of the selection for 8 pairs update at once. Pick a module, add or remove single channels,
see each channel's map, draw new pairs, download the selection as a module file (the JSON
that ``cfmodules hybrids --modules`` and :class:`~cfmodules.module_file.ModuleFile` read)
and the hybrids as PNG.

From the shell::

    cfmodules explore out/results.npz          # http://127.0.0.1:8050

From a notebook::

    server = cfmodules.explore(result)          # shows the page in an IFrame
    server.stop()

The server binds to 127.0.0.1 (this machine only) unless told otherwise. It needs Flask
(``pip install 'cfmodules[explore]'``); the page's JavaScript and CSS ship in the package.
"""

from __future__ import annotations

import html
import os
import threading
import webbrowser
from typing import Any

from cfmodules.explorer.app import create_app
from cfmodules.explorer.core import Explorer

__all__ = ["Explorer", "ExplorerServer", "create_app", "explore", "serve"]


class ExplorerServer:
    """A running explorer server (in a background thread); shows itself as an IFrame.

    Attributes
    ----------
    url : str
        ``http://host:port/``.
    explorer : Explorer
    """

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 0,
                 height: int = 760, log_requests: bool = False):
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Handler(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                if log_requests:  # off in notebooks, where each line would land in a cell
                    super().log_request(*args, **kwargs)

        self.explorer, self.height = explorer, height
        try:
            self._server = make_server(host, port, create_app(explorer), threaded=True,
                                       request_handler=Handler)
        except OSError as e:
            from cfmodules.errors import ConfigError

            raise ConfigError(f"Cannot listen on {host}:{port}: {e.strerror or e}. Choose "
                              "another port (0: any free port).") from None
        self.host, self.port = host, int(self._server.server_port)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> ExplorerServer:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            name="cfmodules-explorer", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until Ctrl-C (or :meth:`stop` from another thread)."""
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _repr_html_(self) -> str:
        url = html.escape(self.url)
        return (f'<iframe src="{url}" width="100%" height="{self.height}" '
                f'style="border:1px solid #ddd"></iframe>'
                f'<div style="font-size:12px">cfmodules explorer at <a href="{url}" '
                f'target="_blank">{url}</a> (server.stop() ends it)</div>')

    def __repr__(self) -> str:
        return f"ExplorerServer({self.url})"


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 8050,
          open_browser: bool = False) -> None:
    """Serve ``explorer`` in this thread until Ctrl-C (the ``cfmodules explore`` command)."""
    server = ExplorerServer(explorer, host, port, log_requests=True)
    print(f"cfmodules explorer: {server.url}  (Ctrl-C to stop)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the "
              "explorer.", flush=True)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, (server.url,)).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("cfmodules explorer: stopped.", flush=True)


def explore(result: Any, adapter: Any = None, *, host: str = "127.0.0.1", port: int = 0,
            n_pairs: int = 8, height: int = 760) -> ExplorerServer:
    """Start the explorer of an analysis in the background; in a notebook it shows inline.

    Parameters
    ----------
    result : AnalysisResult or path to a ``results.npz``
    adapter : GeneratorAdapter, optional
        The analysed model; default: loaded from the result's ``model_spec`` and checked
        against it (layers and channel counts).
    host : str, default "127.0.0.1"
        Address to listen on (this machine only by default).
    port : int, default 0
        0 picks a free port.
    n_pairs : int, default 8
    height : int, default 760
        Height of the IFrame (pixels).

    Returns
    -------
    ExplorerServer
        Its ``url``; ``stop()`` ends it. As a cell's value it shows the page in an IFrame.
    """
    from cfmodules.analysis import AnalysisResult

    if isinstance(result, (str, os.PathLike)):
        path = os.fspath(result)
        result = AnalysisResult.load(path)
    else:
        path = "the result"
    if not isinstance(result, AnalysisResult):
        from cfmodules.errors import ConfigError

        raise ConfigError(f"explore() takes an AnalysisResult or the path of a results.npz, "
                          f"got {type(result).__name__}.")
    from cfmodules.module_file import ModuleFile

    if adapter is None:
        from cfmodules.models import load_model_for

        adapter = load_model_for(ModuleFile.from_result(result), path, None, "auto", None)
    else:
        ModuleFile.from_result(result).check_model(adapter)
    server = ExplorerServer(Explorer(result, adapter, n_pairs=n_pairs), host, port, height)
    return server.start()
