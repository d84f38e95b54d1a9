"""`mi-frontend` / `python -m mi.frontend.launch`: parse flags, install uvloop, serve.

    python -m mi.frontend.launch --backend 12222 --server-port 13000 [--host 127.0.0.1]

Prints `frontend start at http://HOST:PORT` once listening; SIGTERM or SIGINT exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from mi.actors.frontend import FrontendConfig, serve


def parse_args(argv: list[str] | None) -> FrontendConfig:
    parser = argparse.ArgumentParser(
        prog="mi-frontend", description="OpenAI-compatible HTTP frontend for an mi backend."
    )
    parser.add_argument(
        "--backend", required=True,
        help="backend PORT (local: its unix socket when present, else 127.0.0.1:PORT) or HOST:PORT",
    )
    parser.add_argument("--server-port", type=int, default=13000, help="port to serve on (13000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument(
        "--max-body-bytes", type=int, default=FrontendConfig.max_body_bytes,
        help="largest accepted request body (bytes)",
    )
    parser.add_argument(
        "--max-prompts", type=int, default=FrontendConfig.max_prompts,
        help="most prompts in one completion request",
    )
    parser.add_argument(
        "--shutdown-timeout", type=float, default=FrontendConfig.shutdown_timeout,
        help="seconds in-flight requests may run on after SIGTERM before they are aborted",
    )
    args = parser.parse_args(argv)
    try:
        return FrontendConfig(
            backend=args.backend,
            host=args.host,
            port=args.server_port,
            max_body_bytes=args.max_body_bytes,
            max_prompts=args.max_prompts,
            shutdown_timeout=args.shutdown_timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop
    except ImportError:
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(serve(config))
        else:
            asyncio.run(serve(config))
    except OSError as exc:  # e.g. the port is taken
        print(f"mi-frontend: cannot serve on {config.host}:{config.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
