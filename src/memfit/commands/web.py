"""`memfit web`: the estimate, the fit verdict and the plan on a local page (needs ``memfit[web]``)."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_parser(sub: Any) -> None:
    from ..cli import whole

    p = sub.add_parser("web", help="a local page and JSON API: estimate, verdict, plan (pip install 'memfit[web]')",
                       description="Serve the estimate, the fit verdict and the plan on a local page with charts, "
                                   "and a JSON API (/api/estimate, /api/plan, /api/models, /api/gpus, /openapi.json).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=whole(1, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--root", default=None, metavar="DIR",
                   help="folder whose config.json files requests may name (default: none; paste configs instead)")
    p.add_argument("--allow-hub", action="store_true", dest="allow_hub",
                   help="let requests name Hugging Face Hub ids (fetches their config.json over the network)")
    p.set_defaults(func=run)


def check_can_listen(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, so that an address this machine does not have, a name that does
    not resolve or a port in use is memfit's one-line error, not uvicorn's log line and exit 3."""
    import socket

    from ..errors import JobError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise JobError(f"--host {host!r} is not an address of this machine ({getattr(exc, 'strerror', None) or exc}); "
                       "the default 127.0.0.1 serves this machine only") from None
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        s.bind(addr)
    except OSError as exc:
        raise JobError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port, or a --host "
                       "this machine has") from None
    finally:
        s.close()


def run(args: argparse.Namespace) -> int:
    from ..errors import JobError, require

    require("fastapi", "web")
    uvicorn = require("uvicorn", "web")
    if not 0 < args.port < 65536:
        raise JobError(f"--port must be 1..65535; got {args.port}")
    from ..web import create_app

    from ..web import adapter

    if args.root is not None and not os.path.isdir(args.root):
        raise JobError(f"--root {args.root!r} is not a folder")
    check_can_listen(args.host, args.port)
    app = create_app(root=args.root, allow_hub=args.allow_hub)
    adapter.warm_up()  # read the registry and import the estimator now, not on the first page load
    print(f"memfit web on http://{args.host}:{args.port}/ (Ctrl-C stops it)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
