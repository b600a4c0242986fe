"""``ditlens dash TRACE [--plan P] [--report R] [--port N] [--host H]``: serve the explorer."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from ditlens.errors import DitlensError


def register(sub: Any) -> None:
    """Add the ``dash`` verb to the ``ditlens`` command's subparsers."""
    p = sub.add_parser("dash", help="explore a trace's redundancy (and plans, validation reports) in the browser",
                       description="Serve the ditlens redundancy explorer for TRACE on http://HOST:PORT/.")
    p.add_argument("trace", help="trace file (.h5) written by `ditlens profile`")
    p.add_argument("--plan", action="append", metavar="PLAN",
                   help="plan JSON to show; give it twice to compare two plans side by side")
    p.add_argument("--report", action="append", metavar="DIR",
                   help="folder written by `ditlens validate --out DIR` (validate.json, grid.png); repeatable")
    p.add_argument("--port", type=int, default=8050, help="port to serve on (default 8050)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--debug", action="store_true", help="Dash debug mode (reloads, shows callback errors)")
    p.set_defaults(func=cmd_dash)


def _check_can_serve(host: str, port: int) -> None:
    """Bind the address once before announcing it, so a taken port is the only line printed."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
            probe.bind((host, port))
    except OSError as err:
        raise DitlensError(f"cannot serve on {host}:{port} ({err.strerror or err}): choose another --port") from None


def cmd_dash(args: argparse.Namespace) -> int:
    try:
        import dash  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as err:
        raise DitlensError(f"the dashboard needs dash and plotly ({err.name} is missing): pip install 'ditlens[dash]'") from None
    from ditlens.dashboards.app import create_app

    if not 0 < args.port < 65536:
        raise DitlensError(f"--port {args.port} is not a port number (1..65535)")
    app = create_app(args.trace, plan=args.plan, report=args.report)
    _check_can_serve(args.host, args.port)
    print(f"ditlens dash: {args.trace} on http://{args.host}:{args.port}/ (Ctrl+C to stop)", flush=True)
    try:
        app.run(host=args.host, port=args.port, debug=args.debug)
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise DitlensError(f"cannot serve on {args.host}:{args.port} ({err.strerror or err}): choose another --port") from None
    return 0
