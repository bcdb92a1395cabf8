"""Start the review app on a port and print where to open it (``python -m pipeline review OUT/``).

waitress serves it: a small, pure-Python production WSGI server with a thread pool, so tiles, crops
and labels are served side by side without any server started by hand.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import ParameterError
from .security import is_loopback, new_token

__all__ = ["serve"]

DEFAULT_PORT = 8765
_THREADS = 8


def serve(
    out_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    require_token: bool = False,
    say: Callable[[str], None] = print,
) -> None:
    """Serve the review app for ``out_dir`` until interrupted.

    Parameters
    ----------
    out_dir
        The folder ``run --out`` wrote.
    host
        Address to listen on. 127.0.0.1, localhost and ::1 need no token; any other address (e.g.
        0.0.0.0) gets a random token that every request must carry.
    port
        Port; 0 picks a free one.
    require_token
        Ask for a token on loopback too (shared machines such as a cluster's login node, where other
        users reach 127.0.0.1 as well).
    say
        Where the URL is printed.
    """
    try:
        from waitress import create_server
    except ImportError as exc:  # the review extra is not installed
        raise ParameterError(
            'the review app needs Flask and waitress: pip install "bloodsmear-pipeline[review]"'
        ) from exc
    from .app import create_app

    token = new_token() if require_token or not is_loopback(host) else None
    app = create_app(out_dir, token=token)
    try:
        server = create_server(app, host=host, port=port, threads=_THREADS, ident="bloodsmear-review")
    except OSError as exc:
        raise ParameterError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host"
        ) from exc
    actual_port = int(server.effective_port)  # type: ignore[union-attr]
    query = f"?token={token}" if token else ""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    say(f"review {Path(out_dir)}: open http://{shown}:{actual_port}/{query}")
    if host in ("0.0.0.0", "::"):
        say(f"  from other machines: http://{socket.gethostname()}:{actual_port}/{query}")
    say("  (Ctrl-C stops it)")
    sys.stdout.flush()
    try:
        server.run()
    finally:
        server.close()
